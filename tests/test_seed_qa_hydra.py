"""Seed 004 (QA adapters under Hydra): its README's commands, `python scripts/train.py task=mcq training=mcq`
... `python scripts/infer.py task=saq inference.use_stop_tokens=true`, run on lmlab with the seed's config
tree (configs/), writing outputs/adapters/adapter_{mcq,saq}/. Small-data options (a tiny model with
SmolLM2's tokenizer, a few questions, two steps) are added so each runs in seconds on a CPU."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.compat.qa_hydra import answer_settings, compose, infer_main, sft_config, train_main
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.paths import smollm2_gguf
from lmlab.tokenization import load_tokenizer
from lmlab.weights.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("hydra", reason="seed 004's commands need hydra-core (the `seeds` extra)")
REPO = Path(__file__).resolve().parent.parent



@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A working folder with a tiny model; the seed's two training commands have run in it."""
    root = tmp_path_factory.mktemp("seed004")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                    max_seq_len=512))
    save_checkpoint(model.eval(), root / "tiny", tokenizer=load_tokenizer(smollm2_gguf()))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for task in ("mcq", "saq"):
            assert train_main([f"task={task}", f"training={task}", *small(root)]) == 0
    return root


def small(root: Path) -> list[str]:
    return [f"model.name={root / 'tiny'}", "data.max_train=8", "data.max_eval=3", "training.max_steps=2"]


def test_the_seed_config_guide_defaults() -> None:
    cfg = compose([])
    assert cfg["lora"] == {"r": 16, "alpha": 32, "dropout": 0.05,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    t = cfg["training"]
    assert (t["epochs"], t["batch_size"], t["gradient_accumulation_steps"], t["learning_rate"]) == (3, 4, 4, 1e-4)
    assert (t["warmup_ratio"], t["scheduler"], t["val_ratio"], t["max_seq_length"]) == (0.1, "cosine", 0.15, 512)
    assert (t["fp16"], t["bf16"], t["logging_steps"], t["save_steps"], t["eval_steps"], t["save_total_limit"]) == \
        (True, False, 10, 100, 100, 2)
    assert cfg["inference"] == {"max_new_tokens": 64, "do_sample": False, "temperature": 0.0, "top_p": 1.0,
                                "use_stop_tokens": False, "validation": {"enabled": True, "max_retries": 2}}
    assert cfg["model"]["name"] == "smollm2-135m-instruct"  # offline by default
    assert compose(["model=mistral_7b"])["model"]["name"] == "mistralai/Mistral-7B-Instruct-v0.2"
    sft = sft_config(cfg)  # the same settings in lmlab's names
    assert (sft.lora.rank, sft.lora.alpha, sft.lora.target_modules) == (16, 32.0, ["wq", "wk", "wv", "wo"])
    assert (sft.train.grad_accum, sft.schedule.warmup_fraction, sft.data.max_len) == (4, 0.1, 512)
    assert (sft.checkpoint.every, sft.checkpoint.keep_last, sft.train.eval_every) == (100, 2, 100)
    assert sft.data.split == [510, 90, 100]  # val_ratio 0.15 of the recipe's train + validation 6/7


@pytest.mark.parametrize("task", ["mcq", "saq"])
def test_train_writes_the_adapter_where_the_seed_does(project: Path, task: str) -> None:
    folder = project / "outputs" / "adapters" / f"adapter_{task}"
    meta = json.loads((folder / "adapter_config.json").read_text())  # peft format, as the seed saves
    assert (meta["peft_type"], meta["r"], meta["lora_alpha"], meta["lora_dropout"]) == ("LORA", 16, 32.0, 0.05)
    assert sorted(meta["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert (folder / "adapter_model.safetensors").is_file()
    (run,) = (project / "outputs" / "runs").glob(f"{task}-*")
    assert json.loads((run / "summary.json").read_text())["train"]["steps"] == 2


def test_train_with_overridden_hyperparameters(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    argv = ["task=mcq", "training.epochs=4", "lora.r=8", "training.learning_rate=5e-5", *small(project)]
    sft = sft_config(compose(argv))
    assert (sft.train.epochs, sft.lora.rank, sft.optim.lr) == (4.0, 8, 5e-5)
    assert train_main(argv) == 0
    assert json.loads((project / "outputs" / "adapters" / "adapter_mcq" / "adapter_config.json").read_text())["r"] == 8
    assert len(list((project / "outputs" / "runs").glob("mcq-*"))) == 2  # its own run folder, not a resumed one
    assert train_main(["task=mcq", "training=mcq", *small(project)]) == 0  # the first settings: finished already


def test_train_on_a_hub_model_offline_is_one_error_from_the_repo_root(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "scripts/train.py", "task=mcq", "model=llama3_8b",
                           f"output_dir={tmp_path / 'outputs'}"], cwd=REPO, capture_output=True, text=True, check=False,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "meta-llama/Meta-Llama-3-8B-Instruct" in done.stderr
    assert not (tmp_path / "outputs").exists()


def test_bad_overrides_name_the_seed_key(project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    assert train_main(["task=mcq", "lora.rnak=8"]) == 1
    assert "lora.rnak" in capsys.readouterr().err
    assert train_main(["task=mcq", "training.batch_size=0"]) == 1
    assert "error: training.batch_size=0: expected >= 1" in capsys.readouterr().err


def read_answers(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_infer_answers_the_test_split(project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    assert infer_main(["task=saq", "mode=infer", "inference.max_new_tokens=8", *small(project)]) == 0
    rows = read_answers(project / "outputs" / "predictions" / "saq_test.csv")
    assert len(rows) == 3 and all(1 <= int(r["attempts"]) <= 3 for r in rows)  # validation on: up to 2 retries
    assert "3 answers -> outputs/predictions/saq_test.csv" in capsys.readouterr().out


def test_inference_keys_become_the_qa_settings() -> None:
    spec, first, retries = answer_settings(compose(["task=saq"]))
    assert (spec.max_new_tokens, spec.stop_strings, first.temperature, retries) == (64, (), 0.0, 2)
    assert spec.validator("The answer is Paris, of course", {}) is None  # the SAQ validator
    spec, _, _ = answer_settings(compose(["task=saq", "inference.use_stop_tokens=true"]))
    assert spec.stop_strings == ("\n",)
    spec, _, retries = answer_settings(compose(["task=mcq", "inference.validation.enabled=false"]))
    assert retries == 0 and spec.validator(" The answer is B ", {}) == "The answer is B"
    sampled = ["inference.do_sample=true", "inference.temperature=0.7", "inference.top_p=0.9"]
    _, first, _ = answer_settings(compose(sampled))
    assert (first.temperature, first.top_p) == (0.7, 0.9)


def test_infer_without_validation_keeps_the_raw_first_answer(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project)
    argv = ["task=mcq", "inference.validation.enabled=false", "inference.max_new_tokens=6"]
    assert infer_main([*argv, *small(project)]) == 0
    rows = read_answers(project / "outputs" / "predictions" / "mcq_test.csv")
    assert len(rows) == 3 and all(r["attempts"] == "1" and r["valid"] == "1" for r in rows)


def test_infer_with_stop_tokens_and_scores(project: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(project)
    argv = ["task=saq", "inference.use_stop_tokens=true", "inference.validation.max_retries=0", "mode=eval",
            "inference.max_new_tokens=16"]
    assert infer_main([*argv, *small(project)]) == 0
    assert all("\n" not in r["answer"] for r in read_answers(project / "outputs" / "predictions" / "saq_test.csv"))
    scores = json.loads((project / "outputs" / "predictions" / "saq_scores.json").read_text())
    assert scores["n"] == 3 and {"exact_match", "f1"} <= set(scores)
    assert json.loads(capsys.readouterr().out)["n"] == 3  # mode=eval prints the scores
