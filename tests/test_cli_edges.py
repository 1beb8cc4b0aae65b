"""The rough edges a new user meets in the CLI (issue 17), each shown through the command itself:
overrides after flags, sweep files with recipe overrides, `tokenizer info char`, the leading space of a
generated continuation, document separators in `lmlab perplexity`, `qa eval --shots` and its progress,
QA SFT runs that print their result, and models Hugging Face has no equivalent for (export and SFT)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmlab.cli import main
from lmlab.evaluation import evaluate
from lmlab.model.config import ModelConfig
from lmlab.model.transformer import Transformer
from lmlab.weights.checkpoint import save_checkpoint
from lmlab.weights.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(argv: list[str]) -> int:
    """`lmlab ARGV` in this process; its exit status (commands that return nothing exit 0)."""
    try:
        main(argv)
    except SystemExit as exit_info:
        return exit_info.code
    return 0




@pytest.fixture
def tiny_smol(tmp_path: Path, smol_tok) -> Path:
    """A 2-layer random model with SmolLM2's tokenizer (and chat template), saved as a checkpoint."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=49152, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                                    max_seq_len=512))
    return save_checkpoint(model.eval(), tmp_path / "tiny-smol", tokenizer=smol_tok)


def test_overrides_after_flags_reach_every_run(tmp_path: Path, capsys) -> None:
    assert run_cli(["sweep", "recipes/pretrain/shakespeare-char.yaml", "--seeds", "0,1", "train.max_steps=3",
                    "--dry-run", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("train.max_steps=3" in line for line in lines)


def test_a_sweep_file_takes_recipe_overrides(tmp_path: Path, capsys) -> None:
    assert run_cli(["sweep", "recipes/pretrain/minigpt-sweep.yaml", "train.max_steps=7", "--dry-run",
                    "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and all("train.max_steps=7" in line for line in lines)


def test_tokenizer_info_char(shared_data: Path, capsys) -> None:
    assert run_cli(["tokenizer", "info", "char"]) == 0
    assert capsys.readouterr().out.startswith("kind=char:")
    corpus = shared_data / "tinyshakespeare" / "input.txt"
    assert run_cli(["tokenizer", "info", "char", "--corpus", str(corpus)]) == 0
    assert "kind=char vocab_size=65 " in capsys.readouterr().out
    assert run_cli(["tokenizer", "encode", "char", "--corpus", str(corpus), "--text", "Hi"]) == 0
    assert capsys.readouterr().out.split() == ["20", "47"]
    assert run_cli(["tokenizer", "encode", "char", "--text", "Hi"]) == 1  # no corpus: a one-line error
    assert "--corpus" in capsys.readouterr().err


def test_generate_keeps_the_continuations_leading_space(shared_data: Path, tmp_path: Path, capsys) -> None:
    from lmlab.generation.generate import GenerationConfig, encode_prompt, generate, generate_ids
    from lmlab.generation.sampling import SamplingConfig

    spec, prompt = str(shared_data / "stories260K" / "stories260K.bin"), "Once upon a"
    loaded = load_model(spec)
    ids = encode_prompt(loaded.tokenizer, prompt)
    new = generate_ids(loaded.model, [ids], GenerationConfig(8, SamplingConfig(temperature=0.0)))[0]
    tok = loaded.tokenizer
    want = tok.decode(ids + new)[len(tok.decode(ids)):]  # the text as it reads after the whole prompt
    assert want.startswith(" ")
    assert generate(loaded.model, tok, [prompt], GenerationConfig(8, SamplingConfig(temperature=0.0)))[0] == want
    assert run_cli(["generate", spec, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8",
                    "--out", str(tmp_path / "out.jsonl")]) == 0
    assert capsys.readouterr().out == want + "\n"  # streamed
    assert json.loads((tmp_path / "out.jsonl").read_text())["output"] == want


def test_perplexity_scores_each_document_with_its_bos(shared_data: Path, capsys) -> None:
    spec = str(shared_data / "stories260K" / "stories260K.bin")
    data = shared_data / "tinystories" / "tinystories_sample.txt"
    assert run_cli(["perplexity", spec, "--data", str(data), "--context", "128", "--stride", "64", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    loaded = load_model(spec)
    stories = [s.strip("\n") for s in data.read_text().split("<|endoftext|>") if s.strip()]
    docs = [loaded.tokenizer.encode(s, bos=True) for s in stories]
    assert got["n_docs"] == len(stories) == 5 and got["n_tokens"] == sum(len(d) - 1 for d in docs)
    parts = [evaluate.sliding_window_perplexity(loaded.model, d, 128, 64) for d in docs]
    assert got["nll"] == pytest.approx(sum(p.nll * p.n_tokens for p in parts) / got["n_tokens"], rel=1e-5)
    assert run_cli(["perplexity", spec, "--data", str(data), "--context", "128", "--stride", "64", "--json",
                    "--separator", "none"]) == 0
    whole = json.loads(capsys.readouterr().out)  # the markers scored as text, one BOS for the file
    assert whole["n_docs"] == 1 and whole["nll"] > got["nll"] + 0.3


def test_qa_eval_few_shot_reports_each_stage(tiny_smol: Path, capsys) -> None:
    assert run_cli(["qa", "eval", "recipes/qa/saq-smollm2.yaml", f"model.spec={tiny_smol}", "data.max_eval=2",
                    "--retries", "0", "--shots", "1"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out)
    assert res["base_1shot"]["n"] == 2 and "base_0shot" not in res
    assert "[eval] base model, 1-shot generated answers, 2 saq test items: done in" in out.err


def test_qa_sft_run_prints_its_result(tiny_smol: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(["sft", "recipes/qa/saq-smollm2.yaml", f"model.spec={tiny_smol}", "data.max_train=4",
                    "data.max_eval=2", "train.max_steps=1", "logging.progress=false", "precision.dtype=fp32",
                    f"out_dir={tmp_path / 'run'}"]) == 0
    assert f"{tmp_path / 'run'}: adapter saq: train_loss " in capsys.readouterr().out


def test_sinks_and_experts_say_hf_has_no_equivalent(shared_data: Path, tmp_path: Path, capsys) -> None:
    assert run_cli(["convert", "preset:modern-decoder", "--to", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.sink_tokens=4 has no Hugging Face equivalent" in err
    moe = save_checkpoint(Transformer(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_experts=2)),
                          tmp_path / "moe")
    assert run_cli(["convert", str(moe), "--to", "hf", "--out", str(tmp_path / "hf")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.n_experts=2 has no Hugging Face equivalent" in err
    assert not (tmp_path / "hf").exists()
    # SFT on a sinks model: the peft export is skipped with a note, the run ends normally with its summary
    run = tmp_path / "sft"
    assert run_cli(["sft", "recipes/sft/alpaca-lora-smollm2.yaml", "model.spec=preset:modern-decoder",
                    f"model.tokenizer={shared_data / 'gpt2-tokenizer'}", "model.dim=32", "model.n_layers=1",
                    "model.n_heads=2", "model.n_kv_heads=1", "data.max_train=4", "data.max_eval=2", "data.max_len=64",
                    "train.max_steps=1", "eval.perplexity=false", "eval.instructions=[]", "logging.progress=false",
                    "precision.dtype=fp32", f"out_dir={run}"]) == 0
    assert "note: export_peft skipped: model.sink_tokens=4 has no Hugging Face equivalent" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["peft"].startswith("skipped: ") and (run / "adapters" / "alpaca" / "adapter_config.json").is_file()
