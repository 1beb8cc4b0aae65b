"""Seed 001's extras: samples from every checkpoint side by side (`lmlab evaluate RUN --samples`), the GPT-2
LoRA SST-2 baseline recipe (run offline on a random GPT-2 shape). Few-shot prompting from the CLI
(`lmlab qa eval --shots K`) is tested in tests/test_cli_edges.py, the 12 GB recipe's dry run in
tests/test_memory.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.generation.generate import GenerationConfig, generate
from lmlab.generation.sampling import SamplingConfig
from lmlab.weights.loading import load_model
from tests.test_plots import tiny_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_info:
        return exit_info.code
    return 0



def test_samples_from_every_checkpoint_side_by_side(tmp_path: Path, shared_data: Path, capsys) -> None:
    from helpers import run_recipe

    run_dir = run_recipe(tiny_recipe(tmp_path, shared_data), ["train.max_steps=4", "checkpoint.every=2"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\n\nFirst Citizen:\n")
    assert run(["evaluate", str(run_dir), "--samples", str(prompts), "--samples", "KING", "--max-new-tokens", "12",
                "--seed", "3"]) == 0
    table = (run_dir / "eval" / "samples.md").read_text()
    assert table in capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert lines[0] == "| prompt | step 2 | step 4 | best (step 4) |"
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| ROMEO:", "| First Citizen:", "| KING"]
    # each cell is that checkpoint's own continuation, with the same seed and settings for all
    loaded = load_model(run_dir / "checkpoints" / "step_0000002")
    gen = GenerationConfig(12, SamplingConfig(temperature=0.8, top_k=40), seed=3)
    texts = generate(loaded.model, loaded.tokenizer, ["ROMEO:", "First Citizen:", "KING"], gen)  # one batch
    want = texts[2].replace("\n", "<br>").replace("|", "\\|")
    assert lines[-1].split(" | ")[1] == want


def test_gpt2_lora_sst2_recipe_runs_offline_on_a_gpt2_shape(tmp_path: Path, shared_data: Path, capsys) -> None:
    out = tmp_path / "run"
    assert run(["classify", "recipes/classify/sst2-lora-gpt2.yaml", "model.spec=preset:gpt2-124m",
                f"model.tokenizer={shared_data / 'gpt2-tokenizer'}", "model.n_layers=2", "data.max_train=32",
                "data.max_eval=16", "train.max_steps=2", "logging.progress=false", "precision.dtype=fp32",
                f"out_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["dev"]["n"] == 16 and summary["train"]["steps"] == 2
    assert len(summary["dev"]["confusion"]) == 2  # SST-2: negative / positive
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["lora"]["target_modules"]) == ["w2", "wk", "wo", "wq", "wv"]  # c_attn and c_proj
    assert "head" in adapter["lora"]["trainable"]
