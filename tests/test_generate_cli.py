"""`lmlab generate` as a user runs it: the multi-turn terminal chat (`--chat` with no prompt: history
kept, /reset) and `--speculative` giving the same greedy text as plain decoding."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from lmlab.generation.generate import GenerationConfig, generate
from lmlab.generation.sampling import SamplingConfig
from lmlab.paths import REPO_ROOT
from lmlab.weights.loading import load_model

TOY_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
ENV = {"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}


def lmlab(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmlab", *args], input=stdin, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_terminal_chat_keeps_history_and_resets(shared_data, tmp_path: Path) -> None:
    """stories260K with a toy chat template (saved with its tokenizer): each answer is what `generate` gives
    for the conversation so far; after /reset the history is gone."""
    bin_ = shared_data / "stories260K" / "stories260K.bin"
    loaded = load_model(bin_, dtype="fp32")
    tok = copy.copy(loaded.tokenizer)
    tok.chat_template = TOY_TEMPLATE
    tok.save(tmp_path / "tok")
    cfg = GenerationConfig(20, SamplingConfig(temperature=0))

    def answer(messages: list[dict]) -> str:
        return generate(loaded.model, tok, [tok.apply_chat_template(messages, add_generation_prompt=True)], cfg)[0]

    turns = ["Tell me about a dog.", "What did the dog do?"]
    first = answer([{"role": "user", "content": turns[0]}])
    second = answer([{"role": "user", "content": turns[0]}, {"role": "assistant", "content": first},
                     {"role": "user", "content": turns[1]}])
    fresh = answer([{"role": "user", "content": turns[1]}])
    assert second != fresh  # the history changes the answer
    out = lmlab("generate", str(bin_), "--tokenizer", str(tmp_path / "tok"), "--chat", "--temperature", "0",
                "--max-new-tokens", "20", "--dtype", "fp32", stdin="\n".join([*turns, "/reset", turns[1], "/bye"]) + "\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split(">>> ")[1:]
    assert [r.strip("\n") for r in replies] == [first, second, "(conversation cleared)", fresh, ""]


def test_speculative_flag_gives_the_plain_greedy_text(shared_data, tmp_path: Path) -> None:
    bin_ = str(shared_data / "stories260K" / "stories260K.bin")
    common = ["generate", bin_, "--prompt", "Once upon a time, Lily", "--prompt", "Tom and Sam", "--temperature",
              "0", "--max-new-tokens", "60", "--dtype", "fp32"]
    plain = lmlab(*common, "--out", str(tmp_path / "plain.jsonl"))
    spec = lmlab(*common, "--speculative", "prompt-lookup", "--draft-tokens", "4", "--out", str(tmp_path / "spec.jsonl"))
    assert plain.returncode == 0 and spec.returncode == 0, spec.stderr
    rows = lambda name: [json.loads(x)["output"] for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert rows("spec.jsonl") == rows("plain.jsonl")
    assert "draft tokens accepted" in spec.stderr
    bad = lmlab("generate", bin_, "--speculative", "no/such/model")
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
