"""What the DPO and reward-model setups share: the pairs read, split, capped, encoded and written to the run
folder (pairs/{train,val,test}.jsonl), and the curves drawn from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmlab.data.preference import (
    SPLITS,
    Pair,
    PreferenceData,
    PreferenceFormat,
    encode_pairs,
    read_pairs,
    split_pairs,
    write_pairs,
)
from lmlab.errors import ConfigError, DataError
from lmlab.evaluation.plots import plot_lines, read_metrics, series
from lmlab.schema.dpo import PreferenceDataSection


def read_splits(d: PreferenceDataSection) -> tuple[dict[str, list[Pair]], dict[str, Any]]:
    """The seeded split of every file's pairs, with the caps applied after it (so the test set never moves),
    and what reading skipped. Runs before anything is written: bad data leaves an earlier run untouched."""
    if not d.paths:
        raise ConfigError("data.paths is empty: name the preference JSONL file(s), e.g. "
                          "data.paths=[${data_dir}/hh-rlhf-harmless-base/test.jsonl]")
    read = read_pairs(d.paths, d.format)
    splits = split_pairs(read.pairs, tuple(d.split), d.split_seed)
    if d.max_train:
        splits["train"] = splits["train"][:d.max_train]
    if d.max_eval:
        splits["val"], splits["test"] = splits["val"][:d.max_eval], splits["test"][:d.max_eval]
    info = {"pairs_read": len(read.pairs), "skipped": dict(read.skipped), "skipped_lines": read.skipped_where[:20]}
    return splits, info


def preference_format(d: PreferenceDataSection, tokenizer: Any) -> PreferenceFormat:
    return PreferenceFormat(tokenizer, d.template, d.system, d.max_len, d.max_prompt_len)


def encode_splits(splits: dict[str, list[Pair]], fmt: PreferenceFormat, out: Path) -> dict[str, PreferenceData]:
    """Token ids of every split; only once all encoded does the split go to out/pairs/<split>.jsonl."""
    data = {name: encode_pairs(pairs, fmt) for name, pairs in splits.items()}
    if not data["train"].pairs:
        raise DataError("no training pairs left after the split and the caps; check data.paths and data.max_train")
    for name in SPLITS:
        write_pairs(splits[name], out / "pairs" / f"{name}.jsonl")
    return data


def plot_curves(out: Path, metrics: list[str]) -> list[Path]:
    """plots/<metric>.png (train and validation against step) for each metric the run logged."""
    rows = read_metrics(out)
    paths = []
    for name in metrics:
        lines = {split: series(rows, name, split) for split in ("train", "val")}
        lines = {k: v for k, v in lines.items() if v[0]}
        if lines:
            paths.append(plot_lines(lines, out / "plots" / f"{name.replace('/', '_')}.png", title=name,
                                    xlabel="step", ylabel=name, markers=len(lines.get("train", ([],))[0]) < 20))
    return paths
