"""What the command-line reliability tests share (tests/test_bad_inputs.py, tests/test_fuzz_inputs.py): a
small world of real files to point commands at (tiny models, a corpus, recipes, finished runs), and a
runner that calls the real CLI (`lmlab.cli.main`, in this process) and says how it ended. Only the CLI and
long-stable library calls are used, so the campaign also runs against older checkouts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from lmlab.cli import main

DATA = Path(os.environ.get("LMLAB_DATA") or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
REPO = Path(__file__).resolve().parent.parent

CLEAN, RIGHT, TRACEBACK, SILENT, LOST = ("clean one-line error", "did the right thing", "traceback",
                                          "exit 0 doing something wrong", "data lost")
UNCLEAR = "error without one clear line"  # failed, no traceback, but not one `error:` line (usage text, none)

PRETRAIN = """out_dir: run
model: {{spec: "preset:llama2c-stories260k", dim: 16, n_layers: 1, n_heads: 2, n_kv_heads: 1, hidden_dim: 32,
         max_seq_len: 16}}
data: {{path: "{base}/corpus.txt", tokenizer: char, seq_len: 16, val_batches: 2, cache_dir: "{base}/cache"}}
train: {{max_steps: 4, batch_size: 2, eval_every: 0, seed: 1}}
optim: {{lr: 1.0e-3}}
schedule: {{warmup_steps: 0}}
precision: {{device: cpu, dtype: fp32}}
checkpoint: {{every: 2}}
logging: {{log_every: 1, progress: false, peak_tflops: 0.1}}
"""

ALPACA = [{"instruction": f"Say the word {w}.", "input": "", "output": f"{w}."} for w in
          ("one", "two", "three", "four", "five", "six", "seven", "eight")]
GOOD = ["a great film", "truly great acting", "great fun", "a great story"]
BAD = ["an awful mess", "awful acting", "dull and awful", "an awful plot"]


def build_world(base: Path) -> dict[str, str]:
    """Files every case may read (never write): tiny models, a small corpus, recipes, finished runs.
    Returns the placeholders a command may use (world_env)."""
    from lmlab.model.config import ModelConfig
    from lmlab.model.transformer import Transformer
    from lmlab.tokenization import CharTokenizer
    from lmlab.weights.checkpoint import save_checkpoint
    from lmlab.weights.loading import load_model

    base.mkdir(parents=True, exist_ok=True)
    (base / "corpus.txt").write_text((DATA / "tinyshakespeare" / "input.txt").read_text()[:20000])
    stories = load_model(DATA / "stories260K" / "stories260K.bin", tokenizer=DATA / "stories260K" / "tok512.model")
    save_checkpoint(stories.model, base / "tiny", tokenizer=stories.tokenizer)  # 260k parameters, context 512
    model, c = stories.model, stories.model.config
    (base / "pt").mkdir()  # a llama2.c train.py checkpoint with no tokenizer beside it
    torch.save({"model": model.state_dict(), "model_args": dict(
        dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size,
        hidden_dim=c.hidden_dim, multiple_of=c.multiple_of, max_seq_len=c.max_seq_len)}, base / "pt" / "model.pt")
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = float("nan")
    save_checkpoint(model, base / "nan", tokenizer=stories.tokenizer)
    shutil.copytree(base / "tiny", base / "truncated")
    weights = base / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    # a character-level model for classification (its vocabulary covers the texts and the template)
    chars = CharTokenizer.from_text("".join(sorted(set("".join(GOOD + BAD) + " bad good Is this movie or? This movie is,."))))
    torch.manual_seed(0)
    save_checkpoint(Transformer(ModelConfig(vocab_size=chars.vocab_size, dim=16, n_layers=1, n_heads=2,
                                            n_kv_heads=1, max_seq_len=64)), base / "char", tokenizer=chars)
    (base / "labels.json").write_text('["bad", "good"]')
    (base / "cls.txt").write_text("\n".join([f"1 ||| {t}" for t in GOOD] + [f"0 ||| {t}" for t in BAD]) + "\n")
    (base / "alpaca.json").write_text(json.dumps(ALPACA))
    (base / "pretrain.yaml").write_text(PRETRAIN.format(base=base))
    env = world_env(base)
    quiet_main(base, f"run {env['recipe']} out_dir={base}/run")  # finished runs that cases copy, then change
    quiet_main(base, f"classify {env['classify']} out_dir={base}/cls-run")
    return env


def world_env(base: Path) -> dict[str, str]:
    """The placeholders a command may use: {tiny} etc. name world files; {classify} and {sft} are a shipped
    recipe plus overrides that make it a seconds-long run on the tiny models."""
    classify = [f"model.spec={base}/char", f"data.train={base}/cls.txt", f"data.dev={base}/cls.txt",
                f"data.test={base}/cls.txt", f"data.label_names={base}/labels.json", "classify.method=finetune",
                "data.max_len=64", "train.max_steps=2", "train.batch_size=4", "schedule.warmup_fraction=0",
                "precision.device=cpu", "logging.progress=false", "classify.dropout=0.0", "precision.dtype=fp32"]
    sft = [f"model.spec={base}/tiny", f"data.paths=[{base}/alpaca.json]", "data.split=[6,1,1]", "data.max_len=256",
           "train.max_steps=2", "train.batch_size=2", "train.grad_accum=1", "precision.dtype=fp32",
           "eval.perplexity=false", "eval.instructions=[]", "export_peft=false", "logging.progress=false",
           "lora.rank=2"]
    recipes = REPO / "recipes"
    return {"base": str(base), "data": str(DATA), "tiny": f"{base}/tiny", "pt": f"{base}/pt/model.pt",
            "nan": f"{base}/nan", "truncated": f"{base}/truncated", "recipe": f"{base}/pretrain.yaml",
            "classify": f"{recipes}/classify/sst5-lora-smollm2.yaml out_dir=out " + " ".join(classify),
            "sft": f"{recipes}/sft/alpaca-lora-smollm2.yaml out_dir=out " + " ".join(sft),
            "stories": f"{DATA}/stories260K/stories260K.bin"}


def quiet_main(cwd: Path, cmd: str) -> None:
    """Run a command that prepares a case; it must succeed."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
        try:
            main(shlex.split(cmd))
        except SystemExit as exit_:
            if exit_.code:
                raise RuntimeError(f"setup command failed: {cmd}\n{err.getvalue()}") from None


@dataclass
class Outcome:
    """How a command ended: its kind (CLEAN, RIGHT, ...), exit status, output and a one-line detail."""

    kind: str
    code: int | None
    out: str
    err: str
    detail: str = ""


def error_line(err: str) -> str | None:
    """The one error line of a failed command (None unless there is exactly one, and no traceback)."""
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    return lines[0] if len(lines) == 1 and "Traceback" not in err else None


def run_cli(argv: list[str], cwd: Path) -> Outcome:
    """`lmlab ARGV` in `cwd`: CLEAN (failed with one error line), UNCLEAR (failed otherwise), TRACEBACK (an
    exception escaped), or RIGHT with code 0 (the caller decides whether exit 0 was the right thing)."""
    out, err, code, crashed = io.StringIO(), io.StringIO(), 0, ""
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd):
            main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except Exception:  # noqa: BLE001 - what a user would see as a Python traceback, whatever it is
        crashed = traceback.format_exc()
    finally:
        torch.set_num_threads(threads)  # train.threads=N must not leak into the next case
    o, e = out.getvalue(), err.getvalue()
    if crashed:
        return Outcome(TRACEBACK, None, o, e, crashed.strip().splitlines()[-1])
    if code:
        line = error_line(e)
        return Outcome(CLEAN if line else UNCLEAR, code, o, e, line or e.strip()[-300:])
    return Outcome(RIGHT, 0, o, e)
