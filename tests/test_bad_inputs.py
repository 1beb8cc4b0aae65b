"""Bad input ends in one clear line or the right result: never a traceback, a silent success or lost data
(issue 16). Each case of CASES runs the real command line (`lmlab.cli.main`, in this process, in a fresh
folder) on a bad file, config, flag, model or folder, and says what must happen: the exit status and the
words the one-line error must hold, or, for input lmlab should handle (a torn metrics line, a corrupt newest
checkpoint, a damaged token cache), a success and a check of the result. The files a case marks as precious
must be there, unchanged, afterwards.

`python tests/test_bad_inputs.py` runs the table as a campaign and prints the counts in the issue's form
(clean one-line error / did the right thing / traceback / exit 0 doing something wrong / data lost); with
PYTHONPATH pointing at another checkout it measures that code (see tests/cli_world.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
from cli_world import (
    ALPACA,
    CLEAN,
    LOST,
    RIGHT,
    SILENT,
    TRACEBACK,
    Outcome,
    build_world,
    error_line,
    quiet_main,
    run_cli,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------------- cases

class Fmt(str):
    """File content with {placeholders} to fill in."""


Setup = Callable[[Path, dict[str, str]], Callable[[], None] | None]
Check = Callable[[Path, str, str], bool]  # (folder, stdout, stderr) -> the right thing was done


@dataclass
class Case:
    """One bad input and what must come of it."""

    id: str
    cmd: str
    """The command line after `lmlab`, with {placeholders} of world_env and {tmp} (the case's folder)."""
    code: int = 1
    """Expected exit status: 1 a user error, 2 a usage error (a bad flag), 0 handled."""
    words: tuple[str, ...] = ()
    """Words the one-line error must contain (case-insensitive)."""
    files: dict[str, str | bytes] = field(default_factory=dict)
    """Files written into the case's folder first (text is formatted with the placeholders)."""
    setup: Setup | None = None
    check: Check | None = None
    """For a success: whether the right thing was done."""
    keep: tuple[str, ...] = ()
    """Paths (relative to the case's folder) whose files must all be there, unchanged, afterwards."""
    control: bool = False
    """Good input (a baseline that the command works at all): tested, not counted in the campaign."""


def copy(*names: str) -> Setup:
    """Copy finished runs (or other world files) from the world into the case's folder."""
    def setup(tmp: Path, env: dict[str, str]) -> None:
        for name in names:
            src = Path(env["base"]) / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    return setup


def then(*steps: Setup) -> Setup:
    def setup(tmp: Path, env: dict[str, str]) -> Callable[[], None] | None:
        undo = [s(tmp, env) for s in steps]
        return lambda: [u() for u in undo if callable(u)]
    return setup


def edit(path: str, fn: Callable[[bytes], bytes]) -> Setup:
    def setup(tmp: Path, env: dict[str, str]) -> None:
        p = tmp / path
        p.write_bytes(fn(p.read_bytes()))
    return setup


def hold_lock(folder: str) -> Setup:
    """Another writer of the folder: an exclusive flock on its lock file, as a running lmlab holds it."""
    def setup(tmp: Path, env: dict[str, str]) -> Callable[[], None]:
        (tmp / folder).mkdir(parents=True, exist_ok=True)
        f = open(tmp / folder / ".lmlab.lock", "a+")
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.truncate(0)
        f.write("pid 4242 on otherhost, since 2026-01-01 00:00:00\n")
        f.flush()
        return f.close
    return setup


def make_cache(tmp: Path, env: dict[str, str], damage: Callable[[Path], None], runs: int = 1) -> None:
    """A token cache of the tiny corpus in tmp/cache (opened `runs` times), then damaged."""
    for i in range(runs):
        quiet_main(tmp, f"run {env['recipe']} out_dir=first{i} data.cache_dir={tmp}/cache train.max_steps=1")
    (folder,) = [p for p in (tmp / "cache").iterdir() if p.is_dir() and not p.name.startswith(".")]
    damage(folder)


def cache_damage(fn: Callable[[Path], None], runs: int = 1) -> Setup:
    return lambda tmp, env: make_cache(tmp, env, fn, runs)


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def _big_ids(folder: Path) -> None:
    import numpy as np

    meta = json.loads((folder / "meta.json").read_text())
    tokens = np.fromfile(folder / "train.bin", dtype=meta["dtype"])
    tokens[10] = 60000
    tokens.tofile(folder / "train.bin")


def finite_checkpoints(run: str) -> Check:
    """Every step checkpoint left in the run holds finite weights, and at least one is left."""
    def check(tmp: Path, out: str, err: str) -> bool:
        from safetensors.torch import load_file

        dirs = sorted((tmp / run / "checkpoints").glob("step_*"))
        return bool(dirs) and all(torch.isfinite(t).all() for d in dirs for t in load_file(d / "model.safetensors").values())
    return check


def metrics_ok(run: str, steps: int) -> Check:
    """metrics.jsonl parses line by line and its train lines run 1..steps."""
    def check(tmp: Path, out: str, err: str) -> bool:
        rows = [json.loads(x) for x in (tmp / run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "split" not in r and "loss" in r] == list(range(1, steps + 1))
    return check


def all_of(*checks: Check) -> Check:
    return lambda tmp, out, err: all(c(tmp, out, err) for c in checks)


def stderr_has(*words: str) -> Check:
    return lambda tmp, out, err: all(w.lower() in err.lower() for w in words)


def exists(*paths: str) -> Check:
    return lambda tmp, out, err: all((tmp / p).exists() for p in paths)


def not_exists(*paths: str) -> Check:
    return lambda tmp, out, err: not any((tmp / p).exists() for p in paths)


def _ties_with_itself(run: Path) -> bool:
    """A policy one step of lr 1e-12 away from its reference samples the same texts under the same seed, so
    the reward model scores them equally: every prompt a tie, win rate exactly 0.5."""
    g = json.loads((run / "summary.json").read_text())["generation"]
    rows = [json.loads(x) for x in (run / "generations.jsonl").read_text().splitlines()]
    return (g["n"] == len(rows) == 3 and g["ties"] == 3 and g["win_rate"]["value"] == 0.5
            and all(r["reference"] == r["policy"] for r in rows))


NON_UTF8 = b"caf\xe9 \xff\xfe not utf-8\n"
MCQ_ROW = "What is 1+1?,1,2,3,4,B"
RUN = "run {recipe} out_dir=out"
GEN = "generate {tiny} --prompt Once --max-new-tokens 2 --temperature 0"
PPL = "perplexity {tiny} --data {base}/corpus.txt --max-tokens 64 --context 32"
CLS = "classify {classify}"
SFT = "sft {sft}"
DPO = "dpo {dpo}"
RWD = "reward {reward}"
SCORE = "reward score {base}/reward-run"
PAIR = '{"prompt": "Say one.", "chosen": " one.", "rejected": " two."}\n'
FOREIGN = {"runs/notes.txt": "my notes\n", "runs/exp1/config.yaml": "precious: true\n",
           "runs/exp1/metrics.jsonl": '{"step": 1, "loss": 2.0}\n'}

VER = "{repo}/recipes/verifier/gsm8k-smollm2.yaml out_dir=out generator.spec={tiny} data.template=alpaca logging.progress=false"
PIPE = "pipeline p.yaml"
PIPE_YAML = """out_dir: pipe
stages: [sft]
sft:
  adapter: alpaca
  export_peft: false
  model: {{spec: {tiny}}}
  data: {{source: alpaca, paths: [{base}/alpaca.json], split: [6, 1, 1], max_len: 256}}
  lora: {{rank: 2, alpha: 4}}
  train: {{max_steps: 2, batch_size: 2, grad_accum: 1}}
  precision: {{dtype: fp32}}
  eval: {{perplexity: false, instructions: []}}
  logging: {{progress: false}}
verifier:
  generator: {{samples: 2, max_new_tokens: 4}}
  data: {{problems: 2, template: alpaca}}
  eval: {{problems: 1, samples: 2, n: [1, 2]}}
report: {{wikitext: {base}/corpus.txt, ppl_tokens: 64, ppl_context: 32, alpaca_records: 0, prompts: []}}
"""
PIPE_FILES = {"p.yaml": Fmt(PIPE_YAML)}


def _finished_sft_stage(tmp: Path, remove: tuple[str, ...]) -> None:
    """A pipeline whose SFT stage finished (with its report card), then parts of that stage removed."""
    quiet_main(tmp, PIPE)
    for name in remove:
        shutil.rmtree(tmp / "pipe" / "sft" / name)


def _fake_samples(tmp: Path, env: dict[str, str]) -> None:
    """A labelled-samples file that `verifier train` accepts as this recipe's, with a torn second line."""
    from lmlab.data.verifier import Solution
    from lmlab.schema.load import load_config
    from lmlab.schema.verifier import VerifierConfig
    from lmlab.tasks.verifier import META, _meta

    args = shlex.split(VER.format(**env))
    cfg = load_config(args[0], args[1:], schema=VerifierConfig)
    (tmp / "out" / "samples").mkdir(parents=True)
    (tmp / "out" / "samples" / META).write_text(json.dumps(_meta(cfg, "train")))
    row = Solution(problem=0, sample=0, source="sample", solution="4", answer="4", reference="4", correct=True)
    (tmp / "out" / "samples" / "train.jsonl").write_text(json.dumps(asdict(row)) + "\n" + '{"problem": 1, "sam\n')


CASES: list[Case] = [
    # ---- recipes: files, YAML, keys, types and ranges (every numeric key is covered by test_config_ranges.py)
    Case("recipe-missing", "run nope.yaml", words=("nope.yaml", "not found")),
    Case("recipe-non-utf8", "run r.yaml", files={"r.yaml": NON_UTF8}, words=("r.yaml", "UTF-8")),
    Case("recipe-empty", "run r.yaml", files={"r.yaml": ""}, words=("data.path",)),
    Case("recipe-bad-yaml", "run r.yaml", files={"r.yaml": "train: [1, 2\n"}, words=("r.yaml", "YAML")),
    Case("recipe-a-list", "run r.yaml", files={"r.yaml": "- 1\n- 2\n"}, words=("r.yaml", "mapping")),
    Case("recipe-a-folder", "run {base}", words=("folder",)),
    Case("recipe-none", "run", words=("recipe",)),
    Case("unknown-key", f"{RUN} train.max_step=3", words=("unknown key train.max_step",)),
    Case("unknown-section", f"{RUN} trian.max_steps=3", words=("unknown key trian",)),
    Case("override-no-value", f"{RUN} train.max_steps=", words=("train.max_steps",)),
    Case("override-bad-form", f"{RUN} =3", words=("KEY=VALUE",)),
    Case("grad-accum-0", f"{RUN} train.grad_accum=0", words=("train.grad_accum=0", ">= 1")),
    Case("batch-size-0", f"{RUN} train.batch_size=0", words=("train.batch_size=0",)),
    Case("log-every-0", f"{RUN} logging.log_every=0", words=("logging.log_every=0",)),
    Case("threads-negative", f"{RUN} train.threads=-3", words=("train.threads=-3",)),
    Case("dropout-2", f"{RUN} model.dropout=2.0", words=("model.dropout",)),
    Case("betas-one", f"{RUN} optim.betas=[0.9]", words=("optim.betas",)),
    Case("betas-strings", f"{RUN} optim.betas=[a,b]", words=("optim.betas",)),
    Case("every-negative", f"{RUN} checkpoint.every=-1", words=("checkpoint.every=-1",)),
    Case("keep-last-negative", f"{RUN} checkpoint.keep_last=-2", words=("checkpoint.keep_last=-2",)),
    Case("lr-zero", f"{RUN} optim.lr=0", words=("optim.lr=0",)),
    Case("lr-text", f"{RUN} optim.lr=fast", words=("optim.lr",)),
    Case("lr-nan", f"{RUN} optim.lr=.nan", words=("optim.lr",)),
    Case("max-steps-float", f"{RUN} train.max_steps=1.5", words=("train.max_steps",)),
    Case("max-steps-bool", f"{RUN} train.max_steps=true", words=("train.max_steps",)),
    Case("dtype-unknown", f"{RUN} precision.dtype=fp8", words=("precision.dtype",)),
    Case("device-unknown", f"{RUN} precision.device=tpu", words=("tpu",)),
    Case("device-cuda-absent", f"{RUN} precision.device=cuda", words=("cuda",)),
    Case("fp16-on-cpu", f"{RUN} precision.dtype=fp16", words=("fp16",)),
    Case("seq-len-negative", f"{RUN} data.seq_len=-1", words=("data.seq_len",)),
    Case("n-layers-0", f"{RUN} model.n_layers=0", words=("model.n_layers",)),
    Case("heads-not-dividing", f"{RUN} model.n_heads=3", words=("n_heads",)),
    Case("val-fraction-1", f"{RUN} data.val_fraction=1.0", words=("data.val_fraction",)),
    Case("section-a-scalar", f"{RUN} train=3", words=("train",)),
    Case("model-overrides-not-mapping", f"{RUN} model.overrides=abc", words=("model.overrides", "mapping")),
    Case("model-overrides-twice", f"{RUN} 'model.overrides={{{{dim: 8}}}}'", words=("model.dim", "twice")),
    Case("section-a-scalar-parent", f"{RUN} train.max_steps.x=3", words=("train.max_steps",)),
    Case("unset-env-var", f"{RUN} data.path=${{{{LMLAB_NOPE_VAR}}}}/x.txt", words=("LMLAB_NOPE_VAR",)),
    Case("sample-tokens-0", f"{RUN} sample.max_new_tokens=0", words=("sample.max_new_tokens",)),
    Case("sample-prompt-past-context", f"{RUN} train.max_steps=1 'sample.prompts=[\"" + "To be or not " * 10 + "\"]'",
         words=("context of 16",)),
    Case("epochs-and-steps-0", f"{RUN} train.max_steps=0", words=("train.max_steps", "train.epochs")),
    Case("list-keys", control=True, cmd="run --list-keys", code=0,
         check=lambda tmp, out, err: "train.grad_accum" in out and "optim.betas" in out),
    # ---- corpora and tokenizers
    Case("corpus-missing", f"{RUN} data.path=nope.txt", words=("nope.txt", "not found")),
    Case("corpus-non-utf8", f"{RUN} data.path=c.txt", files={"c.txt": NON_UTF8 * 200}, words=("c.txt", "UTF-8")),
    Case("corpus-empty", f"{RUN} data.path=c.txt", files={"c.txt": ""}, words=("c.txt", "empty")),
    Case("corpus-blank", f"{RUN} data.path=c.txt", files={"c.txt": "\n \n\t\n"}, words=("c.txt", "empty")),
    Case("corpus-a-folder", f"{RUN} data.path={{base}}", words=("not found",)),
    Case("corpus-jsonl-bad-line", f"{RUN} data.path=c.jsonl", files={"c.jsonl": '{"text": "a"}\n{oops\n'},
         words=("c.jsonl:2", "JSON")),
    Case("corpus-jsonl-no-field", f"{RUN} data.path=c.jsonl", files={"c.jsonl": '{"txt": "a"}\n'},
         words=("c.jsonl:1", "text")),
    Case("corpus-jsonl-not-string", f"{RUN} data.path=c.jsonl", files={"c.jsonl": '{"text": 3}\n'},
         words=("c.jsonl:1", "string")),
    Case("corpus-jsonl-not-object", f"{RUN} data.path=c.jsonl", files={"c.jsonl": '[1, 2]\n'}, words=("c.jsonl:1",)),
    Case("corpus-json-not-list", f"{RUN} data.path=c.json", files={"c.json": '{"text": "a"}'}, words=("c.json", "array")),
    Case("corpus-csv-no-column", f"{RUN} data.path=c.csv", files={"c.csv": "a,b\n1,2\n"}, words=("c.csv", "column")),
    Case("corpus-too-short", f"{RUN} data.path=c.txt", files={"c.txt": "To be or not to be.\n"},
         words=("c.txt", "seq_len")),
    Case("val-path-missing", f"{RUN} data.val_path=nope.txt", words=("nope.txt", "not found")),
    Case("tokenizer-missing", f"{RUN} data.tokenizer=nope.model", words=("nope.model",)),
    Case("tokenizer-garbage", f"{RUN} data.tokenizer=t.model", files={"t.model": b"\x00\x01garbage" * 10},
         words=("t.model",)),
    Case("tokenizer-unknown-type", f"{RUN} data.tokenizer=t.xyz", files={"t.xyz": "x"}, words=("t.xyz",)),
    Case("seq-len-past-context", f"{RUN} data.seq_len=64", words=("data.seq_len=64", "max_seq_len")),
    Case("vocab-smaller-than-tokenizer", f"{RUN} model.vocab_from_tokenizer=false model.vocab_size=8",
         words=("vocab",)),
    Case("cache-truncated", f"{RUN} data.cache_dir={{tmp}}/cache", code=0,
         setup=cache_damage(lambda f: _truncate(f / "train.bin", 1000)),
         check=all_of(stderr_has("token cache"), metrics_ok("out", 4))),
    Case("cache-ids-above-vocab", f"{RUN} data.cache_dir={{tmp}}/cache", code=0, setup=cache_damage(_big_ids),
         check=all_of(stderr_has("token cache"), metrics_ok("out", 4))),
    Case("cache-ids-above-vocab-after-a-check", f"{RUN} data.cache_dir={{tmp}}/cache", code=0,
         setup=cache_damage(_big_ids, runs=2), check=all_of(stderr_has("token cache", "60000"), metrics_ok("out", 4))),
    Case("cache-meta-garbage", f"{RUN} data.cache_dir={{tmp}}/cache", code=0,
         setup=cache_damage(lambda f: (f / "meta.json").write_text("{")),
         check=all_of(stderr_has("token cache"), metrics_ok("out", 4))),
    Case("cache-offsets-missing", f"{RUN} data.cache_dir={{tmp}}/cache", code=0,
         setup=cache_damage(lambda f: (f / "val_docs.npy").unlink()),
         check=all_of(stderr_has("token cache"), metrics_ok("out", 4))),
    # ---- models
    Case("model-missing", f"{RUN} model.spec=nope.bin", words=("nope.bin",)),
    Case("model-garbage-bin", f"{RUN} model.spec=m.bin", files={"m.bin": b"\x01\x02\x03" * 50}, words=("m.bin",)),
    Case("model-garbage-gguf", f"{RUN} model.spec=m.gguf", files={"m.gguf": b"GGUF" + b"\x00" * 60}, words=("m.gguf",)),
    Case("model-unknown-suffix", f"{RUN} model.spec=m.onnx", files={"m.onnx": "x"}, words=("m.onnx",)),
    Case("model-truncated", f"{RUN} model.spec={{truncated}}", words=("model.safetensors",)),
    Case("model-nan-weights", f"{RUN} model.spec={{nan}}", words=("nan", "wq")),
    Case("preset-unknown", f"{RUN} model.spec=preset:nope", words=("nope",)),
    Case("empty-folder-as-model", f"{RUN} model.spec=empty", files={"empty/.keep": ""}, words=("empty",)),
    # ---- run folders: refusals, locks, resume
    Case("resume-false-with-checkpoints", "run {recipe} out_dir=run checkpoint.resume=false", setup=copy("run"),
         words=("checkpoint.resume=false",), keep=("run",)),
    Case("changed-config-rerun", "run {recipe} out_dir=run optim.lr=0.01", setup=copy("run"),
         words=("different config", "optim.lr"), keep=("run",)),
    Case("finished-rerun", control=True, cmd="run {recipe} out_dir=run", code=0, setup=copy("run"),
         keep=("run/checkpoints", "run/metrics.jsonl", "run/summary.json"),
         check=lambda tmp, out, err: "already finished" in out),
    Case("locked-folder", "run {recipe} out_dir=run train.max_steps=6", setup=then(copy("run"), hold_lock("run")),
         words=("another lmlab run", "pid 4242"), keep=("run/metrics.jsonl", "run/checkpoints")),
    Case("out-dir-a-file", "run {recipe} out_dir=f.txt", files={"f.txt": "mine\n"}, words=("f.txt",), keep=("f.txt",)),
    Case("out-dir-foreign-folder", "run {recipe} out_dir=runs", files=FOREIGN, words=("runs",), keep=("runs",)),
    Case("out-dir-dot", "run {recipe} out_dir=.", files={"notes.txt": "mine\n", "config.yaml": "precious: 1\n"},
         words=("did not write",), keep=("notes.txt", "config.yaml")),
    Case("config-yaml-corrupt", "run {recipe} out_dir=run", setup=then(copy("run"), edit("run/config.yaml", lambda b: b"train: [\n")),
         words=("config.yaml", "unreadable"), keep=("run/checkpoints",)),
    Case("huge-lr-nan", f"{RUN} optim.lr=1e30 optim.impl=torch train.grad_clip=0 checkpoint.every=1 train.max_steps=6",
         words=("gradient norm is nan", "step 2", "last good checkpoint"), check=finite_checkpoints("out")),
    Case("huge-lr-keep-last-1", f"{RUN} optim.lr=1e30 optim.impl=torch train.grad_clip=0 checkpoint.every=1 "
         "checkpoint.keep_last=1 train.max_steps=6", words=("gradient norm is nan", "step_0000001"),
         check=finite_checkpoints("out")),
    Case("huge-lr-skip", f"{RUN} optim.lr=1e30 optim.impl=torch train.grad_clip=0 train.skip_nonfinite=2 "
         "train.max_steps=6", words=("skipped",)),
    Case("torn-metrics-line", "run {recipe} out_dir=run train.max_steps=6", code=0,
         setup=then(copy("run"), edit("run/metrics.jsonl", lambda b: b + b'{"step": 5, "lo')),
         check=all_of(stderr_has("torn"), metrics_ok("run", 6))),
    Case("damaged-metrics-middle", "run {recipe} out_dir=run train.max_steps=6",
         setup=then(copy("run"), edit("run/metrics.jsonl", lambda b: b"garbage\n" + b)), words=("metrics.jsonl:1",)),
    Case("corrupt-newest-weights", "run {recipe} out_dir=run train.max_steps=6", code=0,
         setup=then(copy("run"), edit("run/checkpoints/step_0000004/model.safetensors", lambda b: b[:100])),
         check=all_of(stderr_has("skipping", "step_0000004"), lambda t, o, e: "step_0000002" in o,
                      metrics_ok("run", 6))),
    Case("corrupt-newest-state", "run {recipe} out_dir=run train.max_steps=6", code=0,
         setup=then(copy("run"), edit("run/checkpoints/step_0000004/train_state.pt", lambda b: b"junk")),
         check=all_of(stderr_has("skipping", "train_state.pt"), metrics_ok("run", 6))),
    Case("temp-checkpoint-left", "run {recipe} out_dir=run train.max_steps=6", code=0,
         setup=then(copy("run"), lambda tmp, env: (tmp / "run/checkpoints/.step_0000006.x1y2").mkdir()),
         check=all_of(stderr_has(".step_0000006.x1y2"), not_exists("run/checkpoints/.step_0000006.x1y2"),
                      metrics_ok("run", 6))),
    # ---- SFT and QA data
    Case("sft-ok", control=True, cmd=SFT, code=0, check=exists("out/adapters/alpaca/adapter.safetensors")),
    Case("sft-data-missing", f"{SFT} data.paths=[nope.json]", words=("nope.json", "not found")),
    Case("sft-data-non-utf8", f"{SFT} data.paths=[d.json]", files={"d.json": NON_UTF8}, words=("d.json", "UTF-8")),
    Case("sft-data-empty", f"{SFT} data.paths=[d.json]", files={"d.json": ""}, words=("d.json", "no records")),
    Case("sft-data-empty-list", f"{SFT} data.paths=[d.json]", files={"d.json": "[]"}, words=("d.json", "no records")),
    Case("sft-data-bad-json", f"{SFT} data.paths=[d.json]", files={"d.json": "[{"}, words=("d.json", "JSON")),
    Case("sft-data-jsonl-bad-line", f"{SFT} data.paths=[d.jsonl]",
         files={"d.jsonl": json.dumps(ALPACA[0]) + "\n{nope\n"}, words=("d.jsonl", "JSON")),
    Case("sft-missing-output", f"{SFT} data.paths=[d.json]", files={"d.json": '[{"instruction": "x"}]'},
         words=("d.json", "output")),
    Case("sft-output-not-string", f"{SFT} data.paths=[d.json]", files={"d.json": '[{"instruction": "x", "output": 3}]'},
         words=("d.json", "string")),
    Case("sft-record-not-object", f"{SFT} data.paths=[d.json]", files={"d.json": '[1, 2]'}, words=("d.json", "object")),
    Case("sft-paths-empty", f"{SFT} data.paths=[]", words=("data.paths",)),
    Case("sft-source-unknown", f"{SFT} data.source=poems", words=("data.source",)),
    Case("sft-all-too-long", f"{SFT} data.max_len=4", words=("no training example",)),
    Case("sft-custom-no-marker", f"{SFT} data.template=custom data.custom_template='{{{{instruction}}}} go'",
         words=("response marker",)),
    Case("sft-permute-not-mcq", f"{SFT} data.permute_options=2", words=("permute_options",)),
    Case("sft-no-length", f"{SFT} train.max_steps=0 train.epochs=0", words=("train.max_steps", "train.epochs")),
    Case("sft-lora-no-target", f"{SFT} lora.target_modules=[nothing_here]", words=("nothing_here",)),
    Case("sft-pt-no-tokenizer", f"{SFT} model.spec={{pt}}", words=("tokenizer",)),
    Case("sft-tokenizer-missing", f"{SFT} model.tokenizer=nope.model", words=("nope.model",)),
    Case("sft-changed-config", f"{SFT} optim.lr=0.5", setup=lambda tmp, env: quiet_main(tmp, f"sft {env['sft']}"),
         words=("different config",), keep=("out/adapters", "out/summary.json")),
    Case("mcq-answer-two-letters", f"{SFT} data.source=mcq data.paths=[q.csv]",
         files={"q.csv": MCQ_ROW + "\nWhat is 2+2?,1,2,3,4,BC\n"}, words=("q.csv", "row 2", "'BC'")),
    Case("mcq-answer-empty", f"{SFT} data.source=mcq data.paths=[q.csv]",
         files={"q.csv": MCQ_ROW + "\nWhat is 2+2?,1,2,3,4,\n"}, words=("q.csv", "row 2", "answer")),
    Case("mcq-answer-lowercase", f"{SFT} data.source=mcq data.paths=[q.csv]",
         files={"q.csv": "What is 2+2?,1,2,3,4,d\n"}, words=("q.csv", "row 1", "'d'")),
    Case("mcq-five-fields", f"{SFT} data.source=mcq data.paths=[q.csv]", files={"q.csv": "q,1,2,3,B\n"},
         words=("q.csv", "row 1", "6 fields")),
    Case("mcq-non-utf8", f"{SFT} data.source=mcq data.paths=[q.csv]", files={"q.csv": NON_UTF8}, words=("q.csv", "UTF-8")),
    Case("mcq-empty", f"{SFT} data.source=mcq data.paths=[q.csv]", files={"q.csv": ""}, words=("q.csv", "no records")),
    Case("mcq-folder-without-csv", f"{SFT} data.source=mcq data.paths=[qs]", files={"qs/readme.txt": "x"},
         words=("qs",)),
    Case("arc-answer-key-unknown", f"{SFT} data.source=mcq data.paths=[a.jsonl]",
         files={"a.jsonl": json.dumps({"question": {"stem": "q", "choices": [{"label": "A", "text": "x"}]},
                                       "answerKey": "Z"}) + "\n"}, words=("a.jsonl", "line 1")),
    Case("arc-not-object", f"{SFT} data.source=mcq data.paths=[a.jsonl]", files={"a.jsonl": "[1]\n"},
         words=("a.jsonl", "line 1")),
    Case("saq-no-answer", f"{SFT} data.source=saq data.paths=[s.jsonl]", files={"s.jsonl": '{"question": "q"}\n'},
         words=("s.jsonl", "line 1")),
    Case("saq-answers-not-strings", f"{SFT} data.source=saq data.paths=[s.jsonl]",
         files={"s.jsonl": '{"question": "q", "answer": [3]}\n'}, words=("s.jsonl", "line 1")),
    Case("saq-non-utf8", f"{SFT} data.source=saq data.paths=[s.jsonl]", files={"s.jsonl": NON_UTF8},
         words=("s.jsonl", "UTF-8")),
    Case("gsm8k-no-final-answer", f"{SFT} data.source=gsm8k data.paths=[g.jsonl]",
         files={"g.jsonl": '{"question": "q", "answer": "42"}\n'}, words=("g.jsonl", "line 1")),
    Case("gsm8k-not-object", f"{SFT} data.source=gsm8k data.paths=[g.jsonl]", files={"g.jsonl": '"text"\n'},
         words=("g.jsonl", "line 1")),
    Case("dialogsum-no-summary", f"{SFT} data.source=dialogsum data.paths=[d.jsonl]",
         files={"d.jsonl": '{"dialogue": "a: hi"}\n'}, words=("d.jsonl", "line 1")),
    Case("sst2-label-two-digits", f"{SFT} data.source=sst2 data.paths=[s.txt]", files={"s.txt": "12 ||| fine film\n"},
         words=("s.txt", "line 1")),
    Case("sst2-label-empty", f"{SFT} data.source=sst2 data.paths=[s.txt]", files={"s.txt": " ||| fine film\n"},
         words=("s.txt", "line 1")),
    Case("sst2-non-utf8", f"{SFT} data.source=sst2 data.paths=[s.txt]", files={"s.txt": NON_UTF8},
         words=("s.txt", "UTF-8")),
    # ---- classification
    Case("cls-ok", control=True, cmd=CLS, code=0, check=exists("out/metrics.json", "out/dev-predictions.txt")),
    Case("cls-train-empty", f"{CLS} data.train=t.txt", files={"t.txt": ""}, words=("t.txt", "no examples")),
    Case("cls-dev-empty", f"{CLS} data.dev=d.txt", files={"d.txt": ""}, words=("d.txt", "no examples")),
    Case("cls-dev-blank-lines", f"{CLS} data.dev=d.txt", files={"d.txt": "\n\n \n"}, words=("d.txt", "no examples")),
    Case("cls-zeroshot-dev-empty", f"{CLS} classify.method=zeroshot data.dev=d.txt", files={"d.txt": ""},
         words=("d.txt", "no examples")),
    Case("cls-train-non-utf8", f"{CLS} data.train=t.txt", files={"t.txt": NON_UTF8}, words=("t.txt", "UTF-8")),
    Case("cls-label-out-of-range", f"{CLS} data.train=t.txt", files={"t.txt": "7 ||| great\n"}, words=("t.txt:1", "7")),
    Case("cls-label-unknown-name", f"{CLS} data.train=t.txt", files={"t.txt": "meh ||| great\n"}, words=("t.txt:1", "meh")),
    Case("cls-no-separator", f"{CLS} data.train=t.txt", files={"t.txt": "1 great film\n"}, words=("t.txt:1", "|||")),
    Case("cls-labels-missing", f"{CLS} data.label_names=nope.json", words=("nope.json",)),
    Case("cls-labels-not-list", f"{CLS} data.label_names=l.json", files={"l.json": '"bad"'}, words=("l.json",)),
    Case("cls-labels-non-utf8", f"{CLS} data.label_names=l.json", files={"l.json": NON_UTF8}, words=("l.json", "UTF-8")),
    Case("cls-csv-no-text", f"{CLS} data.train=t.csv", files={"t.csv": "label,words\n1,great\n"}, words=("t.csv", "text")),
    Case("cls-jsonl-not-object", f"{CLS} data.train=t.jsonl", files={"t.jsonl": "[1]\n"}, words=("t.jsonl:1",)),
    Case("cls-jsonl-bad-line", f"{CLS} data.train=t.jsonl", files={"t.jsonl": "{\n"}, words=("t.jsonl:1", "JSON")),
    Case("cls-table-bad-suffix", f"{CLS} data.train=t.xml data.format=table", files={"t.xml": "<a/>"}, words=("t.xml",)),
    Case("cls-sst2-needs-5", f"{CLS} data.sst2=true", words=("SST-2",)),
    Case("cls-verbalizers-count", f"{CLS} classify.method=zeroshot classify.verbalizers=[x]", words=("verbalizers",)),
    Case("cls-seeds-bad", f"{CLS} --seeds 0,x", words=("--seeds",)),
    Case("cls-seeds-negative", f"{CLS} --seeds -1", words=("--seeds", ">= 0")),
    Case("cls-seeds-twice", f"{CLS} --seeds 0,0", words=("--seeds", "once"), check=not_exists("out")),
    Case("cls-no-room", f"{CLS} data.max_len=2 'classify.template=long template {{{{text}}}}'", words=("max_len",)),
    Case("cls-no-dev-no-test", f"{CLS} data.dev= data.test=", words=("data.dev",)),
    Case("cls-lora-no-train", f"{CLS} classify.method=lora data.train=", words=("data.train",)),
    Case("cls-pt-no-tokenizer", f"{CLS} model.spec={{pt}}", words=("tokenizer",)),
    Case("cls-changed-config", "classify {classify} out_dir=cls-run optim.lr=0.5", setup=copy("cls-run"),
         words=("different config",), keep=("cls-run",)),
    Case("cls-changed-data", "classify {classify} out_dir=cls-run data.max_len=60", setup=copy("cls-run"),
         words=("different config", "data.max_len"), keep=("cls-run",)),
    # ---- preference data (DPO and reward models): one error naming file:line; an earlier run is never touched
    Case("dpo-ok", control=True, cmd=DPO, code=0, check=exists("out/adapters/dpo-hh/adapter.safetensors", "out/pairs/test.jsonl")),
    Case("dpo-missing-rejected", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": PAIR * 7 + '{"prompt": "p", "chosen": "a"}\n'},
         words=("p.jsonl:8", "rejected")),
    Case("dpo-identical-responses", f"{DPO} data.paths=[p.jsonl]",
         files={"p.jsonl": PAIR * 7 + '{"prompt": "p", "chosen": "same", "rejected": "same"}\n'}, words=("p.jsonl:8", "identical")),
    Case("dpo-empty-prompt", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": PAIR * 7 + '{"prompt": " ", "chosen": "a", "rejected": "b"}\n'},
         words=("p.jsonl:8", "empty prompt")),
    Case("dpo-non-utf8", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": PAIR.encode() * 3 + NON_UTF8}, words=("p.jsonl:4", "UTF-8")),
    Case("dpo-bad-json", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": PAIR * 2 + "{oops\n"}, words=("p.jsonl:3", "JSON")),
    Case("dpo-not-object", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": "[1, 2]\n"}, words=("p.jsonl:1", "object")),
    Case("dpo-response-not-text", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": '{"prompt": "p", "chosen": 3, "rejected": "b"}\n'},
         words=("p.jsonl:1", "string")),
    Case("dpo-data-missing", f"{DPO} data.paths=[nope.jsonl]", words=("nope.jsonl", "not found")),
    Case("dpo-data-empty", f"{DPO} data.paths=[p.jsonl]", files={"p.jsonl": ""}, words=("p.jsonl",)),
    Case("dpo-no-completion-left", f"{DPO} data.paths=[p.jsonl] data.max_prompt_len=0 data.max_len=4",
         files={"p.jsonl": '{"prompt": "' + "a long prompt " * 20 + '", "chosen": "a", "rejected": "b"}\n' + PAIR * 7},
         words=("p.jsonl:", "no completion token")),
    Case("dpo-beta-zero", f"{DPO} dpo.beta=0", words=("dpo.beta=0",)),
    Case("dpo-loss-unknown", f"{DPO} dpo.loss=kto", words=("dpo.loss",)),
    Case("dpo-prompt-budget-past-max-len", f"{DPO} data.max_prompt_len=48", words=("max_prompt_len",)),
    Case("dpo-bad-data-over-earlier-run", f"{DPO} out_dir=dpo-run data.paths=[p.jsonl]", setup=copy("dpo-run"),
         files={"p.jsonl": PAIR * 7 + '{"prompt": "p", "chosen": "a"}\n'}, words=("p.jsonl:8",), keep=("dpo-run",)),
    Case("dpo-changed-config", f"{DPO} out_dir=dpo-run dpo.beta=0.5", setup=copy("dpo-run"),
         words=("different config", "dpo.beta"), keep=("dpo-run",)),
    Case("dpo-reward-model-missing", f"{DPO} eval.reward_model=nope eval.prompts=2", words=("nope",)),
    Case("dpo-generation-check", control=True, code=0, check=lambda tmp, out, err: _ties_with_itself(tmp / "out"),
         cmd=f"{DPO} data.split=[4,1,3] eval.reward_model={{base}}/reward-run eval.prompts=3 eval.max_new_tokens=4 "
         "optim.lr=1e-12"),
    Case("reward-ok", control=True, cmd=RWD, code=0, check=exists("out/reward_model.json", "out/adapter/adapter.safetensors")),
    Case("reward-missing-chosen", f"{RWD} data.paths=[p.jsonl]", files={"p.jsonl": PAIR * 7 + '{"prompt": "p", "rejected": "a"}\n'},
         words=("p.jsonl:8", "chosen")),
    Case("reward-non-utf8", f"{RWD} data.paths=[p.jsonl]", files={"p.jsonl": NON_UTF8}, words=("p.jsonl:1", "UTF-8")),
    Case("reward-center-negative", f"{RWD} reward.center=-1", words=("reward.center",)),
    Case("reward-bad-data-over-earlier-run", f"{RWD} out_dir=reward-run data.paths=[p.jsonl]", setup=copy("reward-run"),
         files={"p.jsonl": PAIR * 7 + '{"prompt": "p", "chosen": "x", "rejected": "x"}\n'}, words=("p.jsonl:8",),
         keep=("reward-run",)),
    Case("score-ok", control=True, cmd=f"{SCORE} --data {{base}}/pairs.jsonl --out s.jsonl", code=0,
         check=lambda tmp, out, err: len((tmp / "s.jsonl").read_text().splitlines()) == 8),
    Case("score-no-data-flag", SCORE, words=("--data",)),
    Case("score-data-missing", f"{SCORE} --data nope.jsonl", words=("nope.jsonl",)),
    Case("score-data-non-utf8", f"{SCORE} --data p.jsonl", files={"p.jsonl": NON_UTF8}, words=("p.jsonl:1", "UTF-8")),
    Case("score-data-not-objects", f"{SCORE} --data p.jsonl", files={"p.jsonl": "[1]\n"}, words=("p.jsonl",)),
    Case("score-completion-missing", f"{SCORE} --data p.jsonl", files={"p.jsonl": '{"prompt": "p"}\n'},
         words=("p.jsonl:1", "completion")),
    Case("score-batch-zero", f"{SCORE} --data {{base}}/pairs.jsonl --batch-size 0", code=2, words=("--batch-size",)),
    Case("score-not-a-reward-run", "reward score {base}/run --data {base}/pairs.jsonl", words=("reward_model.json",)),
    Case("score-meta-garbage", "reward score rr --data {base}/pairs.jsonl",
         setup=then(copy("reward-run"), lambda tmp, env: (tmp / "reward-run").rename(tmp / "rr"),
                    edit("rr/reward_model.json", lambda b: b'{"method": "lora"}')), words=("reward_model.json", "keys")),
    Case("score-out-a-folder", f"{SCORE} --data {{base}}/pairs.jsonl --out outdir", files={"outdir/x": "mine"},
         words=("outdir",), keep=("outdir",)),
    Case("score-device-absent", f"{SCORE} --data {{base}}/pairs.jsonl --device cuda:3", words=("cuda",)),
    # ---- generate
    Case("gen-ok", control=True, cmd=GEN, code=0, check=lambda tmp, out, err: len(out.strip()) > 0),
    Case("gen-max-new-negative", f"{GEN} --max-new-tokens -5", code=2, words=("--max-new-tokens", "-5")),
    Case("gen-max-new-zero", f"{GEN} --max-new-tokens 0", code=2, words=("--max-new-tokens",)),
    Case("gen-temperature-negative", f"{GEN} --temperature -1", code=2, words=("--temperature",)),
    Case("gen-top-k-zero", f"{GEN} --top-k 0", code=2, words=("--top-k",)),
    Case("gen-top-p-big", f"{GEN} --temperature 1 --top-p 1.5", code=2, words=("--top-p",)),
    Case("gen-min-p-big", f"{GEN} --min-p 2", code=2, words=("--min-p",)),
    Case("gen-epsilon-one", f"{GEN} --epsilon 1", code=2, words=("--epsilon",)),
    Case("gen-repetition-zero", f"{GEN} --repetition-penalty 0", code=2, words=("--repetition-penalty",)),
    Case("gen-seed-negative", f"{GEN} --seed -1", code=2, words=("--seed",)),
    Case("gen-max-new-text", f"{GEN} --max-new-tokens many", code=2, words=("--max-new-tokens", "many")),
    Case("gen-batch-missing", f"{GEN} --batch-file nope.txt", words=("nope.txt",)),
    Case("gen-batch-non-utf8", f"{GEN} --batch-file p.txt", files={"p.txt": NON_UTF8}, words=("p.txt", "UTF-8")),
    Case("gen-batch-empty", "generate {tiny} --batch-file p.txt --max-new-tokens 2", files={"p.txt": ""},
         words=("p.txt", "no prompts")),
    Case("gen-batch-blank", "generate {tiny} --batch-file p.txt --max-new-tokens 2", files={"p.txt": "\n  \n"},
         words=("p.txt", "no prompts")),
    Case("gen-batch-jsonl-no-prompt", f"{GEN} --batch-file p.jsonl", files={"p.jsonl": '{"text": "x"}\n'},
         words=("p.jsonl:1", "prompt")),
    Case("gen-batch-jsonl-not-string", f"{GEN} --batch-file p.jsonl", files={"p.jsonl": '{"prompt": 3}\n'},
         words=("p.jsonl:1", "prompt")),
    Case("gen-batch-a-folder", f"{GEN} --batch-file {{base}}", words=("folder",)),
    Case("gen-pt-no-tokenizer", "generate {pt} --prompt Once --max-new-tokens 2", words=("tokenizer",)),
    Case("gen-pt-with-tokenizer", control=True, cmd="generate {pt} --tokenizer {data}/stories260K/tok512.model --prompt Once "
         "--max-new-tokens 2 --temperature 0", code=0, check=lambda tmp, out, err: len(out.strip()) > 0),
    Case("gen-tokenizer-missing", f"{GEN} --tokenizer nope.model", words=("nope.model",)),
    Case("gen-prompt-past-context", "generate {tiny} --batch-file long.txt --max-new-tokens 2",
         files={"long.txt": "Once upon a time " * 200}, words=("context", "--truncate-prompt")),
    Case("gen-prompt-past-context-inline", "generate {tiny} --max-new-tokens 2 --prompt '" + "Once upon a time " * 200 + "'",
         words=("context", "--truncate-prompt")),
    Case("gen-prompt-truncated", "generate {tiny} --max-new-tokens 2 --temperature 0 --truncate-prompt --prompt '"
         + "Once upon a time " * 200 + "'", code=0, check=stderr_has("warning", "truncated")),
    Case("gen-new-tokens-past-context", "generate {tiny} --prompt Once --max-new-tokens 2000 --temperature 0",
         code=0, check=stderr_has("warning", "context")),
    Case("gen-out-a-folder", f"{GEN} --out outdir", files={"outdir/x": "mine"}, words=("outdir",), keep=("outdir",)),
    Case("gen-nan-model", "generate {nan} --prompt Once --max-new-tokens 2", words=("nan",)),
    Case("gen-truncated-model", "generate {truncated} --prompt Once --max-new-tokens 2", words=("model.safetensors",)),
    Case("gen-model-missing", "generate nope/ --prompt Once", words=("nope",)),
    Case("gen-device-absent", f"{GEN} --device cuda:3", words=("cuda",)),
    Case("gen-stop-empty", f"{GEN} --stop ''", words=("empty stop string",)),
    Case("gen-chat-no-template", f"{GEN} --chat", words=("chat_template",)),
    # ---- serve: every bad flag, model or adapter fails before the server binds a port
    Case("serve-model-missing", "serve nope/", words=("nope",)),
    Case("serve-port-big", "serve {tiny} --port 70000", code=2, words=("--port", "65535")),
    Case("serve-parallel-zero", "serve {tiny} --parallel 0", code=2, words=("--parallel",)),
    Case("serve-queue-text", "serve {tiny} --max-queue lots", code=2, words=("--max-queue", "lots")),
    Case("serve-ctx-size-one", "serve {tiny} --ctx-size 1", code=2, words=("--ctx-size",)),
    Case("serve-ctx-size-past-model", "serve {tiny} --ctx-size 4096", words=("--ctx-size", "512")),
    Case("serve-timeout-zero", "serve {tiny} --timeout 0", code=2, words=("--timeout",)),
    Case("serve-draft-tokens-zero", "serve {tiny} --speculative prompt-lookup --draft-tokens 0", code=2,
         words=("--draft-tokens",)),
    Case("serve-draft-model-missing", "serve {tiny} --speculative nope/", words=("nope",)),
    Case("serve-adapter-no-name", "serve {tiny} --adapter somewhere", words=("--adapter", "NAME=PATH")),
    Case("serve-adapter-missing", "serve {tiny} --adapter a=nope", words=("nope",)),
    Case("serve-adapter-a-file", "serve {tiny} --adapter a=x.txt", files={"x.txt": "not an adapter"},
         words=("x.txt",), keep=("x.txt",)),
    Case("serve-pt-no-tokenizer", "serve {pt}", words=("tokenizer",)),
    Case("serve-device-absent", "serve {tiny} --device cuda:3", words=("cuda",)),
    # ---- convert: an output folder is never replaced unless it holds an earlier export of the same kind
    Case("convert-over-run-folder", "convert {tiny} --to lmlab --out run", setup=copy("run"),
         words=("run", "--force"), keep=("run",)),
    Case("convert-over-runs", "convert {tiny} --to lmlab --out runs", files=FOREIGN, words=("runs", "--force"),
         keep=("runs",)),
    Case("convert-out-dot", "convert {tiny} --to lmlab --out .", files={"notes.txt": "mine\n"},
         words=("--force",), keep=("notes.txt",)),
    Case("convert-over-file", "convert {tiny} --to lmlab --out f.txt", files={"f.txt": "mine\n"},
         words=("f.txt",), keep=("f.txt",)),
    Case("convert-over-earlier-export", control=True, cmd="convert {stories} --to lmlab --out exp", code=0,
         setup=lambda tmp, env: quiet_main(tmp, f"convert {env['tiny']} --to lmlab --out exp"),
         check=lambda tmp, out, err: json.loads((tmp / "exp/config.json").read_text())["name"] == "stories260K"),
    Case("convert-over-other-kind", "convert {tiny} --to hf --out exp",
         setup=lambda tmp, env: quiet_main(tmp, f"convert {env['tiny']} --to lmlab --out exp"),
         words=("exp", "--force"), keep=("exp",)),
    Case("convert-force-beside-foreign", "convert {tiny} --to lmlab --out runs --force", code=0, files=FOREIGN,
         keep=("runs/notes.txt", "runs/exp1"), check=exists("runs/model.safetensors", "runs/config.json")),
    Case("convert-force-name-clash", "convert {tiny} --to lmlab --out mine --force",
         files={"mine/config.json": '{"mine": true}'}, words=("config.json",), keep=("mine",)),
    Case("convert-over-symlinked-folder", "convert {tiny} --to lmlab --out link", files={"real/mine.txt": "mine"},
         setup=lambda tmp, env: (tmp / "link").symlink_to(tmp / "real"), words=("link", "mine.txt"), keep=("real",)),
    Case("convert-into-empty-folder", control=True, cmd="convert {tiny} --to lmlab --out empty", code=0,
         setup=lambda tmp, env: (tmp / "empty").mkdir(), check=exists("empty/model.safetensors")),
    Case("convert-src-missing", "convert nope.gguf --to lmlab --out x", words=("nope.gguf",), check=not_exists("x")),
    Case("convert-src-garbage", "convert m.gguf --to lmlab --out x", files={"m.gguf": b"GGUF\x03" + b"\xff" * 40},
         words=("m.gguf",)),
    Case("convert-src-truncated-bin", "convert m.bin --to lmlab --out x",
         setup=lambda tmp, env: (tmp / "m.bin").write_bytes(Path(env["stories"]).read_bytes()[:3000]), words=("m.bin",)),
    Case("convert-src-nan", "convert {nan} --to hf --out x", words=("nan",), check=not_exists("x")),
    Case("convert-to-unknown", "convert {tiny} --to onnx --out x", code=2, words=("--to",)),
    # ---- convert --to gguf: a file path that is no folder, replacing only an earlier GGUF file
    Case("convert-gguf-out-folder", "convert {tiny} --to gguf --out d", files={"d/mine.txt": "mine\n"},
         words=("d", "folder"), keep=("d/mine.txt",)),
    Case("convert-gguf-over-other-file", "convert {tiny} --to gguf --out f.txt", files={"f.txt": "mine\n"},
         words=("f.txt", "--force"), keep=("f.txt",)),
    Case("convert-gguf-type-unknown", "convert {tiny} --to gguf --type q5_k --out m.gguf", code=2, words=("--type",),
         check=not_exists("m.gguf")),
    Case("convert-gguf-adapter-missing", "convert {tiny} --to gguf --adapter nope --out m.gguf", words=("nope",),
         check=not_exists("m.gguf")),
    Case("convert-gguf-adapter-a-file", "convert {tiny} --to gguf --adapter x.txt --out m.gguf",
         files={"x.txt": "not an adapter"}, words=("x.txt",), keep=("x.txt",), check=not_exists("m.gguf")),
    Case("convert-gguf-unsupported-arch", "convert preset:minigpt-baseline --to gguf --out m.gguf",
         words=("gguf export supports",),
         check=not_exists("m.gguf")),
    Case("convert-gguf-over-earlier-gguf", control=True, cmd="convert {tiny} --to gguf --out m.gguf", code=0,
         setup=lambda tmp, env: quiet_main(tmp, f"convert {env['tiny']} --to gguf --out m.gguf"),
         check=lambda tmp, out, err: (tmp / "m.gguf").read_bytes()[:4] == b"GGUF"),
    # ---- tokenizer
    Case("tok-train-non-utf8", "tokenizer train --input t.txt --kind char --out tok", files={"t.txt": NON_UTF8},
         words=("t.txt", "UTF-8")),
    Case("tok-train-missing", "tokenizer train --input nope.txt --out tok", words=("nope.txt",)),
    Case("tok-train-empty", "tokenizer train --input t.txt --kind char --out tok", files={"t.txt": ""},
         words=("t.txt", "empty")),
    Case("tok-train-vocab-zero", "tokenizer train --input {base}/corpus.txt --vocab-size 0 --out tok", code=2,
         words=("--vocab-size",)),
    Case("tok-train-over-folder", "tokenizer train --input {base}/corpus.txt --kind char --out runs", files=FOREIGN,
         words=("runs", "--force"), keep=("runs",)),
    Case("tok-encode-missing", "tokenizer encode nope.model --text hi", words=("nope.model",)),
    Case("tok-encode-garbage", "tokenizer encode t.model --text hi", files={"t.model": b"\x00garbage"}, words=("t.model",)),
    Case("tok-encode-bad-json", "tokenizer encode t.json --text hi", files={"t.json": "{"}, words=("t.json",)),
    Case("tok-decode-not-ids", "tokenizer decode {tiny} --ids 1 x", words=("--ids",)),
    Case("tok-decode-out-of-range", "tokenizer decode {tiny} --ids 1 99999", words=("99999",)),
    Case("tok-decode-negative", "tokenizer decode {tiny} --ids 1 -3", words=("-3",)),
    Case("tok-info-no-tokenizer", "tokenizer info empty", files={"empty/x.txt": "x"}, words=("empty",)),
    Case("tok-sidecar-garbage", "tokenizer info tiny", setup=then(copy("tiny"), edit("tiny/lmlab_tokenizer.json", lambda b: b"[")),
         words=("lmlab_tokenizer.json",)),
    Case("tok-bin-truncated", "tokenizer info t.bin", files={"t.bin": b"\x01\x00\x00\x00abc"}, words=("t.bin", "truncated")),
    Case("tok-train-folder-input", "tokenizer train --input {base} --kind char --out tok", words=("folder",),
         check=not_exists("tok")),
    # ---- perplexity, info, evaluate, report, sweep
    Case("ppl-ok", control=True, cmd=PPL, code=0, check=lambda tmp, out, err: "perplexity" in out),
    Case("ppl-data-missing", "perplexity {tiny} --data nope.txt", words=("nope.txt",)),
    Case("ppl-data-non-utf8", "perplexity {tiny} --data d.txt", files={"d.txt": NON_UTF8}, words=("d.txt", "UTF-8")),
    Case("ppl-data-empty", "perplexity {tiny} --data d.txt", files={"d.txt": ""}, words=("d.txt", "empty")),
    Case("ppl-context-1", f"{PPL} --context 1", words=("context",)),
    Case("ppl-context-negative", f"{PPL} --context -4", code=2, words=("--context",)),
    Case("ppl-stride-negative", f"{PPL} --stride -1", code=2, words=("--stride",)),
    Case("ppl-stride-past-context", f"{PPL} --stride 64", words=("stride",)),
    Case("ppl-batch-zero", f"{PPL} --batch-size 0", code=2, words=("--batch-size",)),
    Case("ppl-max-tokens-negative", f"{PPL} --max-tokens -1", code=2, words=("--max-tokens",)),
    Case("ppl-pt-no-tokenizer", "perplexity {pt} --data {base}/corpus.txt", words=("tokenizer",)),
    Case("ppl-context-past-model", "perplexity {tiny} --data {base}/corpus.txt --context 4096 --max-tokens 5000",
         words=("context",)),
    Case("info-missing", "info nope.gguf", words=("nope.gguf",)),
    Case("info-garbage", "info m.bin", files={"m.bin": b"\x00" * 10}, words=("m.bin",)),
    Case("info-nan", "info {nan}", words=("nan",)),
    Case("info-hf-config-incomplete", "info hf", files={"hf/config.json": '{"model_type": "llama"}',
                                                        "hf/model.safetensors": "x"}, words=("hf/config.json",)),
    Case("info-lmlab-config-bad-value", "info m", setup=then(copy("tiny"), lambda tmp, env: (tmp / "tiny").rename(tmp / "m"),
                                                            edit("m/config.json", lambda b: b'{"dim": 64, "n_layers": "x"}')),
         words=("n_layers",)),
    Case("eval-no-checkpoints", "evaluate empty", files={"empty/x.txt": "x"}, words=("no checkpoints",)),
    Case("eval-missing-folder", "evaluate nope", words=("nope",)),
    Case("eval-long-missing-folder", "evaluate nope --long-context 2", words=("nope",)),
    Case("eval-long-negative", "evaluate run --long-context -2", setup=copy("run"), code=2, words=("--long-context",)),
    Case("eval-windows-zero", "evaluate run --long-context 2 --windows 0", setup=copy("run"), code=2,
         words=("--windows",)),
    Case("eval-max-batches-negative", "evaluate run --max-batches -1", setup=copy("run"), code=2,
         words=("--max-batches",)),
    Case("report-missing", "report nope", words=("nope",)),
    Case("report-config-non-utf8", "report run", setup=then(copy("run"), edit("run/config.yaml", lambda b: NON_UTF8)),
         words=("config.yaml", "UTF-8")),
    Case("report-summary-garbage", "report run", setup=then(copy("run"), edit("run/summary.json", lambda b: b"{")),
         words=("summary.json", "JSON")),
    Case("eval-config-garbage", "evaluate run", setup=then(copy("run"), edit("run/config.yaml", lambda b: b"train: [")),
         words=("config.yaml", "YAML")),
    Case("eval-checkpoint-truncated", "evaluate run",
         setup=then(copy("run"), edit("run/checkpoints/step_0000004/model.safetensors", lambda b: b"x")),
         words=("step_0000004", "truncated")),
    Case("report-kept", "report run", setup=then(copy("run"), lambda tmp, env: (tmp / "run/report.md").write_text("mine")),
         words=("report.md", "--force"), keep=("run/report.md",)),
    Case("sweep-point-fails", "sweep sweep.yaml --in-process", files={"sweep.yaml": Fmt(
        "recipe: {recipe}\nout_dir: sw\noverrides: [train.max_steps=2]\n"
        "points: {{ok: [], bad: [data.path=nope.txt]}}\n")},
         check=lambda tmp, out, err: "| bad | failed" in (tmp / "sw/results.md").read_text(), words=("bad",)),
    Case("sweep-bad-grid-key", "sweep {recipe} --grid train.max_stepz=1,2 --out sw", words=("train.max_stepz",)),
    Case("sweep-grid-no-values", "sweep {recipe} --grid train.max_steps= --out sw", words=("--grid",)),
    Case("sweep-plain-recipe-no-grid", "sweep {recipe}", words=("--grid",)),
    Case("sweep-jobs-negative", "sweep {recipe} --grid optim.lr=1e-3 --jobs -1 --out sw", code=2, words=("--jobs",)),
    Case("sweep-seeds-bad", "sweep {recipe} --seeds a,b --out sw", words=("--seeds",)),
    Case("sweep-missing-file", "sweep nope.yaml --grid optim.lr=1e-3", words=("nope.yaml",)),
    Case("sweep-file-non-utf8", "sweep s.yaml --grid optim.lr=1e-3", files={"s.yaml": NON_UTF8}, words=("s.yaml", "UTF-8")),
    # ---- verifier: bad recipes, models and missing earlier steps fail before any sampling
    Case("verifier-recipe-missing", "verifier sample nope.yaml", words=("nope.yaml", "not found")),
    Case("verifier-action-unknown", f"verifier fit {VER}", code=2, words=("action", "fit")),
    Case("verifier-samples-zero", f"verifier sample {VER} generator.samples=0", words=("generator.samples",)),
    Case("verifier-n-above-samples", f"verifier eval {VER} eval.samples=4 eval.n=[1,16]", words=("eval.n", "eval.samples")),
    Case("verifier-key-unknown", f"verifier sample {VER} verifier.targt=token", words=("verifier.targt",)),
    Case("verifier-generator-missing", f"verifier sample {VER} generator.spec=nope/", words=("nope",)),
    Case("verifier-problems-missing", f"verifier sample {VER} data.train_path=nope.jsonl", words=("nope.jsonl",)),
    Case("verifier-train-before-sample", f"verifier train {VER}", words=("verifier sample",)),
    Case("verifier-eval-before-train", f"verifier eval {VER}", words=("verifier train",)),
    Case("verifier-samples-bad-line", f"verifier train {VER}", words=("train.jsonl", "line 2"),
         setup=lambda tmp, env: _fake_samples(tmp, env), keep=("out/samples",)),
    # ---- pipeline: the whole file is checked before any stage runs; a failing stage keeps earlier results
    Case("pipeline-file-missing", "pipeline nope.yaml", words=("nope.yaml", "not found")),
    Case("pipeline-file-non-utf8", "pipeline p.yaml", files={"p.yaml": NON_UTF8}, words=("p.yaml", "UTF-8")),
    Case("pipeline-stage-unknown", f"{PIPE} stages=[sft,rlhf]", files=PIPE_FILES, words=("rlhf", "known stages")),
    Case("pipeline-stage-order", f"{PIPE} stages=[verifier,sft]", files=PIPE_FILES, words=("stages", "order")),
    Case("pipeline-key-unknown", f"{PIPE} sft.train.max_stepz=3", files=PIPE_FILES, words=("sft.train.max_stepz",)),
    Case("pipeline-range", f"{PIPE} sft.train.batch_size=0", files=PIPE_FILES, words=("sft.train.batch_size",)),
    Case("pipeline-chain-key-set", f"{PIPE} stages=[sft,verifier] verifier.generator.spec=x", files=PIPE_FILES,
         words=("verifier.generator.spec", "set by the pipeline")),
    Case("pipeline-first-model-missing", f"{PIPE} sft.model.spec=nope/", files=PIPE_FILES,
         words=("sft.model.spec", "nope")),
    Case("pipeline-wikitext-missing", f"{PIPE} report.wikitext=nope.txt", files=PIPE_FILES,
         words=("report.wikitext", "nope.txt"), check=not_exists("pipe/sft")),
    Case("pipeline-section-missing", f"{PIPE} stages=[sft,verifier]", files={"p.yaml": Fmt(PIPE_YAML.split("verifier:")[0])},
         words=("verifier section",)),
    Case("pipeline-stage-output-missing", f"{PIPE} stages=[sft,verifier]", files=PIPE_FILES,
         setup=lambda tmp, env: _finished_sft_stage(tmp, ("adapters", "model")), keep=("pipe/sft/summary.json",
         "pipe/sft/metrics.jsonl", "pipe/sft/checkpoints", "pipe/report.md"), words=("stage sft", "adapters/alpaca")),
    Case("pipeline-stage-changed", f"{PIPE} sft.lora.rank=4", files=PIPE_FILES,
         setup=lambda tmp, env: _finished_sft_stage(tmp, ()), keep=("pipe/sft", "pipe/report.md"),
         words=("stage sft", "lora.rank: 2 -> 4")),
    # ---- qa
    Case("qa-adapter-no-task", "qa ask 'What?' --base {tiny} --adapter runs/x", words=("TASK=DIR",)),
    Case("qa-adapter-missing", "qa ask 'What?' --base {tiny} --adapter saq=nope", words=("nope",)),
    Case("qa-retries-negative", "qa ask 'What?' --base {tiny} --retries -1", code=2, words=("--retries",)),
    Case("qa-eval-missing-recipe", "qa eval nope.yaml", words=("nope.yaml",)),
]


# ---------------------------------------------------------------------------------------------------- running


def _snapshot(root: Path, paths: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for rel in paths:
        p = root / rel
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.name != ".lmlab.lock")
        for f in files:
            out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
        if not p.exists():
            out[rel] = "missing before"
    return out


def run_case(case: Case, env: dict[str, str], tmp: Path) -> Outcome:
    """Run one case in `tmp` (a fresh folder) and classify what happened."""
    env = {**env, "tmp": str(tmp)}
    for rel, content in case.files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content.format(**env) if isinstance(content, Fmt) else content)
    undo = case.setup(tmp, env) if case.setup else None
    before = _snapshot(tmp, case.keep)
    try:
        result = run_cli(shlex.split(case.cmd.format(**env)), tmp)
    finally:
        if callable(undo):
            undo()
    if result.kind == TRACEBACK:
        return result
    after = _snapshot(tmp, case.keep)
    lost = [f for f, digest in before.items() if after.get(f) != digest]  # files added beside them are fine
    if lost:
        result.kind, result.detail = LOST, f"changed or gone: {', '.join(lost[:4])}"
    elif result.code == 0 and not (case.code == 0 and (case.check is None or _safe(case.check, tmp, result))):
        result.kind, result.detail = SILENT, "exit 0" + (" (check failed)" if case.code == 0 else "")
    return result


def _safe(check: Check, tmp: Path, result: Outcome) -> bool:
    try:
        return bool(check(tmp, result.out, result.err))
    except Exception:  # noqa: BLE001 - a check that cannot even read the result: the result is wrong
        return False


# ---------------------------------------------------------------------------------------------------- the test



@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, cli_world: dict[str, str], tmp_path: Path) -> None:
    result = run_case(case, cli_world, tmp_path)
    assert result.kind != TRACEBACK, f"traceback: {result.detail}\n{result.err[-2000:]}"
    assert result.kind != LOST, f"{result.detail}\n{result.err[-1000:]}"
    if case.code:
        assert result.kind == CLEAN and result.code == case.code, f"{result.kind}, exit {result.code}: {result.detail}"
        line = error_line(result.err)
        missing = [w for w in case.words if w.lower() not in line.lower()]
        assert not missing, f"error line lacks {missing}: {line}"
        assert line.startswith("lmlab "), line
        if case.check is not None:
            assert case.check(tmp_path, result.out, result.err), f"check failed after the error: {line}"
    else:
        assert result.kind == RIGHT, f"{result.kind}: {result.detail}\n{result.err[-1500:]}"


def test_every_command_has_cases() -> None:
    from lmlab.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    covered = {shlex.split(c.cmd)[0] for c in CASES}
    assert commands <= covered, commands - covered


# ---------------------------------------------------------------------------------------------------- campaign


def campaign(base: Path) -> dict[str, list[str]]:
    """Run every case but the controls; cases grouped by outcome."""
    env = build_world(base / "world")
    kinds: dict[str, list[str]] = {k: [] for k in (CLEAN, RIGHT, TRACEBACK, SILENT, LOST)}
    for i, case in enumerate(c for c in CASES if not c.control):
        tmp = base / f"case{i:03d}"
        tmp.mkdir()
        try:
            result = run_case(case, env, tmp)
        except Exception as err:  # the case could not be set up on this code
            result = Outcome("case setup failed", None, "", "", str(err).splitlines()[0])
        kinds.setdefault(result.kind, []).append(f"{case.id}: {result.detail}")
    return kinds


if __name__ == "__main__":
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        kinds = campaign(Path(d))
    total = sum(map(len, kinds.values()))
    print(f"Tried {total} bad inputs: " + ", ".join(f"{len(v)} {k}" for k, v in kinds.items()))
    for kind, items in kinds.items():
        if kind != CLEAN or "-v" in sys.argv:
            for item in items:
                print(f"  [{kind}] {item}")
