"""Property tests (Hypothesis) of bad input through the real command line (issue 16): whatever the config
override or the data file, a command ends in one clean error line or a run, never a traceback.

* Config overrides: a key drawn from the command's own `--list-keys`, a value text whose parsed value has the
  wrong type or lies outside the key's range is a one-line error naming the key; for a text key, any text
  is an error or a run (on a seconds-long tiny recipe).
* Data lines: files made of random byte lines, JSON objects with missing, extra or wrongly typed fields and
  lines that almost parse, fed to the readers of prompts (--batch-file), corpora, instruction data (Alpaca,
  NQ-open, ARC), MMLU CSV and labelled texts: a clean error, or a run.

Examples are derandomized (the same ones on every machine); LMLAB_FUZZ_EXAMPLES=N tries N per property.
"""

from __future__ import annotations

import json
import os
import shlex
import string
from pathlib import Path
from typing import Any

import pytest
from cli_world import CLEAN, RIGHT, run_cli
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, TypeAdapter

from lmlab.schema.classify import ClassifyConfig
from lmlab.schema.load import parse_scalar
from lmlab.schema.pretrain import PretrainConfig
from lmlab.schema.sft import SFTConfig

N = int(os.environ.get("LMLAB_FUZZ_EXAMPLES", "0"))
SETTINGS = dict(derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
KINDS = {"run": (PretrainConfig, "run {recipe}"), "sft": (SFTConfig, "sft {sft}"),
         "classify": (ClassifyConfig, "classify {classify}")}


def fresh(tmp_path: Path) -> Path:
    """A new empty folder per example (the test's tmp_path is shared by all of them)."""
    n = len(list(tmp_path.iterdir()))
    folder = tmp_path / f"ex{n:04d}"
    folder.mkdir()
    return folder


def check_outcome(result: Any, allow_run: bool = True) -> None:
    assert result.kind != "traceback", f"traceback: {result.detail}\n{result.err[-3000:]}"
    assert result.kind in ((CLEAN, RIGHT) if allow_run else (CLEAN,)), f"{result.kind}: {result.detail}"
    if result.kind == CLEAN:
        line = result.detail
        assert line.startswith("lmlab ") and "Traceback" not in result.err, line


# ---------------------------------------------------------------------------------------------------- overrides


def listed_keys(cmd: str, cwd: Path) -> list[str]:
    """The keys `lmlab CMD --list-keys` prints (first column)."""
    result = run_cli([cmd, "--list-keys"], cwd)
    assert result.kind == RIGHT, result.detail
    return [line.split()[0] for line in result.out.splitlines() if line.strip()]


def field_at(schema: type[BaseModel], key: str) -> Any:
    """The pydantic FieldInfo of a dotted key."""
    node: Any = schema
    info = None
    for part in key.split("."):
        info = node.model_fields[part]
        node = info.annotation
    return info


def valid(info: Any, value: Any) -> bool:
    """Whether `value` has the field's type and lies in its range (strict, as recipes are loaded)."""
    tp = info.annotation
    from typing import Annotated

    adapter = TypeAdapter(Annotated[(tp, *info.metadata)] if info.metadata else tp,
                          config=None if isinstance(tp, type) and issubclass(tp, BaseModel) else
                          ConfigDict(strict=True, allow_inf_nan=False))
    try:
        adapter.validate_python(value, strict=True)
    except Exception:  # noqa: BLE001 - ValidationError, or the ValueError of a section validator
        return False
    return True


def is_text(info: Any) -> bool:
    return str(info.annotation) in ("<class 'str'>", "list[str]")


SCALARS = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "~", "[]", "{}", "[1, 2]", "[a, b]", "[0.5]", "{a: 1}", ".nan",
                     ".inf", "-.inf", "1e309", "-1e-3", "''", "0x10", "1_000", "[[1]]", "{dim: -1}", "-0"]),
    st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=12),
)
"""Override value texts: numbers of every size, YAML's special forms, lists, mappings, words."""


@pytest.mark.parametrize("cmd", list(KINDS))
def test_wrong_type_or_range_is_a_clean_error_naming_the_key(cmd: str, cli_world: dict[str, str],
                                                             tmp_path: Path) -> None:
    schema, base = KINDS[cmd]
    keys = listed_keys(cmd, tmp_path)
    assert "train.grad_accum" in keys and "optim.betas" in keys

    @settings(max_examples=N or 100, **SETTINGS)
    @given(key=st.sampled_from(keys), text=SCALARS)
    def check(key: str, text: str) -> None:
        info = field_at(schema, key)
        assume(not valid(info, parse_scalar(text)))
        argv = shlex.split(base.format(**cli_world)) + ["out_dir=never", f"{key}={text}"]  # the key's value wins
        folder = fresh(tmp_path)
        result = run_cli(argv, folder)
        check_outcome(result, allow_run=False)
        assert key.split(".")[0] in result.detail, result.detail  # names the key (or its section)
        assert not (folder / "never").exists()

    check()


@pytest.mark.slow
@pytest.mark.parametrize("cmd", list(KINDS))
def test_any_text_for_a_text_key_is_an_error_or_a_run(cmd: str, cli_world: dict[str, str], tmp_path: Path) -> None:
    schema, base = KINDS[cmd]
    keys = [k for k in listed_keys(cmd, tmp_path) if is_text(field_at(schema, k))]
    words = st.text(string.ascii_letters + string.digits + "._-{} ", min_size=0, max_size=16)

    @settings(max_examples=N or 15, **SETTINGS)
    @given(key=st.sampled_from(keys), text=st.one_of(words, words.map(lambda w: f"[{w}]")))
    def check(key: str, text: str) -> None:
        argv = shlex.split(base.format(**cli_world)) + [f"{key}={text}", "train.max_steps=1"]
        check_outcome(run_cli(argv, fresh(tmp_path)))

    check()


# ---------------------------------------------------------------------------------------------------- data lines


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                           max_leaves=6)


def records(fields: list[str], good: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """A JSON object line: some of `fields` (good values or any JSON value), maybe an unknown field."""
    value = st.one_of(st.sampled_from(list(good.values())), JSON_VALUES)
    obj = st.dictionaries(st.sampled_from(fields + ["extra"]), value, max_size=len(fields) + 1)
    return st.one_of(obj.map(json.dumps), st.just(json.dumps(good))).map(str.encode)


NOISE = st.one_of(st.binary(max_size=24), st.sampled_from([b"", b"   ", b"{", b"[1, 2]", b'"text"', b"null",
                                                         b"\xef\xbb\xbf{}", b"\x00\x00", b"a,b,c"]))
"""Lines that are not records: random bytes, blanks, JSON that is not an object, a BOM, NULs."""


def data_file(line: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.lists(st.one_of(line, NOISE), min_size=0, max_size=6).map(lambda ls: b"\n".join(ls) + b"\n")


READERS = {  # name -> (command with {file}, the file's name, its lines)
    "batch-file": ("generate {tiny} --batch-file {file} --max-new-tokens 1 --temperature 0 --no-stream", "p.jsonl",
                   st.one_of(records(["prompt"], {"prompt": "Once upon a time"}), st.text(max_size=20).map(str.encode))),
    "corpus": ("run {recipe} out_dir=run data.path={file} train.max_steps=1 data.seq_len=4", "c.jsonl",
               records(["text"], {"text": "To be, or not to be, that is the question. " * 3})),
    "alpaca": ("sft {sft} data.paths=[{file}] train.max_steps=1 data.split=[1,0,0]", "a.jsonl",
               records(["instruction", "input", "output"], {"instruction": "Say hi.", "input": "", "output": "hi."})),
    "saq": ("sft {sft} data.source=saq data.paths=[{file}] train.max_steps=1 data.split=[1,0,0]", "s.jsonl",
            records(["question", "answer"], {"question": "Who wrote Hamlet?", "answer": ["Shakespeare"]})),
    "arc": ("sft {sft} data.source=mcq data.paths=[{file}] train.max_steps=1 data.split=[1,0,0]", "a.jsonl",
            records(["question", "answerKey"], {"question": {"stem": "2+2?", "choices": [
                {"label": "A", "text": "3"}, {"label": "B", "text": "4"}]}, "answerKey": "B"})),
    "mcq": ("sft {sft} data.source=mcq data.paths=[{file}] train.max_steps=1 data.split=[1,0,0]", "q.csv",
            st.lists(st.sampled_from(["What is 1+1?", "1", "2", "B", "", "BC", "a", '"quoted, comma"']), max_size=7)
            .map(lambda cells: ",".join(cells).encode())),
    "labelled": ("classify {classify} data.dev={file} classify.method=zeroshot", "d.txt",
                 st.tuples(st.sampled_from(["0", "1", "2", "x", "", " 1 "]), st.sampled_from([" ||| ", "|||", " "]),
                           st.sampled_from(["great fun", "awful acting", "", "a great film"]))
                 .map(lambda t: "".join(t).encode())),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_data_lines_end_in_a_clean_error_or_a_run(reader: str, cli_world: dict[str, str], tmp_path: Path) -> None:
    cmd, name, line = READERS[reader]

    @settings(max_examples=N or 12, **SETTINGS)
    @given(content=data_file(line))
    def check(content: bytes) -> None:
        folder = fresh(tmp_path)
        (folder / name).write_bytes(content)
        result = run_cli(shlex.split(cmd.format(file=name, **cli_world)), folder)
        check_outcome(result)
        if result.kind == CLEAN and "not UTF-8" in result.detail:
            assert name in result.detail

    check()
