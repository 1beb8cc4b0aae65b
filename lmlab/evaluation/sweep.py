"""Sweeps: one run per point of a grid (or named override lists) x seeds, then a results table and curves.

A sweep is data (STYLE.md point 12, nanochat `runs/scaling_laws.sh`): every run writes its own folder
under the sweep folder (resolved config, metrics.jsonl, summary.json), a run whose summary.json exists is
finished and skipped on re-run, and the tables and plots are rebuilt from those folders alone. Each run
is a separate `python -m lmlab run` process, so runs can go to different devices (round-robin) or run
side by side on CPU, and a crash in one run never takes the sweep down.

A sweep file (YAML) mirrors `SweepConfig`:

    recipe: minigpt-baseline.yaml      # relative to the sweep file
    overrides: [train.max_steps=300]   # every run
    points: {baseline: [], lr_1e-3: [optim.lr=1e-3]}
    grid: {model.n_layers: [1, 2]}     # crossed with the points
    seeds: [0, 1, 2]                   # mean +/- std per point
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from lmlab.errors import ConfigError, LmlabError
from lmlab.evaluation import plots
from lmlab.fileio import atomic_write_text
from lmlab.schema.load import Section, load_config, parse_scalar, save_config
from lmlab.schema.pretrain import PretrainConfig

SUMMARY = "summary.json"


class SweepConfig(Section):
    """A sweep: base recipe, points, seeds and where the runs go."""

    recipe: str = ""
    """Base recipe YAML (a path relative to the sweep file, or absolute)."""
    out_dir: str = ""
    """Sweep folder holding one folder per run; empty = runs/sweeps/<sweep file name>."""
    overrides: list[str] = Field(default_factory=list)
    """`a.b=c` overrides applied to every run, before the point's own."""
    points: dict[str, list[str]] = Field(default_factory=dict)
    """Named points, each a list of `a.b=c` overrides (empty list = the recipe as is)."""
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    """Dotted key -> values; every combination is a point, crossed with the named points."""
    seeds: list[int] = Field(default_factory=list)
    """Run every point once per seed (set through `seed_key`); empty = the recipe's seed."""
    seed_key: str = "train.seed"
    """The recipe key a seed is written to."""
    devices: list[str] = Field(default_factory=list)
    """Devices given to the runs round-robin (as `precision.device`); empty = the recipe's."""
    jobs: int = Field(1, ge=1)
    """Runs at the same time (separate processes)."""
    metrics: list[str] = Field(default_factory=lambda: ["val_loss", "val_ppl", "train_loss", "wall_time_s",
                                                         "tokens_seen", "n_params"])
    """summary.json keys shown in the Markdown tables (the CSV keeps every scalar)."""
    after: list[str] = Field(default_factory=list)
    """lmlab commands run once all runs are done; `{sweep_dir}` is replaced by the sweep folder."""


@dataclass
class RunSpec:
    """One planned run: its name, its point, its seed and the overrides that make it."""

    name: str
    point: str
    seed: int | None
    overrides: list[str]
    run_dir: Path
    device: str | None = None

    @property
    def finished(self) -> bool:
        return (self.run_dir / SUMMARY).is_file()


Runner = Callable[[Path, RunSpec], None]  # (recipe, spec) -> None; raises on failure


# ----------------------------------------------------------------------------------------------------
# loading and planning


def is_sweep_file(path: str | Path) -> bool:
    """A sweep file names its base `recipe`; a recipe never has that key."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):  # unreadable, not UTF-8, not YAML: the recipe loader says so
        return False
    return isinstance(data, dict) and "recipe" in data


def load_sweep(path: str | Path, overrides: list[str] = ()) -> tuple[SweepConfig, Path]:
    """The sweep config (strict, like a recipe) and the resolved base recipe path. An override of a sweep
    key (`jobs=2`) changes the sweep; any other (`train.max_steps=100`) is a recipe override for every run."""
    path = Path(path)
    own = [o for o in overrides if o.partition("=")[0].split(".")[0].strip() in SweepConfig.model_fields]
    cfg = load_config(path, own, schema=SweepConfig)
    cfg.overrides = [*cfg.overrides, *(o for o in overrides if o not in own)]
    if not cfg.recipe:
        raise ConfigError(f"{path}: `recipe` is empty; expected the base recipe YAML")
    recipe = Path(cfg.recipe)
    if not recipe.is_absolute():
        recipe = path.parent / recipe
    if not cfg.out_dir:
        cfg.out_dir = str(Path("runs") / "sweeps" / path.stem)
    return cfg, recipe


def override_text(key: str, value: Any) -> str:
    """`key=value` with the value written so that the recipe loader reads back the same value."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{key}={text}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "point"


def _grid_points(grid: dict[str, list[Any]], source: str) -> list[tuple[str, list[str]]]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid.{key}: expected a non-empty list of values")
    combos = itertools.product(*grid.values()) if grid else [()]
    out = []
    for combo in combos:
        pairs = list(zip(grid, combo))
        name = "-".join(f"{k.rsplit('.', 1)[-1]}_{v if isinstance(v, str) else json.dumps(v)}" for k, v in pairs)
        out.append((_slug(name) if name else "", [override_text(k, v) for k, v in pairs]))
    return out


def plan(cfg: SweepConfig, recipe: Path, source: str = "sweep") -> list[RunSpec]:
    """Every run of the sweep, in order; each (recipe + overrides) is validated before anything runs."""
    named = list(cfg.points.items()) or [("", [])]
    for name, ovs in named:
        if not isinstance(ovs, list) or not all(isinstance(o, str) and "=" in o for o in ovs):
            raise ConfigError(f"{source}: points.{name}: expected a list of `a.b=c` strings, got {ovs!r}")
    if cfg.jobs < 1:
        raise ConfigError(f"{source}: jobs={cfg.jobs}: expected at least 1")
    sweep_dir = Path(cfg.out_dir)
    specs: list[RunSpec] = []
    for (pname, povs), (gname, govs) in itertools.product(named, _grid_points(cfg.grid, source)):
        point = "-".join(p for p in (_slug(pname) if pname else "", gname) if p) or "base"
        for seed in cfg.seeds or [None]:
            name = point if seed is None else f"{point}-seed{seed}"
            ovs = [*cfg.overrides, *povs, *govs]
            if seed is not None:
                ovs.append(override_text(cfg.seed_key, seed))
            specs.append(RunSpec(name, point, seed, ovs, sweep_dir / name))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: two points share a run name: {sorted(n for n in names if names.count(n) > 1)}")
    _assign_devices(specs, cfg)
    for spec in specs:  # a typo in a grid key fails here, not after an hour of other runs
        load_config(recipe, run_overrides(spec), schema=PretrainConfig)
    return specs


def _assign_devices(specs: list[RunSpec], cfg: SweepConfig) -> None:
    """Round-robin devices; parallel CPU processes share the cores instead of oversubscribing them."""
    for i, spec in enumerate(specs):
        spec.device = cfg.devices[i % len(cfg.devices)] if cfg.devices else None
        on_cpu = spec.device in (None, "cpu")
        if cfg.jobs > 1 and on_cpu and not any(o.startswith("train.threads=") for o in spec.overrides):
            spec.overrides.append(f"train.threads={max(1, (os.cpu_count() or 1) // cfg.jobs)}")


def run_overrides(spec: RunSpec) -> list[str]:
    """The overrides a run is launched with: the point's, then its folder and device (these win)."""
    ovs = [*spec.overrides, f"out_dir={spec.run_dir}"]
    if spec.device:
        ovs.append(f"precision.device={spec.device}")
    return ovs


# ----------------------------------------------------------------------------------------------------
# running


class RunFailed(LmlabError):
    """A run of the sweep exited with an error."""


def subprocess_runner(recipe: Path, spec: RunSpec) -> None:
    """`python -m lmlab run RECIPE overrides...`, output to <sweep>/logs/<name>.log."""
    log = spec.run_dir.parent / "logs" / f"{spec.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "lmlab", "run", str(recipe), *run_overrides(spec)]
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        raise RunFailed(f"run {spec.name} exited with status {code} (see {log}): {tail[0]}")


@dataclass
class SweepResult:
    """What the sweep did, and where its tables are."""

    sweep_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    tables: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def run_sweep(
    cfg: SweepConfig, recipe: Path, runner: Runner = subprocess_runner, log: Callable[[str], None] = print,
) -> SweepResult:
    """Run every unfinished point (jobs at a time), then write the tables, the plots and the `after` steps."""
    specs = plan(cfg, recipe)
    sweep_dir = Path(cfg.out_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, sweep_dir / "sweep.yaml")
    result = SweepResult(sweep_dir)
    pending = [s for s in specs if not s.finished]
    result.skipped = [s.name for s in specs if s.finished]
    for name in result.skipped:
        log(f"skip {name}: finished ({SUMMARY} present)")
    lock = threading.Lock()

    def one(spec: RunSpec) -> None:
        log(f"run  {spec.name}" + (f" on {spec.device}" if spec.device else ""))
        try:
            runner(recipe, spec)
            if not spec.finished:
                raise RunFailed(f"run {spec.name} ended without writing {spec.run_dir / SUMMARY}")
        except Exception as err:  # one failed run must not stop the others
            with lock:
                result.failed[spec.name] = str(err)
            log(f"FAIL {spec.name}: {err}")
            return
        with lock:
            result.ran.append(spec.name)
            write_tables(specs, sweep_dir, cfg.metrics, result.failed)  # the table grows as runs finish
        log(f"done {spec.name}")

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        list(pool.map(one, pending))
    result.tables = write_tables(specs, sweep_dir, cfg.metrics, result.failed)
    result.plots = write_plots(specs, sweep_dir)
    if not result.failed:
        _run_after(cfg, sweep_dir, log)
    return result


def _run_after(cfg: SweepConfig, sweep_dir: Path, log: Callable[[str], None]) -> None:
    for line in cfg.after:
        argv = shlex.split(line.replace("{sweep_dir}", str(sweep_dir)))
        log("after: lmlab " + shlex.join(argv))
        code = subprocess.call([sys.executable, "-m", "lmlab", *argv])
        if code != 0:
            raise RunFailed(f"after-step `lmlab {shlex.join(argv)}` exited with status {code}")


# ----------------------------------------------------------------------------------------------------
# results


def collect(specs: list[RunSpec], failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per run: name, point, seed, status, overrides, then every scalar of its summary.json.
    status: done (summary.json), failed (with the error), started (a folder without a summary: running,
    or stopped without finishing) or pending (not started)."""
    rows = []
    failed = failed or {}
    for spec in specs:
        row: dict[str, Any] = {"run": spec.name, "point": spec.point, "seed": spec.seed}
        if spec.finished:
            summary = json.loads((spec.run_dir / SUMMARY).read_text())
            row["status"] = "done"
            row.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None})
        elif spec.name in failed:
            row["status"], row["error"] = "failed", failed[spec.name]
        else:
            row["status"] = "started" if spec.run_dir.is_dir() else "pending"
        row["overrides"] = " ".join(spec.overrides)
        rows.append(row)
    return rows


def aggregate(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per point: n finished runs, and mean and sample std (n-1) of each metric over seeds."""
    out = []
    for point in dict.fromkeys(r["point"] for r in rows):
        done = [r for r in rows if r["point"] == point and r["status"] == "done"]
        agg: dict[str, Any] = {"point": point, "n": len(done)}
        for m in metrics:
            vals = [float(r[m]) for r in done if isinstance(r.get(m), (int, float)) and math.isfinite(r[m])]
            agg[f"{m}_mean"] = statistics.fmean(vals) if vals else None
            agg[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        out.append(agg)
    return out


def write_tables(specs: list[RunSpec], sweep_dir: Path, metrics: list[str],
                 failed: dict[str, str] | None = None) -> list[Path]:
    """results.csv (every run, every scalar), results.md; with seeds also points.csv (mean/std)."""
    rows = collect(specs, failed)
    paths = [sweep_dir / "results.csv", sweep_dir / "results.md"]
    atomic_write_text(paths[0], to_csv(rows))
    shown = [m for m in metrics if any(m in r for r in rows)]
    errors = ["error"] if any("error" in r for r in rows) else []
    md = ["# Sweep results", "", markdown_table(rows, ["run", "status", *shown, *errors])]
    if any(s.seed is not None for s in specs):
        points = aggregate(rows, shown)
        paths.append(sweep_dir / "points.csv")
        atomic_write_text(paths[-1], to_csv(points))
        md += ["", "## Mean +/- std over seeds", "", markdown_table(_mean_std_rows(points, shown), ["point", "n", *shown])]
    atomic_write_text(paths[1], "\n".join(md) + "\n")
    return paths


def _mean_std_rows(points: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    rows = []
    for p in points:
        row = {"point": p["point"], "n": p["n"]}
        for m in metrics:
            mean, std = p[f"{m}_mean"], p[f"{m}_std"]
            row[m] = "" if mean is None else format_value(mean) + ("" if std is None else f" ± {format_value(std)}")
        rows.append(row)
    return rows


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in columns} for r in rows)
    return buf.getvalue()


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub Markdown table of `columns` (missing cells empty)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(format_value(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def write_plots(specs: list[RunSpec], sweep_dir: Path) -> list[Path]:
    """Per-run loss/perplexity curves and overlays by step and by tokens, under <sweep>/plots/."""
    runs = {s.name: plots.read_metrics(s.run_dir) for s in specs if (s.run_dir / "metrics.jsonl").is_file()}
    runs = {k: v for k, v in runs.items() if v}
    out = sweep_dir / "plots"
    paths: list[Path] = []
    for name, metrics in runs.items():
        paths.append(plots.plot_run_curve(metrics, "loss", out / f"loss_{name}.png", f"loss: {name}"))
        paths.append(plots.plot_run_curve(metrics, "ppl", out / f"perplexity_{name}.png", f"perplexity: {name}"))
    if runs:
        paths.append(plots.plot_overlay(runs, "loss", out / "loss_curves.png", title="loss by step"))
        paths.append(plots.plot_overlay(runs, "ppl", out / "perplexity_curves.png", title="perplexity by step"))
        paths.append(plots.plot_overlay(runs, "loss", out / "loss_curves_tokens.png", x="tokens",
                                        title="loss by tokens seen"))
    return paths


def sweep_from_recipe(
    recipe: str | Path, grid: list[str], seeds: list[int], out_dir: str = "", overrides: list[str] = (),
) -> SweepConfig:
    """A sweep over `--grid key=v1,v2` flags of a plain recipe (values parsed as YAML scalars)."""

    table: dict[str, list[Any]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,... (e.g. optim.lr=1e-3,3e-4)")
        table[key.strip()] = [parse_scalar(v) for v in values.split(",")]
    name = Path(recipe).stem
    return SweepConfig(recipe=str(recipe), out_dir=out_dir or str(Path("runs") / "sweeps" / name),
                       overrides=list(overrides), grid=table, seeds=list(seeds))
