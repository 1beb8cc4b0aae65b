"""The one-command pipeline: a tiny pretrain -> SFT -> reward -> DPO -> verifier chain runs end to end with its report card,
re-runs skip every stage, a stage killed with SIGKILL resumes on the same loss curve, and bad input is one
line naming the key or path (before any stage runs, or after, keeping earlier stages' results)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lmlab.cli import main
from lmlab.schema.load import load_config
from lmlab.tasks.pipeline import STAGES, load_pipeline, run_pipeline

REPO = Path(__file__).resolve().parent.parent
CHAIN = ["pretrain", "sft", "reward", "dpo", "verifier"]
"""The tiny pipeline's stages: the whole chain."""


def tiny_pipeline(folder: Path, data: Path) -> Path:
    """A pipeline file whose stages take seconds: a 1-layer modern decoder, a few steps each."""
    quiet = {"progress": False, "log_every": 1}
    recipe = {
        "out_dir": str(folder / "pipe"),
        "stages": CHAIN,
        "pretrain": {
            "model": {"spec": "preset:modern-decoder", "dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
                      "max_seq_len": 256},
            "data": {"path": str(data / "tinystories" / "tinystories_sample.txt"),
                     "extra_paths": [str(data / "wikitext-2" / "valid.txt")], "tokenizer": str(data / "gpt2-tokenizer"),
                     "seq_len": 32, "val_batches": 2},
            "train": {"max_steps": 4, "batch_size": 2, "eval_every": 2, "threads": 1},
            "checkpoint": {"every": 2}, "logging": quiet},
        "sft": {
            "adapter": "alpaca", "export_peft": False,
            "data": {"source": "alpaca", "paths": [str(data / "alpaca" / "alpaca_tiny.json")], "max_train": 8,
                     "max_eval": 4, "max_len": 96},
            "lora": {"rank": 4, "alpha": 8}, "train": {"max_steps": 4, "batch_size": 2, "grad_accum": 1},
            "checkpoint": {"every": 2}, "precision": {"dtype": "fp32"},
            "eval": {"perplexity": False, "instructions": []}, "logging": quiet},
        "reward": {
            "data": {"paths": [str(data / "hh-rlhf-harmless-base" / "test.jsonl")], "max_train": 8, "max_eval": 4,
                     "max_len": 96, "max_prompt_len": 48},
            "lora": {"rank": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1},
            "checkpoint": {"every": 2}, "precision": {"dtype": "fp32"}, "logging": quiet},
        "dpo": {
            "adapter": "dpo", "export_peft": False,
            "data": {"paths": [str(data / "hh-rlhf-harmless-base" / "test.jsonl")], "max_train": 8, "max_eval": 4,
                     "max_len": 96, "max_prompt_len": 48},
            "lora": {"rank": 4, "alpha": 8}, "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1},
            "checkpoint": {"every": 2}, "precision": {"dtype": "fp32"}, "logging": quiet,
            "eval": {"prompts": 3, "max_new_tokens": 4, "generation_batch_size": 3}},
        "verifier": {
            "generator": {"samples": 2, "max_new_tokens": 6, "dtype": "fp32"},
            "data": {"problems": 4, "heldout": 0.5, "template": "alpaca", "max_len": 320},
            "lora": {"rank": 2, "alpha": 4}, "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1},
            "precision": {"dtype": "fp32"}, "logging": quiet,
            "eval": {"problems": 2, "samples": 2, "n": [1, 2], "subsets": 2}},
        "report": {"ppl_tokens": 128, "ppl_context": 32, "alpaca_records": 2, "prompts": ["Name a color."],
                   "max_new_tokens": 4},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_data) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pipeline")
    recipe = tiny_pipeline(folder, shared_data)
    run_pipeline(load_pipeline(recipe))
    return recipe, folder / "pipe"


def _curve(run: Path) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "split" not in x}


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(finished):
    _, out = finished
    record = json.loads((out / "stages.json").read_text())
    assert [record[s]["last"] for s in CHAIN] == ["ran"] * len(CHAIN)
    assert all(record[s]["wall_s"] > 0 and record[s]["peak_mem_mb"] > 0 for s in record)
    # each stage's output model is the next one's input
    pretrained = record["pretrain"]["model"]
    assert pretrained.endswith("checkpoints/step_0000004")
    assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["model"]["spec"] == pretrained
    verifier_cfg = yaml.safe_load((out / "verifier" / "config.yaml").read_text())
    assert verifier_cfg["generator"]["spec"] == record["dpo"]["model"] == str(out / "dpo" / "model")
    assert (out / "sft" / "model" / "model.safetensors").is_file()
    assert len(_curve(out / "pretrain")) == 4 and len(_curve(out / "sft")) == 4
    results = json.loads((out / "verifier" / "eval" / "results.json").read_text())
    assert results["n"] == [1, 2] and set(results["accuracy"]) == {"greedy", "majority", "verifier", "weighted", "oracle"}
    card = json.loads((out / "card.json").read_text())
    assert list(card["models"]) == ["pretrain", "sft", "dpo"]  # the reward stage makes no model
    assert all(m["wikitext_ppl"] > 1 and "alpaca_conditional_ppl" in m and len(m["answers"]) == 1
               for m in card["models"].values())
    report = (out / "report.md").read_text()
    for part in ("## Stages", "## Language modelling", "## Verifier (GSM8K best-of-N)", "| verifier best-of-N |",
                 "![bestofn](verifier/eval/bestofn.png)", "![loss_sft](report/loss_sft.png)", "### Name a color."):
        assert part in report
    assert (out / "report" / "loss_pretrain.png").is_file()
    # the reward model is trained on SFT's merged model, which goes on unchanged to DPO as policy and reference;
    # DPO's generation check samples against the reward stage; the card reports both stages' held-out pairs
    dpo_cfg = yaml.safe_load((out / "dpo" / "config.yaml").read_text())
    assert yaml.safe_load((out / "reward" / "config.yaml").read_text())["model"]["spec"] == record["sft"]["model"]
    assert dpo_cfg["model"]["spec"] == record["sft"]["model"] and "model" not in record["reward"]
    assert dpo_cfg["eval"]["reward_model"] == str(out / "reward")
    assert len(_curve(out / "dpo")) == 2 and len(_curve(out / "reward")) == 2
    dpo, reward = card["stages"]["dpo"], card["stages"]["reward"]
    summary = json.loads((out / "dpo" / "summary.json").read_text())
    assert dpo["reward_accuracy"] == summary["after"]["test"]["implicit_accuracy"]
    assert 0 <= dpo["reward_accuracy"]["value"] <= 1 and dpo["reward_accuracy"]["n"] > 0
    assert dpo["win_rate"] == summary["generation"]["win_rate"] and summary["generation"]["n"] == 3
    assert reward["accuracy"] == json.loads((out / "reward" / "summary.json").read_text())["test"]["accuracy"]
    assert "## DPO" in report and "held-out implicit-reward accuracy after: " in report
    assert f"win rate against the reference under the reward model: {dpo['win_rate']['value']:.3f}" in report
    assert f"## Reward model\n\n- held-out pairs, accuracy (chosen scored higher): {reward['accuracy']['value']:.3f}" in report


@pytest.mark.slow
def test_rerun_skips_every_stage_and_keeps_the_report(finished, capsys):
    recipe, out = finished
    before = {s: (out / s / "metrics.jsonl").read_text() for s in CHAIN}
    report = (out / "report.md").read_text()
    capsys.readouterr()
    run_pipeline(load_pipeline(recipe))
    printed = capsys.readouterr().out
    for stage in CHAIN:
        assert f"stage {stage} finished earlier" in printed
        assert (out / stage / "metrics.jsonl").read_text() == before[stage]
    assert "report.md exists; kept (--force rewrites it)" in printed and (out / "report.md").read_text() == report
    record = json.loads((out / "stages.json").read_text())
    assert [record[s]["last"] for s in record] == ["skipped"] * len(CHAIN) and record["sft"]["wall_s"] > 0
    with pytest.raises(SystemExit) as exit_:  # a changed stage config is refused, naming the key
        main(["pipeline", str(recipe), "sft.lora.rank=8"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage sft:" in err and "lora.rank: 4 -> 8" in err


KILLER = textwrap.dedent("""
    import os, signal, sys
    import lmlab.tasks.sft as sft
    calls = 0
    real_loss = sft.lm_loss

    def loss_then_die(model, batch):  # SIGKILL inside SFT step 4, after its step-2 checkpoint
        global calls
        calls += 1
        if calls == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_loss(model, batch)

    sft.lm_loss = loss_then_die
    from lmlab.tasks.pipeline import load_pipeline, run_pipeline
    run_pipeline(load_pipeline(sys.argv[1], sys.argv[2:]))
""")


@pytest.mark.slow
def test_killed_stage_resumes_and_a_missing_input_model_is_named(finished, tmp_path, capsys):
    recipe, reference = finished
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(recipe), f"out_dir={out}"], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "sft" / "checkpoints" / "step_0000002").is_dir() and not (out / "sft" / SUMMARY_FILE).exists()
    run_pipeline(load_pipeline(recipe, [f"out_dir={out}"]))
    printed = capsys.readouterr().out
    assert "stage pretrain finished earlier" in printed and "resuming from" in printed
    a, b = _curve(reference / "sft"), _curve(out / "sft")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    # a finished stage whose output model went missing: one line naming it; earlier results stay
    pretrain_metrics = (out / "pretrain" / "metrics.jsonl").read_text()
    for gone in (out / "sft" / "model", out / "sft" / "adapters"):
        for f in sorted(gone.rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
        gone.rmdir()
    with pytest.raises(SystemExit):
        main(["pipeline", str(recipe), f"out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage sft:" in err and str(out / "sft" / "adapters" / "alpaca") in err
    assert (out / "pretrain" / "metrics.jsonl").read_text() == pretrain_metrics
    assert (out / "sft" / SUMMARY_FILE).is_file() and (out / "verifier" / "eval" / "results.json").is_file()


SUMMARY_FILE = "summary.json"

BAD = [
    (["stages=[pretrain,foo]"], "stages: unknown stage 'foo'; known stages: ['pretrain', 'sft', 'reward', 'dpo', 'verifier']"),
    (["stages=[sft,pretrain]"], "expected distinct stages in the order"),
    (["sft.train.max_stepz=3"], "unknown key sft.train.max_stepz; known keys of sft.train"),
    (["bogus.x=1"], "unknown key bogus; known keys of the recipe"),
    (["report.ppl_tokens=-1"], "report.ppl_tokens=-1: expected >= 0"),
    (["sft.model.spec=somewhere"], "sft.model.spec is set by the pipeline (the output model of stage pretrain)"),
    (["verifier.generator.spec=x"], "verifier.generator.spec is set by the pipeline"),
    (["sft.out_dir=elsewhere"], "sft.out_dir is set by the pipeline"),
    (["stages=[sft,verifier]", "sft.model.spec=/nonexistent/model"], "sft.model.spec=/nonexistent/model: no such file"),
    (["stages=[pretrain,sft,verifier,sft]"], "expected distinct stages"),
    (["dpo.model.spec=x"], "dpo.model.spec is set by the pipeline (the output model of stage sft)"),
    (["dpo.dpo.beta=0"], "dpo.dpo.beta=0"),
    (["reward.model.spec=x"], "reward.model.spec is set by the pipeline (the output model of stage sft)"),
    (["dpo.eval.reward_model=runs/other"], "dpo.eval.reward_model is set by the pipeline (the reward stage's run folder"),
    (["stages=[dpo,reward]"], "expected distinct stages in the order"),
    # every stage's data is checked before the first stage runs
    (["verifier.data.test_path=/nonexistent/test.jsonl"], "verifier.data.test_path=/nonexistent/test.jsonl: no such file"),
    (["dpo.data.paths=[/nonexistent/pairs.jsonl]"], "dpo.data.paths[0]=/nonexistent/pairs.jsonl: no such file"),
    (["pretrain.data.extra_paths=[/nonexistent/a.txt]"], "pretrain.data.extra_paths[0]=/nonexistent/a.txt: no such file"),
]

@pytest.mark.parametrize("overrides, message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_pipeline_input_is_one_line_naming_the_key_or_path(overrides, message, tmp_path, shared_data, capsys):
    recipe = tiny_pipeline(tmp_path, shared_data)
    with pytest.raises(SystemExit) as exit_:
        main(["pipeline", str(recipe), *overrides])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "pipe").exists()  # nothing ran


def test_a_listed_stage_needs_its_section(tmp_path, shared_data):
    recipe = tiny_pipeline(tmp_path, shared_data)
    data = yaml.safe_load(recipe.read_text())
    del data["verifier"]
    recipe.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="stage verifier is in stages but the file has no verifier section"):
        load_pipeline(recipe)
    assert load_pipeline(recipe, ["stages=[pretrain,sft]"]).stages == ["pretrain", "sft"]


def test_shipped_pipelines_load_and_the_registry_wires_each_stage():
    for name in ("modern-decoder-cpu", "modern-decoder-gpu", "smollm2"):
        text = (REPO / "recipes" / "pipeline" / f"{name}.yaml").read_text()
        stages = yaml.safe_load(text)["stages"]
        runnable = [s for s in stages if s in STAGES]
        cfg = load_pipeline(REPO / "recipes" / "pipeline" / f"{name}.yaml", [f"stages=[{','.join(runnable)}]"])
        assert cfg.stages == runnable and ("dpo" in stages)
    assert list(STAGES)[:2] == ["pretrain", "sft"] and list(STAGES)[-1] == "verifier"
    verifier = load_config(None, [], schema=STAGES["verifier"].schema)
    STAGES["verifier"].wire(verifier, "/m")
    assert (verifier.generator.spec, verifier.backbone_spec) == ("/m", "/m")
