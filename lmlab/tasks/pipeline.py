"""The one-command pipeline (`lmlab pipeline RECIPE.yaml [stage.a.b=c ...]`): pretrain -> SFT -> reward ->
DPO -> verifier, seed 001's alignment pipeline, each stage's output model the next stage's input, then a report
card. The reward stage trains a scorer on the SFT model and passes that model on unchanged; DPO's generation
check samples against it (its win rate on the card).

A stage is one registry entry (`STAGES`): its recipe schema, its run function (the same one its own command
calls), and how its run folder becomes a model the next stage loads (pretraining: the final checkpoint;
SFT and DPO: the base with the adapter merged, `<stage>/model/`). Each stage runs in `<out_dir>/<stage>/`
through the training session, so a finished stage is skipped on re-run (after checking that its config did
not change) and a killed one resumes exactly from its last checkpoint; nothing of an earlier stage is ever
deleted or rewritten. Bad input fails before any stage runs, in one line naming the key or path (every
stage's data files are checked up front, so a typo in the verifier's path does not surface an hour in).

Pipeline folder: pipeline.yaml (resolved), stages.json (per stage: ran or skipped, wall time, peak memory),
<stage>/ run folders, card.json (what the report card measured) and report.md + report/ (lmlab/tasks/card.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmlab.adapters.files import load_adapter, save_merged
from lmlab.errors import CheckpointError, ConfigError, DataError, LmlabError
from lmlab.fileio import FolderLock, atomic_write_text
from lmlab.precision import peak_memory_mb, reset_peak_memory, resolve_device
from lmlab.schema.load import apply_overrides, changed_keys, interpolate, read_recipe, save_config, to_dict, validate
from lmlab.schema.pipeline import STAGE_ORDER, PipelineBase, pipeline_schema
from lmlab.schema.dpo import DPOConfig
from lmlab.schema.pretrain import PretrainConfig
from lmlab.schema.reward import RewardConfig
from lmlab.schema.sections import RecipeConfig
from lmlab.schema.sft import SFTConfig
from lmlab.schema.verifier import VerifierConfig
from lmlab.tasks.card import write_card
from lmlab.tasks.dpo import run_dpo
from lmlab.tasks.pretrain import run_pretrain
from lmlab.tasks.reward import run_reward
from lmlab.tasks.sft import run_sft
from lmlab.tasks.verifier import run_verifier
from lmlab.train.session import SUMMARY
from lmlab.train.state import Checkpointer
from lmlab.weights.hub import looks_like_hub_name
from lmlab.weights.loading import REGISTRY, load_model


@dataclass(frozen=True)
class Stage:
    """One kind of pipeline stage."""

    schema: type[RecipeConfig]
    run: Callable[[Any], Any]
    """The stage's task (what its own command runs): trains in cfg.out_dir, skips or resumes by itself."""
    output: Callable[[Any], Path | None]
    """The model the next stage loads, made from the finished run folder (None: the chain ends here)."""
    wire: Callable[[Any, str], None]
    """Writes the previous stage's output model into this stage's config."""
    inputs: tuple[str, ...] = ("model.spec",)
    """The keys `wire` sets: a recipe sets them only on the first stage of the chain."""
    done: Callable[[Any], bool] = lambda cfg: (Path(cfg.out_dir) / SUMMARY).is_file()
    """The run folder holds this stage's finished results."""
    passthrough: bool = False
    """The stage makes no new model (a scorer): the next stage gets this stage's input."""
    links: tuple[tuple[str, str], ...] = ()
    """(key, stage): the key is set to that stage's run folder when that stage is in the chain."""


def final_checkpoint(cfg: PretrainConfig) -> Path:
    """A pretraining run's last step checkpoint (model + config + tokenizer: a loadable lmlab folder)."""
    latest = Checkpointer(Path(cfg.out_dir) / "checkpoints").latest()
    if latest is None:
        raise CheckpointError(f"{cfg.out_dir}/checkpoints: no step checkpoint; the pretraining stage did not finish")
    return latest


def merged_adapter(cfg: Any, name: str) -> Path:
    """The stage's base with its adapter `name` merged, saved once as <run>/model (an lmlab checkpoint)."""
    out = Path(cfg.out_dir)
    dest, adapter = out / "model", out / "adapters" / name
    if (dest / "config.json").is_file():
        return dest
    if not adapter.is_dir():
        raise CheckpointError(f"{adapter}: the stage's adapter is missing (its run folder is incomplete); "
                              "it is the next stage's input model")
    loaded = load_model(cfg.model.spec, dtype=torch.float32, tokenizer=cfg.model.tokenizer or None,
                        overrides=cfg.model.overrides)
    load_adapter(loaded.model, adapter)
    save_merged(loaded.model, dest, tokenizer=loaded.tokenizer)
    return dest


def _set_spec(cfg: Any, spec: str) -> None:
    cfg.model.spec = spec


def _set_generator(cfg: VerifierConfig, spec: str) -> None:
    cfg.generator.spec, cfg.model.spec = spec, ""  # the verifier's backbone is the generator's model


def _verifier_done(cfg: VerifierConfig) -> bool:
    results = Path(cfg.out_dir) / "eval" / "results.json"
    return results.is_file() and json.loads(results.read_text()).get("settings") == to_dict(cfg.eval)


def _dpo_model(cfg: DPOConfig) -> Path:
    """DPO's policy: the full run's model/, or its base with the adapter merged."""
    return Path(cfg.out_dir) / "model" if cfg.dpo.method == "full" else merged_adapter(cfg, cfg.adapter)


STAGES: dict[str, Stage] = {
    "pretrain": Stage(PretrainConfig, run_pretrain, final_checkpoint, _set_spec),
    "sft": Stage(SFTConfig, run_sft, lambda c: merged_adapter(c, c.adapter or c.data.source), _set_spec),
    "reward": Stage(RewardConfig, run_reward, lambda c: None, _set_spec, passthrough=True),
    "dpo": Stage(DPOConfig, run_dpo, _dpo_model, _set_spec, links=(("eval.reward_model", "reward"),)),
    "verifier": Stage(VerifierConfig, run_verifier, lambda c: None, _set_generator,
                      ("generator.spec", "generator.adapter", "model.spec"), _verifier_done),
}


# ---------------------------------------------------------------------------------------------------- loading


def load_pipeline(path: str | Path | None, overrides: list[str] = ()) -> PipelineBase:
    """Read a pipeline file with `stage.a.b=c` overrides and check it whole: the stage names, every
    section against its stage's schema, the keys the chain sets, the first stage's model."""
    source = str(path) if path else "<defaults>"
    data = apply_overrides(read_recipe(path) if path else {}, list(overrides))
    names = data.get("stages", list(STAGE_ORDER))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: stages={names!r}: expected a list of stage names from {list(STAGE_ORDER)}")
    for name in names:
        if name not in STAGE_ORDER:
            raise ConfigError(f"{source}: stages: unknown stage {name!r}; known stages: {list(STAGE_ORDER)}")
    if len(set(names)) != len(names) or names != [n for n in STAGE_ORDER if n in names]:
        raise ConfigError(f"{source}: stages={names}: expected distinct stages in the order {list(STAGE_ORDER)}")
    schema = pipeline_schema({name: stage.schema for name, stage in STAGES.items()})
    cfg = validate(schema, interpolate(data, source), source)
    for i, name in enumerate(cfg.stages):
        section = getattr(cfg, name)
        if section is None:
            raise ConfigError(f"{source}: stage {name} is in stages but the file has no {name} section")
        if "out_dir" in section.model_fields_set:
            raise ConfigError(f"{source}: {name}.out_dir is set by the pipeline ({Path(cfg.out_dir) / name}); remove it")
        if i:
            for key in STAGES[name].inputs:
                if _is_set(section, key):
                    raise ConfigError(f"{source}: {name}.{key} is set by the pipeline ({_input_of(cfg.stages, i)}); "
                                      f"remove it, or make {name} the first stage")
        for key, other in STAGES[name].links:
            if other in cfg.stages and _is_set(section, key):
                raise ConfigError(f"{source}: {name}.{key} is set by the pipeline (the {other} stage's run folder, "
                                  f"{Path(cfg.out_dir) / other}); remove it, or drop {other} from stages")
        if getattr(section, "data", None) is not None:
            _check_data(f"{source}: {name}.data", section.data)
    if cfg.report.wikitext and not Path(cfg.report.wikitext).is_file():  # read at the end: checked now
        raise DataError(f"{source}: report.wikitext={cfg.report.wikitext}: no such file")
    first = cfg.stages[0]
    _check_model(f"{source}: {first}.{STAGES[first].inputs[0]}", _get(getattr(cfg, first), STAGES[first].inputs[0]))
    return cfg


def _input_of(names: list[str], i: int) -> str:
    """Where stage i's input model comes from: the last earlier stage that makes one (scorers pass it on)."""
    makers = [n for n in names[:i] if not STAGES[n].passthrough]
    return f"the output model of stage {makers[-1]}" if makers else f"the input model of stage {names[0]}"


def _get(section: Any, key: str) -> Any:
    for part in key.split("."):
        section = getattr(section, part)
    return section


def _is_set(section: Any, key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        if part not in section.model_fields_set:
            return False
        section = getattr(section, part)
    return last in section.model_fields_set and bool(getattr(section, last))


def _check_data(where: str, data: Any) -> None:
    """Every data file a stage section names must exist now (the stage would fail on it much later). Empty
    paths mean the shared data folder's default, `hf:` names are read online; those are the stage's to check."""
    for key in type(data).model_fields:
        if not key.endswith(("path", "paths")):
            continue
        value = getattr(data, key)
        for i, path in enumerate(value if isinstance(value, list) else [value]):
            if path and not path.startswith("hf:") and not Path(path).exists():
                index = f"[{i}]" if isinstance(value, list) else ""
                raise DataError(f"{where}.{key}{index}={path}: no such file")


def _check_model(where: str, spec: str) -> None:
    """A model spec that names a file or folder must exist (presets, registered and hub names aside)."""
    if spec.startswith("preset:") or spec in REGISTRY or Path(spec).exists() or looks_like_hub_name(spec):
        return
    raise CheckpointError(f"{where}={spec}: no such file or folder")


def stage_config(cfg: PipelineBase, name: str, input_model: Path | str | None) -> Any:
    """The stage's recipe as it runs here: out_dir in the pipeline folder, input model wired in."""
    stage_cfg = getattr(cfg, name).model_copy(deep=True)
    stage_cfg.out_dir = str(Path(cfg.out_dir) / name)
    if input_model is not None:
        STAGES[name].wire(stage_cfg, str(input_model))
    for key, other in STAGES[name].links:
        if other in cfg.stages:
            *parents, last = key.split(".")
            setattr(_get(stage_cfg, ".".join(parents)) if parents else stage_cfg, last, str(Path(cfg.out_dir) / other))
    return stage_cfg


# ---------------------------------------------------------------------------------------------------- running


def run_pipeline(cfg: PipelineBase, *, force_report: bool = False) -> dict[str, Any]:
    """Run the chain (finished stages skipped, killed ones resumed), then the report card."""
    out = Path(cfg.out_dir)
    lock = FolderLock(out)
    try:
        save_config(cfg, out / "pipeline.yaml")
        record_path = out / "stages.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        device = resolve_device("auto")
        previous: Path | str | None = None  # the model the next stage loads: a stage's output, or a first input
        for i, name in enumerate(cfg.stages):
            stage, stage_cfg = STAGES[name], stage_config(cfg, name, previous)
            if isinstance(previous, Path) and not previous.exists():
                raise CheckpointError(f"stage {name}: its input model {previous} ({_input_of(cfg.stages, i)}) "
                                      "is missing")
            try:
                if stage.done(stage_cfg):
                    changed = changed_keys(stage_cfg.out_dir, stage_cfg)
                    if changed:
                        raise ConfigError(f"{stage_cfg.out_dir} holds this stage's finished results under a different "
                                          f"config ({', '.join(changed[:8])}); use another out_dir or the same settings")
                    print(f"pipeline: stage {name} finished earlier ({stage_cfg.out_dir}); skipped")
                    record.setdefault(name, {})["last"] = "skipped"
                else:
                    print(f"pipeline: stage {name} -> {stage_cfg.out_dir}")
                    reset_peak_memory(device)
                    t0 = time.perf_counter()
                    stage.run(stage_cfg)
                    record[name] = {"last": "ran", "wall_s": time.perf_counter() - t0,
                                    "peak_mem_mb": peak_memory_mb(device), "out_dir": stage_cfg.out_dir}
                    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
                made = stage.output(stage_cfg)
            except LmlabError as err:
                raise LmlabError(f"stage {name}: {err}") from None
            if stage.passthrough:
                previous = previous if previous is not None else _get(stage_cfg, stage.inputs[0])
            else:
                previous = made
                if made is not None:
                    record[name]["model"] = str(made)
        atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
        report = write_card(cfg, {n: stage_config(cfg, n, None) for n in cfg.stages}, record, force=force_report)
    finally:
        lock.release()
    return {"stages": record, "report": str(report)}
