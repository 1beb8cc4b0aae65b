"""Markdown reports of a run folder or a sweep folder, with the plots embedded.

A report is drawn from the folder alone (config.yaml, summary.json, metrics.jsonl, results tables,
PNGs), so it can be regenerated at any time. An existing report is never overwritten unless asked
(`force`): reports get hand-edited and quoted, and losing one to a re-run is worse than an error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmlab.errors import LmlabError
from lmlab.evaluation import plots
from lmlab.evaluation.sweep import format_value, markdown_table
from lmlab.fileio import atomic_write_text, read_text

REPORT = "report.md"


class ReportExists(LmlabError):
    """The report file is already there and --force was not given."""


def is_sweep_dir(folder: Path) -> bool:
    return (folder / "sweep.yaml").is_file() or (folder / "results.csv").is_file()


def is_run_dir(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / "metrics.jsonl").is_file()


def write_report(folder: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Write the Markdown report of a run or sweep folder; refuse to replace an old one unless `force`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmlabError(f"{folder}: not a folder (expected a run or sweep folder)")
    path = Path(out) if out else folder / REPORT
    if path.exists() and not force:
        raise ReportExists(f"{path} already exists; pass --force to overwrite it (or --out another file)")
    if is_sweep_dir(folder):
        text = sweep_report(folder, path.parent)
    elif is_run_dir(folder):
        text = run_report(folder, path.parent)
    else:
        raise LmlabError(f"{folder}: neither a run folder (config.yaml, metrics.jsonl) nor a sweep folder "
                         "(sweep.yaml, results.csv)")
    atomic_write_text(path, text)
    return path


# ----------------------------------------------------------------------------------------------------
# sections


def run_report(run_dir: Path, report_dir: Path) -> str:
    """Title, summary table, curves, other plots, samples and the resolved config of one run."""
    parts = [f"# Run report: {run_dir.name}", "", f"Folder: `{run_dir}`", ""]
    summary = _read_json(run_dir / "summary.json")
    if summary:
        parts += ["## Summary", "", _kv_table(summary), ""]
    else:
        parts += ["_No summary.json: the run has not finished._", ""]
    images = _run_plots(run_dir)
    if images:
        parts += ["## Curves", ""] + [_image(p, report_dir) for p in images] + [""]
    evals = run_dir / "eval" / "checkpoints.csv"
    if evals.is_file():
        parts += ["## Checkpoint evaluation", "", _csv_as_markdown(evals), ""]
    samples = run_dir / "samples.txt"
    if samples.is_file():
        parts += ["## Samples", "", "```text", read_text(samples).strip(), "```", ""]
    config = run_dir / "config.yaml"
    if config.is_file():
        parts += ["## Config", "", "```yaml", read_text(config).strip(), "```", ""]
    return "\n".join(parts)


def _run_plots(run_dir: Path) -> list[Path]:
    """Curves drawn now from metrics.jsonl, plus every PNG the run (or `lmlab evaluate`) left behind."""
    drawn: list[Path] = []
    if (run_dir / "metrics.jsonl").is_file() and plots.read_metrics(run_dir):
        drawn = plots.plot_run(run_dir)
    found = sorted(p for sub in ("plots", "eval") for p in (run_dir / sub).glob("*.png"))
    return list(dict.fromkeys([*drawn, *found]))


def sweep_report(sweep_dir: Path, report_dir: Path) -> str:
    """Results tables, overlaid curves, per-run curves and the sweep config of a sweep folder."""
    parts = [f"# Sweep report: {sweep_dir.name}", "", f"Folder: `{sweep_dir}`", ""]
    results = sweep_dir / "results.md"
    if results.is_file():
        body = read_text(results).strip().splitlines()
        parts += ["## Results", "", *[("#" + line if line.startswith("## ") else line) for line in body[1:]], ""]
    plot_dir = sweep_dir / "plots"
    overlays = [p for p in sorted(plot_dir.glob("*_curves*.png"))]
    per_run = [p for p in sorted(plot_dir.glob("*.png")) if p not in overlays]
    extra = sorted(p for p in sweep_dir.glob("*.png")) + sorted((sweep_dir / "eval").glob("*.png"))
    if overlays:
        parts += ["## Compared", ""] + [_image(p, report_dir) for p in overlays] + [""]
    if extra:
        parts += ["## Analysis", ""] + [_image(p, report_dir) for p in extra] + [""]
    for md in sorted((sweep_dir / "eval").glob("*.md")):
        parts += [f"### {md.stem}", "", read_text(md).strip(), ""]
    if per_run:
        parts += ["## Each run", ""] + [_image(p, report_dir) for p in per_run] + [""]
    config = sweep_dir / "sweep.yaml"
    if config.is_file():
        parts += ["## Sweep config", "", "```yaml", read_text(config).strip(), "```", ""]
    return "\n".join(parts)


def _image(path: Path, report_dir: Path) -> str:
    rel = os.path.relpath(path, report_dir)
    return f"![{path.stem}]({Path(rel).as_posix()})"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise LmlabError(f"{path}: not valid JSON ({err.msg})") from None
    return data if isinstance(data, dict) else {}


def _kv_table(data: dict[str, Any]) -> str:
    lines = ["| key | value |", "|---|---|"]
    for key, value in data.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else format_value(value)
        lines.append(f"| {key} | {shown.replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def _csv_as_markdown(path: Path) -> str:
    import csv


    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = list(rows[0]) if rows else []
    converted = [{k: _number(v) for k, v in r.items()} for r in rows]
    return markdown_table(converted, columns)


def _number(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except (TypeError, ValueError):
            pass
    return text
