"""Seed 002 (the minllama assignment): `python run_llama.py --option generate|prompt|finetune|lora ...` with
the seed's own flags, from the repository root, writing the seed's output files; a llama2.c `.pt` loads into
the assignment's model (preset minillama-stories42m: stories42M's shape with LayerNorm). The checkpoint here
is a tiny random one in llama2.c's train.py format (stories42M.pt itself is 168 MB and not available offline)
and the data are the first lines of the real SST files, so each command runs in seconds."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.compat.run_llama import GENERATE_PREFIX, main, model_source
from lmlab.data.classification import read_predictions
from lmlab.model.config import ModelConfig, get_preset
from lmlab.model.norms import LayerNorm
from lmlab.model.transformer import Transformer
from lmlab.weights.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent



def write_llama2c_pt(path: Path, **shape) -> Path:
    """A llama2.c train.py checkpoint (`model` + `model_args`) of a random RMSNorm model."""
    args = dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=32000, multiple_of=32, max_seq_len=128,
                dropout=0.0, **shape)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{k: v for k, v in args.items() if k != "multiple_of"}, multiple_of=32))
    torch.save({"model": model.state_dict(), "model_args": args}, path)
    return path


@pytest.fixture
def project(tmp_path: Path, shared_data: Path, monkeypatch) -> Path:
    """A working folder as the assignment lays it out: stories42M.pt and data/ with a few lines of each split."""
    write_llama2c_pt(tmp_path / "stories42M.pt")
    (tmp_path / "data").mkdir()
    for name in ("sst-train.txt", "sst-dev.txt", "sst-test.txt"):
        lines = (shared_data / "sst5" / name).read_text().splitlines()[::97][:12]  # every label appears
        (tmp_path / "data" / name).write_text("\n".join(lines) + "\n")
    mapping = (shared_data / "sst5" / "sst-label-mapping.json").read_text()
    (tmp_path / "data" / "sst-label-mapping.json").write_text(mapping)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_preset_is_stories42m_with_layernorm() -> None:
    seed, llama = get_preset("minillama-stories42m").to_dict(), get_preset("llama2c-stories42m").to_dict()
    differ = {k for k in seed if seed[k] != llama[k]}
    assert differ == {"name", "norm", "norm_bias"} and seed["norm"] == "layernorm" and not seed["norm_bias"]
    with torch.device("meta"):
        assert Transformer(get_preset("minillama-stories42m")).num_params() == 41_689_600  # 42M, tied embeddings


def test_a_llama2c_pt_loads_into_the_assignments_model(project: Path) -> None:
    spec, overrides, tokenizer = model_source("stories42M.pt")
    loaded = load_model(spec, overrides=overrides, tokenizer=tokenizer)
    norms = [m for m in loaded.model.modules() if isinstance(m, LayerNorm)]
    assert len(norms) == 3 and all(n.bias is None for n in norms)  # 2 per layer + the final one, gain only
    assert loaded.tokenizer.vocab_size == 32000  # the Llama 2 tokenizer.model
    raw = torch.load("stories42M.pt", weights_only=True)["model"]
    wq = "layers.0.attention.wq.weight"
    torch.testing.assert_close(loaded.model.state_dict()[wq], raw[wq])
    with pytest.raises(Exception, match="tinyllamas"):
        model_source("missing/stories42M.pt")


def test_generate_from_the_repo_root_writes_both_sentences(project: Path) -> None:
    low, high = project / "generated-sentence-temp-0.txt", project / "generated-sentence-temp-1.txt"
    cmd = [sys.executable, "run_llama.py", "--option", "generate",
           "--pretrained-model-path", str(project / "stories42M.pt"),
           "--generated_sentence_low_temp_out", str(low), "--generated_sentence_high_temp_out", str(high)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    for path in (low, high):
        text = path.read_text()
        assert text.startswith(GENERATE_PREFIX) and len(text) > len(GENERATE_PREFIX)
    assert "Temperature is 0.0" in done.stdout and "Temperature is 1.0" in done.stdout


SEED_COMMANDS = {  # the README's commands, with --pretrained-model-path and a training cap added
    "prompt": "--option prompt --batch_size 10 --train data/sst-train.txt --dev data/sst-dev.txt "
              "--test data/sst-test.txt --label-names data/sst-label-mapping.json "
              "--dev_out sst-dev-prompting-output.txt --test_out sst-test-prompting-output.txt",
    "finetune": "--option finetune --epochs 5 --lr 2e-5 --batch_size 80 --train data/sst-train.txt "
                "--dev data/sst-dev.txt --test data/sst-test.txt --label-names data/sst-label-mapping.json "
                "--dev_out sst-dev-finetuning-output.txt --test_out sst-test-finetuning-output.txt",
    "lora": "--option lora --epochs 5 --lr 2e-5 --batch_size 80 --train data/sst-train.txt --dev data/sst-dev.txt "
            "--test data/sst-test.txt --label-names data/sst-label-mapping.json --dev_out sst-dev-lora-output.txt "
            "--test_out sst-test-lora-output.txt --lora_rank 4 --lora_alpha 1.0",
}


@pytest.mark.parametrize("option", list(SEED_COMMANDS))
def test_seed_command_writes_its_prediction_files(option: str, project: Path, capsys) -> None:
    rc = main(shlex.split(SEED_COMMANDS[option]) + ["--pretrained-model-path", "stories42M.pt", "--max_train", "12"])
    assert rc == 0
    args = shlex.split(SEED_COMMANDS[option])
    for flag, split in (("--dev_out", "sst-dev.txt"), ("--test_out", "sst-test.txt")):
        out = project / args[args.index(flag) + 1]
        texts = [line.split(" ||| ", 1)[1] for line in (project / "data" / split).read_text().splitlines()]
        assert [line.split(" ||| ", 1)[1] for line in out.read_text().splitlines()] == texts
        assert all(0 <= p < 5 for p in read_predictions(out))
    out = capsys.readouterr()
    assert "dev acc" in out.out and "examples)" in out.err  # the result line, and progress while scoring
