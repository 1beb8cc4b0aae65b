"""Every numeric recipe key has a range, checked when the recipe loads, in every recipe kind: each value
outside it (and each value of the wrong type) is a one-line error naming the key, from the real command
line, before any work starts (no traceback, no run that trains nothing)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import annotated_types as at
import pytest
from pydantic import BaseModel

from lmlab.cli import main
from lmlab.model.config import RANGES
from lmlab.schema.classify import ClassifyConfig
from lmlab.schema.load import load_config
from lmlab.schema.pretrain import PretrainConfig
from lmlab.schema.sft import SFTConfig

REPO = Path(__file__).resolve().parent.parent
KINDS = {  # command -> (schema, a shipped recipe)
    "run": (PretrainConfig, "recipes/pretrain/shakespeare-char.yaml"),
    "sft": (SFTConfig, "recipes/sft/alpaca-lora-smollm2.yaml"),
    "classify": (ClassifyConfig, "recipes/classify/sst5-lora-smollm2.yaml"),
}


def _bad_values(info: Any) -> list[Any]:
    """Values just outside a field's declared range, plus one of the wrong type."""
    out: list[Any] = []
    for m in info.metadata:
        if isinstance(m, at.Ge):
            out.append(m.ge - 1 if isinstance(m.ge, int) else m.ge - 0.5)
        elif isinstance(m, at.Gt):
            out.append(m.gt)
        elif isinstance(m, at.Lt):
            out.append(m.lt)
        elif isinstance(m, at.Le):
            out.append(m.le + 1)
    return [*out, "abc"]


def numeric_cases(schema: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(key, bad value) for every int/float field of a recipe schema, nested sections included."""
    cases = []
    for name, info in schema.model_fields.items():
        tp = info.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            cases += numeric_cases(tp, f"{prefix}{name}.")
            continue
        text = str(tp)
        if tp in (int, float) or text in ("int | None", "float | None"):
            cases += [(f"{prefix}{name}", v) for v in _bad_values(info)]
        elif "list[" in text and ("float" in text or "int" in text):  # betas, split: length and item ranges
            cases += [(f"{prefix}{name}", [0.5]), (f"{prefix}{name}", ["x", "y"])]
    return cases


MODEL_CASES = [(f"model.{k}", lo - 1 if lo_in and math.isfinite(lo) else lo) for k, (lo, _, lo_in, _, _) in RANGES.items()]
CASES = [(cmd, key, value) for cmd, (schema, _) in KINDS.items() for key, value in numeric_cases(schema)]
CASES += [(cmd, key, value) for cmd in KINDS for key, value in MODEL_CASES]


def test_every_kind_has_numeric_keys_with_ranges():
    for cmd, (schema, _) in KINDS.items():
        keys = {k for c, k, _ in CASES if c == cmd}
        assert {"train.batch_size", "train.grad_accum", "optim.lr", "logging.log_every", "checkpoint.every"} <= keys
    assert ("run", "train.grad_accum", 0) in CASES and ("sft", "lora.dropout", 1.0) in CASES


@pytest.mark.parametrize("cmd, key, value", CASES, ids=[f"{c}-{k}={v!r}" for c, k, v in CASES])
def test_bad_numeric_value_is_a_one_line_error_naming_the_key(cmd, key, value, capsys, shared_data):
    _, recipe = KINDS[cmd]
    text = repr(value) if isinstance(value, str) else str(value).replace(" ", "")
    with pytest.raises(SystemExit) as exit_:
        main([cmd, str(REPO / recipe), f"{key}={text}", "out_dir=/nonexistent/never-written"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert key in err and err.startswith(f"lmlab {cmd}: error: "), err
    assert not Path("/nonexistent/never-written").exists()


def test_grad_accum_zero_no_longer_trains_nothing():
    """The case the reliability campaign found: accumulation 0 used to "succeed" with loss 0.0."""
    with pytest.raises(Exception, match=r"train\.grad_accum=0: expected >= 1"):
        load_config(REPO / KINDS["run"][1], ["train.grad_accum=0"], schema=PretrainConfig)
