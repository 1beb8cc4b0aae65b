"""lmlab.fileio: output folders never lose a file lmlab did not write; text files are UTF-8 or one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.errors import DataError, OutputError
from lmlab.fileio import OUTPUT_MARKER, atomic_write_text, read_marker, read_text, write_output_dir


def export(files: dict[str, str]):
    def build(tmp: Path) -> None:
        for name, text in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(text)
    return build


def listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != OUTPUT_MARKER}


def test_a_new_folder_then_an_earlier_export_of_the_same_kind_is_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output_dir(export({"a.txt": "1", "sub/b.txt": "2"}), out, "thing")
    assert read_marker(out) == {"kind": "thing", "files": ["a.txt", "sub/b.txt"]}
    write_output_dir(export({"a.txt": "3", "c.txt": "4"}), out, "thing")
    assert listing(out) == {"a.txt": "3", "c.txt": "4"}  # its own stale sub/b.txt removed
    assert read_marker(out)["files"] == ["a.txt", "c.txt"]


def test_a_folder_with_other_files_is_refused_and_forced_writes_only_beside_them(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    (out / "exp1").mkdir(parents=True)
    (out / "exp1" / "metrics.jsonl").write_text("mine")
    (out / "notes.txt").write_text("mine")
    before = listing(out)
    with pytest.raises(OutputError, match=r"runs: holds files lmlab did not write \(.*notes.txt.*--force"):
        write_output_dir(export({"a.txt": "1"}), out, "thing")
    assert listing(out) == before
    write_output_dir(export({"a.txt": "1"}), out, "thing", force=True)
    assert listing(out) == {**before, "a.txt": "1"}
    with pytest.raises(OutputError, match="already holds notes.txt, which lmlab did not write"):
        write_output_dir(export({"notes.txt": "new"}), out, "thing", force=True)
    assert (out / "notes.txt").read_text() == "mine"
    write_output_dir(export({"b.txt": "2"}), out, "thing", force=True)  # replaces its own a.txt, keeps the rest
    assert listing(out) == {**before, "b.txt": "2"}


def test_another_kind_of_export_is_refused_and_forced_keeps_its_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_output_dir(export({"config.json": "lmlab", "w.bin": "1"}), out, "lmlab checkpoint")
    with pytest.raises(OutputError, match=r"another kind \(lmlab checkpoint\)"):
        write_output_dir(export({"config.json": "hf"}), out, "Hugging Face model")
    write_output_dir(export({"hf.bin": "2"}), out, "Hugging Face model", force=True)
    assert listing(out) == {"config.json": "lmlab", "w.bin": "1", "hf.bin": "2"}


def test_an_unmarked_export_that_legacy_recognizes_is_replaced_only_when_it_holds_nothing_else(tmp_path: Path) -> None:
    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text("old")
    mine = lambda folder: (folder / "config.json").read_text() == "old"  # noqa: E731
    write_output_dir(export({"config.json": "new"}), out, "thing", legacy=mine)
    assert listing(out) == {"config.json": "new"}
    (out / OUTPUT_MARKER).unlink()
    (out / "config.json").write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        write_output_dir(export({"config.json": "new"}), out, "thing", legacy=mine)


def test_files_and_dot_and_empty_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "f.txt").write_text("mine")
    with pytest.raises(OutputError, match="f.txt: is a file"):
        write_output_dir(export({"a": "1"}), tmp_path / "f.txt", "thing")
    with pytest.raises(OutputError, match="is a folder"):
        atomic_write_text(tmp_path, "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    write_output_dir(export({"a": "1"}), ".", "thing")  # an empty current folder is filled, never swapped
    assert listing(empty) == {"a": "1"} and Path(".").resolve() == empty.resolve()
    assert json.loads((empty / OUTPUT_MARKER).read_text())["kind"] == "thing"


def test_read_text_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"fine\nstill fine\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"t.txt:3: not UTF-8 text \(byte 19 is b'\\xe9'\)"):
        read_text(tmp_path / "t.txt", "corpus")
    with pytest.raises(DataError, match="nope.txt: corpus not found"):
        read_text(tmp_path / "nope.txt", "corpus")
    with pytest.raises(DataError, match="is a folder, expected a corpus"):
        read_text(tmp_path, "corpus")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhi")
    assert read_text(tmp_path / "bom.txt") == "hi"
