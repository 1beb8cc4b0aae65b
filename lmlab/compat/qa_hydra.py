"""Seed 004's Hydra command lines (the QA adapters), unchanged, on lmlab:

    python scripts/train.py task=mcq training=mcq
    python scripts/train.py task=mcq training.epochs=4 lora.r=8 training.learning_rate=5e-5
    python scripts/train.py task=mcq model=llama3_8b
    python scripts/infer.py task=saq mode=infer inference.use_stop_tokens=true
    python scripts/infer.py task=mcq inference.validation.enabled=false

The configuration is the seed's own tree (configs/config.yaml with the model/, lora/, training/ and
inference/ groups; its key names and defaults), composed by Hydra's compose API (hydra-core): group
choices (`model=llama3_8b`), dotted overrides, unknown keys refused by name. It is then written as lmlab's
SFT recipe for the task (recipes/qa/<task>-smollm2.yaml gives the data, the split and the prompt template)
and trained by `lmlab.tasks.sft.run_sft`; the adapter is copied, in the peft format the seed saves, to
<output_dir>/adapters/adapter_<task>/. Inference answers the task's test split through `lmlab.tasks.qa`
(stop strings, the task's validator, retries). The translation, seed key -> lmlab key:

    model.name -> model.spec            lora.r -> lora.rank, alpha, dropout, target_modules (q_proj -> wq ...)
    training.epochs -> train.epochs     batch_size -> train.batch_size, gradient_accumulation_steps -> grad_accum
    learning_rate -> optim.lr           warmup_ratio -> schedule.warmup_fraction, scheduler -> schedule.kind
    val_ratio -> data.split             max_seq_length -> data.max_len, fp16/bf16 -> precision.dtype
    logging_steps -> logging.log_every  save_steps -> checkpoint.every, save_total_limit -> checkpoint.keep_last
    eval_steps -> train.eval_every      max_steps (-1 = epochs) -> train.max_steps

Each distinct configuration trains in its own run folder (<output_dir>/runs/<task>-<hash>), so a changed
setting never resumes another run's checkpoints; the same command again resumes or reports it finished.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmlab.adapters.files import load_adapter
from lmlab.adapters.lora import set_active_adapter
from lmlab.errors import CheckpointError, ConfigError, LmlabError
from lmlab.fileio import atomic_replace_dir, atomic_write_text
from lmlab.generation.sampling import SamplingConfig
from lmlab.precision import Precision, resolve_device
from lmlab.schema.load import load_config
from lmlab.schema.sft import SFTConfig
from lmlab.tasks.qa import TASKS, TaskSpec, answer_with_retry, score
from lmlab.tasks.sft import load_splits, make_template, run_sft
from lmlab.weights.hf import LLAMA_LAYER
from lmlab.weights.hub import looks_like_hub_name, snapshot
from lmlab.weights.loading import REGISTRY, load_model

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
"""The seed's config tree in the repository (scripts/ beside it)."""
MODULES = {hf.rsplit(".", 1)[-1]: lm.rsplit(".", 1)[-1] for hf, lm in LLAMA_LAYER.items() if hf.endswith("_proj")}
"""Hugging Face projection names -> lmlab's (q_proj -> wq, gate_proj -> w1, ...), from the one HF name table."""
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant", "constant_with_warmup": "constant"}
KEY_NAMES = {  # lmlab key -> the seed's, for error messages
    "model.spec": "model.name", "lora.rank": "lora.r", "train.epochs": "training.epochs",
    "train.batch_size": "training.batch_size", "train.grad_accum": "training.gradient_accumulation_steps",
    "optim.lr": "training.learning_rate", "schedule.warmup_fraction": "training.warmup_ratio",
    "data.max_len": "training.max_seq_length", "logging.log_every": "training.logging_steps",
    "checkpoint.every": "training.save_steps", "train.eval_every": "training.eval_steps",
    "checkpoint.keep_last": "training.save_total_limit", "train.max_steps": "training.max_steps",
    "lora.dropout": "lora.dropout", "lora.alpha": "lora.alpha",
}


# ---------------------------------------------------------------------------------------------------- config

def compose(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """The seed's config with the command line's overrides, resolved to plain data. `training` follows
    `task` unless the command names a training group itself."""
    from hydra import compose as hydra_compose  # optional dependency: the seed-004 extra
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    overrides = list(argv)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.3", job_name="lmlab"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
            if not any(o.split("=", 1)[0].lstrip("+~") == "training" for o in overrides):
                _task(cfg)
                cfg = hydra_compose(config_name="config", overrides=[*overrides, f"training={cfg.task}"])
            return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        why = str(err.__cause__).splitlines()[0] if err.__cause__ else ""  # e.g. "Key 'rnak' is not in struct"
        raise ConfigError(" ".join(f"{err} {why}".split())) from None


def _task(cfg: Any) -> str:
    if cfg["task"] not in TASKS:
        raise ConfigError(f"task={cfg['task']!r}: expected one of {sorted(TASKS)}")
    return cfg["task"]


def _model_spec(name: str) -> str:
    """A local spec as is; a hub name (model=mistral_7b, llama3_8b) downloaded first, so an unreachable hub is
    one error before anything is written."""
    if name in REGISTRY or Path(name).exists() or name.startswith("preset:") or not looks_like_hub_name(name):
        return name
    return str(snapshot(name))


def _dtype(t: dict[str, Any], device: str) -> str:
    if t["fp16"] and t["bf16"]:
        raise ConfigError("training.fp16 and training.bf16 are both true: pick one")
    if t["bf16"]:
        return "bf16"
    if not t["fp16"]:
        return "fp32"
    if resolve_device(device).type == "cuda":
        return "fp16"
    print("note: training.fp16 needs CUDA; training in bf16 autocast on this CPU where it has native bf16, "
          "else in fp32", file=sys.stderr)
    return "auto"


def _targets(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in MODULES and n not in MODULES.values()]
    if unknown:
        raise ConfigError(f"lora.target_modules: unknown module(s) {unknown}; expected some of {sorted(MODULES)}")
    return [MODULES.get(n, n) for n in names]


def recipe_overrides(cfg: dict[str, Any]) -> list[str]:
    """The seed's settings as lmlab SFT overrides (see the module docstring's table)."""
    task, t, lora = _task(cfg), cfg["training"], cfg["lora"]
    if t["scheduler"] not in SCHEDULERS:
        raise ConfigError(f"training.scheduler={t['scheduler']!r}: expected one of {sorted(SCHEDULERS)}")
    if not 0 <= t["val_ratio"] < 1:
        raise ConfigError(f"training.val_ratio={t['val_ratio']!r}: expected 0 <= val_ratio < 1")
    # the recipe's test share (1/7) stays; the other 6/7 are cut train : validation by val_ratio
    split = [round(600 * (1 - t["val_ratio"])), round(600 * t["val_ratio"]), 100]
    warmup = 0.0 if t["scheduler"] == "constant" else t["warmup_ratio"]
    values = {
        "adapter": task, "model.spec": cfg["model"]["name"], "lora.rank": lora["r"], "lora.alpha": lora["alpha"],
        "lora.dropout": lora["dropout"], "lora.target_modules": _targets(lora["target_modules"]),
        "train.epochs": t["epochs"], "train.batch_size": t["batch_size"],
        "train.grad_accum": t["gradient_accumulation_steps"], "train.max_steps": max(t["max_steps"], 0),
        "train.eval_every": t["eval_steps"], "optim.lr": t["learning_rate"],
        "schedule.kind": SCHEDULERS[t["scheduler"]], "schedule.warmup_fraction": warmup, "data.split": split,
        "data.max_len": t["max_seq_length"],
        "data.max_train": cfg["data"]["max_train"], "data.max_eval": cfg["data"]["max_eval"],
        "logging.log_every": t["logging_steps"], "checkpoint.every": t["save_steps"],
        "checkpoint.keep_last": t["save_total_limit"], "precision.dtype": _dtype(t, "auto"), "export_peft": True,
    }
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def sft_config(cfg: dict[str, Any], config_dir: Path = CONFIG_DIR) -> SFTConfig:
    """lmlab's SFT recipe for the task with the seed's settings, in a run folder named by their hash."""
    overrides = recipe_overrides(cfg)
    digest = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    out_dir = Path(cfg["output_dir"]) / "runs" / f"{cfg['task']}-{digest}"
    recipe = Path(cfg["recipe"])
    recipe = recipe if recipe.is_absolute() else config_dir.parent / recipe
    try:
        sft = load_config(recipe, [*overrides, f"out_dir={json.dumps(str(out_dir))}"], schema=SFTConfig)
    except ConfigError as err:
        raise ConfigError(_seed_names(str(err).removeprefix(f"{recipe}: "))) from None
    return sft


def _seed_names(message: str) -> str:
    """An lmlab error message with the seed's key names (train.epochs -> training.epochs)."""
    pattern = "|".join(re.escape(k) for k in sorted(KEY_NAMES, key=len, reverse=True))
    return re.sub(rf"\b({pattern})\b", lambda m: KEY_NAMES[m.group(1)], message)


def adapter_dir(cfg: dict[str, Any]) -> Path:
    return Path(cfg["output_dir"]) / "adapters" / f"adapter_{cfg['task']}"


# ---------------------------------------------------------------------------------------------------- train

def train(cfg: dict[str, Any], config_dir: Path = CONFIG_DIR) -> Path:
    """Train the task's adapter; returns <output_dir>/adapters/adapter_<task>/ (peft format where the model
    has a Hugging Face twin, else lmlab's)."""
    name = cfg["model"]["name"]
    cfg["model"]["name"] = _model_spec(name)
    sft = sft_config(cfg, config_dir)
    summary = run_sft(sft)
    folder = Path(sft.out_dir) / "adapters"
    source = folder / f"{sft.adapter}-peft"
    peft = source.is_dir()
    source = source if peft else folder / sft.adapter

    def build(tmp: Path) -> None:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        if peft and name != cfg["model"]["name"]:  # a hub model: peft's PeftModel finds its base by this name
            meta = json.loads((tmp / "adapter_config.json").read_text())
            (tmp / "adapter_config.json").write_text(json.dumps({**meta, "base_model_name_or_path": name}, indent=2))

    target = adapter_dir(cfg)
    atomic_replace_dir(build, target)
    print(f"adapter {sft.adapter} -> {target} (run folder {sft.out_dir}, train_loss "
          f"{summary['train']['train_loss']:.4f})")
    return target


# ---------------------------------------------------------------------------------------------------- infer

def _accept(text: str, record: Any) -> str:
    """inference.validation.enabled=false: every output is taken as it is."""
    return text.strip()


def answer_settings(cfg: dict[str, Any]) -> tuple[TaskSpec, SamplingConfig, int]:
    """The `inference` group as lmlab's QA settings: the task spec (validator, token budget, stop strings),
    the first attempt's sampling and the number of retries."""
    task, inf = _task(cfg), cfg["inference"]
    check = inf["validation"]
    spec = TaskSpec(task, TASKS[task].validator if check["enabled"] else _accept, inf["max_new_tokens"],
                    ("\n",) if inf["use_stop_tokens"] else ())
    first = SamplingConfig(temperature=inf["temperature"], top_p=inf["top_p"] if inf["top_p"] < 1 else None) \
        if inf["do_sample"] else SamplingConfig(temperature=0.0)
    return spec, first, check["max_retries"] if check["enabled"] else 0


def infer(cfg: dict[str, Any], config_dir: Path = CONFIG_DIR) -> dict[str, Any]:
    """Answer the task's test questions with its adapter; write them (and, for mode=eval, the scores)."""
    task = _task(cfg)
    if cfg["mode"] not in ("infer", "eval"):
        raise ConfigError(f"mode={cfg['mode']!r}: expected infer (answer the test questions) or eval (also score)")
    folder = adapter_dir(cfg)
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: no adapter; train it first: python scripts/train.py task={task}")
    cfg["model"]["name"] = _model_spec(cfg["model"]["name"])
    sft = sft_config(cfg, config_dir)
    _, _, test = load_splits(sft)
    precision = Precision(resolve_device(sft.precision.device), sft.precision.dtype)
    loaded = load_model(sft.model.spec, device=precision.device, tokenizer=sft.model.tokenizer or None)
    load_adapter(loaded.model, folder, name=task)
    set_active_adapter(loaded.model, task)
    spec, first, retries = answer_settings(cfg)
    print(f"answering {len(test)} {task} test questions with {folder} ...", file=sys.stderr, flush=True)
    with precision.autocast():
        answers = answer_with_retry(loaded.model, loaded.tokenizer, test, spec, make_template(sft.data),
                                    max_retries=retries, first=first)
    out = Path(cfg["output_dir"]) / "predictions"
    atomic_write_text(out / f"{task}_test.csv", _csv(test, answers))
    result = score(task, test, answers)
    brief = {k: v for k, v in result.items() if k != "correct"}
    if cfg["mode"] == "eval":
        atomic_write_text(out / f"{task}_scores.json", json.dumps(result, indent=2) + "\n")
        print(json.dumps(brief, indent=2))
    else:
        print(f"{len(test)} answers -> {out / f'{task}_test.csv'} (valid at once {brief['valid_first_try']:.3f}, "
              f"after retries {brief['valid_after_retry']:.3f})")
    return result


def _csv(records: Sequence[Any], answers: Sequence[Any]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "question", "answer", "valid", "attempts", "reference"])
    for i, (r, a) in enumerate(zip(records, answers)):
        writer.writerow([i, r["instruction"], a.text, int(a.valid), a.attempts, r["output"]])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- entry points

def _main(run: Any, argv: Sequence[str] | None, config_dir: Path) -> int:
    try:
        run(compose(sys.argv[1:] if argv is None else argv, config_dir), config_dir)
    except LmlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def train_main(argv: Sequence[str] | None = None, config_dir: Path = CONFIG_DIR) -> int:
    """scripts/train.py."""
    return _main(train, argv, config_dir)


def infer_main(argv: Sequence[str] | None = None, config_dir: Path = CONFIG_DIR) -> int:
    """scripts/infer.py."""
    return _main(infer, argv, config_dir)


__all__ = ["answer_settings", "compose", "infer", "infer_main", "recipe_overrides", "sft_config", "train", "train_main"]
