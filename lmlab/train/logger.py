"""metrics.jsonl (and TensorBoard): the log every training run writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.fileio import atomic_write_text


class MetricsLogger:
    """metrics.jsonl (one JSON object per line, flushed) and optional TensorBoard scalars.

    On resume, lines past the checkpoint's step are dropped first, so the file reads as one
    uninterrupted run. `path=None` (other ranks, tests) logs nothing.
    """

    def __init__(self, path: str | Path | None, tensorboard_dir: str | Path | None = None, resume_step: int | None = None):
        self.path, self.tb, self.file = Path(path) if path else None, None, None
        if self.path is None:
            return
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in _readable_lines(self.path) if json.loads(ln).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a" if resume_step is not None else "w")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional package
            except ImportError:
                raise LmlabError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def log(self, line: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.tb is not None:
            prefix = line.get("split", "train")
            for key, value in line.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(f"{prefix}/{key}", value, line["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()


def _readable_lines(path: Path) -> list[str]:
    """The JSON lines of a metrics file. A torn last line (a run killed mid-write, a full disk) is dropped
    with a warning; a bad line anywhere else means the file is not lmlab's log: an error naming it."""
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                print(f"warning: {path}: dropping a torn last line ({line[:60]!r})", file=sys.stderr)
                return lines[:-1]
            raise LmlabError(f"{path}:{i + 1}: not a JSON line ({line[:60]!r}); the metrics log is damaged") from None
    return lines
