"""Safe file I/O: atomic writes, output folders that never lose what lmlab did not write, text reading.

* Atomic writes: a crash mid-write never leaves a half-written checkpoint or result. Write to a temp file
  in the same folder, fsync it, then rename over the target (atomic on POSIX).
* Output folders (`write_output_dir`, used by every command that writes one: convert, tokenizer train,
  model/adapter/peft exports): a marker file records what kind of export lmlab wrote and which files; a
  folder holding anything else is refused unless forced, and even forced, lmlab only writes beside files it
  did not write and only ever deletes its own.
* `read_text`: every reader of a user's text file goes through it, so a missing file, a folder or bytes
  that are not UTF-8 are one-line errors naming the file (and line), never a UnicodeDecodeError.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lmlab.errors import DataError, LmlabError, OutputError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, fsync the result, and rename it to `path` (never over a folder)."""
    path = Path(path)
    check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_file(path: str | Path) -> None:
    """An output file's path must not name a folder (the rename would fail, or a caller replace it whole)."""
    if Path(path).is_dir():
        raise OutputError(f"{path}: is a folder, expected the path of a file to write")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_replace_dir(build: Callable[[Path], None], target: Path) -> None:
    """Build a whole folder under a temp name, then swap it in (old copy removed only afterwards)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_FILE = ".lmlab.lock"


class FolderLock:
    """An exclusive lock on a run folder for as long as one lmlab process writes it (flock: released by
    the kernel when the process dies, so a killed run never leaves a stale lock). A second writer gets
    an error naming the holder instead of tearing metrics.jsonl and the checkpoints."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = (self.file.read().strip().splitlines() or ["another process"])[-1]
            self.file.close()
            raise LmlabError(f"{folder}: another lmlab run is writing this folder ({holder}); "
                             "wait for it to finish or use another out_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


# ----------------------------------------------------------------------------------------------------
# output folders

OUTPUT_MARKER = ".lmlab-output.json"
"""Written into every output folder: {"kind": ..., "files": [...]}, what lmlab wrote there."""
_BUILD_PREFIX = ".lmlab-build."  # a folder being built inside an existing output folder


def _files_under(folder: Path) -> Iterator[str]:
    """Every file below `folder` as a relative path (the marker and lmlab's build folders left out);
    symlinked folders are not followed."""
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if not d.startswith(_BUILD_PREFIX)]
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            path = (rel / name).as_posix()
            if path != OUTPUT_MARKER:
                yield path


def read_marker(folder: str | Path) -> dict | None:
    """The marker of an output folder lmlab wrote, or None (absent or unreadable)."""
    try:
        data = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not isinstance(data.get("files"), list):
        return None
    return data


def _list(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


Legacy = Callable[[Path], bool]
"""Recognizes an export of the kind that an lmlab without markers wrote (e.g. config.json with dim/n_layers)."""


def write_output_dir(build: Callable[[Path], None], target: str | Path, kind: str, *, force: bool = False,
                     legacy: Legacy | None = None) -> Path:
    """Fill output folder `target` with what `build(tmp)` writes into an empty temp folder.

    A new folder is built beside it and renamed into place (atomic). An existing folder is accepted when it
    is empty or holds an earlier export of the same `kind` (its marker lists every file in it; or, without a
    marker, `legacy` recognizes it and it holds only files of the names the new export writes): each new file
    is renamed in, then the earlier export's files the new one lacks are removed. Anything else (files lmlab
    did not write, an export of another kind) is an OutputError unless `force`; with `force` the new files go
    in beside what is there, but a file of the same name that lmlab did not write is still never replaced.
    """
    shown, target = Path(target), Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise OutputError(f"{shown}: is a file, expected an output folder; nothing was written")
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _build(build, tmp, kind)
            os.replace(tmp, target)
            _fsync_dir(target.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return shown
    earlier, same_kind = _claim(shown, target, kind, force, legacy)
    tmp = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=target))
    try:
        new = _build(build, tmp, kind)
        if earlier is None:  # an unmarked earlier export: its files are those of the names the new one writes
            present = sorted(_files_under(target))
            extra = [f for f in present if f not in new]
            if extra and not force:
                raise OutputError(f"{shown}: holds files lmlab did not write ({_list(extra)}); choose a new or "
                                  "empty folder, or pass --force to write beside them; nothing was written")
            earlier = [f for f in present if f in new]
        clash = [f for f in new if (target / f).exists() and f not in earlier]
        if clash:
            raise OutputError(f"{shown}: already holds {_list(clash)}, which lmlab did not write; not replacing "
                              "it (choose a new or empty folder); nothing was written")
        # the marker first lists every lmlab file the folder may hold meanwhile, so a kill mid-way leaves
        # a folder still known to be lmlab's
        _write_marker(target, kind, sorted(set(earlier) | set(new)))
        for f in new:
            (target / f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / f, target / f)
        kept = [f for f in earlier if f not in new]
        if same_kind:  # the earlier export's files the new one lacks; another kind's files stay
            for f in kept:
                (target / f).unlink(missing_ok=True)
            kept = []
        _write_marker(target, kind, sorted(set(new) | set(kept)))
        _fsync_dir(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shown


def check_output_dir(target: str | Path, kind: str, *, force: bool = False, legacy: Legacy | None = None) -> None:
    """Raise the OutputError `write_output_dir` would raise, before any slow work (loading a model)."""
    shown, folder = Path(target), Path(target).absolute()
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{shown}: is a file, expected an output folder; nothing was written")
    if folder.is_dir():
        _claim(shown, folder, kind, force, legacy)


def _claim(shown: Path, target: Path, kind: str, force: bool, legacy: Legacy | None) -> tuple[list[str] | None, bool]:
    """(the files lmlab wrote into the existing folder `target`, whether they are an export of `kind`);
    None for the files of an unmarked earlier export `legacy` recognizes (write_output_dir checks them
    against the new export's). A folder holding anything else, or another kind of export, is refused unless
    `force`."""
    for stale in target.glob(f"{_BUILD_PREFIX}*"):  # left by a killed build: lmlab's own
        shutil.rmtree(stale, ignore_errors=True)
    marker = read_marker(target)
    if marker is None and legacy is not None and legacy(target):
        return None, True
    ours = {f for f in (marker or {}).get("files", []) if isinstance(f, str) and (target / f).is_file()}
    other_kind = marker is not None and marker["kind"] != kind
    if not force:
        foreign = list(itertools.islice((f for f in _files_under(target) if f not in ours), 5))
        if foreign or other_kind:
            what = (f"files lmlab did not write ({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''})"
                    if foreign else f"an export of another kind ({marker['kind']})")
            raise OutputError(f"{shown}: holds {what}; choose a new or empty folder, or pass --force to write the "
                              f"{kind} beside them (lmlab never replaces files it did not write); nothing was written")
    return sorted(ours), not other_kind


def _build(build: Callable[[Path], None], tmp: Path, kind: str) -> list[str]:
    build(tmp)
    files = sorted(_files_under(tmp))
    for f in files:
        with open(tmp / f, "rb+") as fh:
            os.fsync(fh.fileno())
    _write_marker(tmp, kind, files)
    return files


def _write_marker(folder: Path, kind: str, files: list[str]) -> None:
    atomic_write_text(folder / OUTPUT_MARKER, json.dumps({"kind": kind, "files": files}, indent=1) + "\n")


# ----------------------------------------------------------------------------------------------------
# reading a user's text


def read_text(path: str | Path, what: str = "file") -> str:
    """The UTF-8 text of a user's file (a leading BOM dropped). A missing file, a folder, an unreadable file
    or bytes that are not UTF-8 are a DataError naming the file (and the line of the first bad byte)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a {what}") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what} ({err.strerror})") from None
    return decode_text(raw, path, what)


def decode_text(raw: bytes, path: str | Path, what: str = "file") -> str:
    """`raw` as UTF-8 text, else a DataError naming the file, the line and the byte."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}); "
                        f"save the {what} as UTF-8") from None
