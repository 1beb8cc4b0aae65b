"""Sweeps: real tiny runs per grid point, the results table, skipping finished runs, seeds -> mean/std."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.errors import ConfigError
from lmlab.commands.sweep import inprocess_runner
from lmlab.evaluation import sweep
from tests.test_plots import tiny_recipe


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_grid_of_real_runs_then_rerun_skips(tmp_path: Path, shared_data: Path) -> None:
    recipe = tiny_recipe(tmp_path, shared_data)
    cfg = sweep.sweep_from_recipe(recipe, ["optim.lr=1e-3,3e-3"], [], out_dir=str(tmp_path / "sw"),
                                  overrides=["train.max_steps=4"])
    calls: list[str] = []

    def runner(recipe: Path, spec: sweep.RunSpec) -> None:
        calls.append(spec.name)
        inprocess_runner(recipe, spec)

    result = sweep.run_sweep(cfg, recipe, runner, log=lambda _: None)
    assert calls == ["lr_0.001", "lr_0.003"] and not result.failed
    rows = read_csv(tmp_path / "sw" / "results.csv")
    assert [r["run"] for r in rows] == ["lr_0.001", "lr_0.003"]
    for r in rows:  # each row is the run's own summary.json
        summary = json.loads((tmp_path / "sw" / r["run"] / "summary.json").read_text())
        assert float(r["val_loss"]) == pytest.approx(summary["val_loss"]) and r["status"] == "done"
    config = (tmp_path / "sw" / "lr_0.003" / "config.yaml").read_text()
    assert "lr: 0.003" in config and "max_steps: 4" in config
    md = (tmp_path / "sw" / "results.md").read_text()
    assert "| lr_0.001 | done |" in md and "| lr_0.003 | done |" in md
    for name in ("loss_curves.png", "perplexity_curves.png", "loss_lr_0.001.png", "perplexity_lr_0.003.png"):
        assert (tmp_path / "sw" / "plots" / name).stat().st_size > 2000

    calls.clear()
    again = sweep.run_sweep(cfg, recipe, runner, log=lambda _: None)
    assert calls == [] and again.skipped == ["lr_0.001", "lr_0.003"]
    assert len(read_csv(tmp_path / "sw" / "results.csv")) == 2


def fake_runner(values: dict[str, float]):
    """Writes a summary.json whose val_loss is given per run name (the orchestration, no training)."""

    def run(recipe: Path, spec: sweep.RunSpec) -> None:
        if spec.name == "broken":
            raise RuntimeError("boom")
        spec.run_dir.mkdir(parents=True)
        (spec.run_dir / "summary.json").write_text(json.dumps({"val_loss": values[spec.name], "n_params": 10}))

    return run


def test_seeds_give_mean_and_std_per_point(tmp_path: Path, shared_data: Path) -> None:
    recipe = tiny_recipe(tmp_path, shared_data)
    cfg = sweep.SweepConfig(recipe=str(recipe), out_dir=str(tmp_path / "sw"),
                            points={"base": [], "small": ["model.dim=16"]}, seeds=[0, 1, 2])
    values = {"base-seed0": 2.0, "base-seed1": 2.5, "base-seed2": 3.0,
              "small-seed0": 4.0, "small-seed1": 4.0, "small-seed2": 4.6}
    specs = sweep.plan(cfg, recipe)
    assert [s.overrides for s in specs[:2]] == [["train.seed=0"], ["train.seed=1"]]
    assert specs[3].overrides == ["model.dim=16", "train.seed=0"]
    sweep.run_sweep(cfg, recipe, fake_runner(values), log=lambda _: None)
    points = read_csv(tmp_path / "sw" / "points.csv")
    assert [p["point"] for p in points] == ["base", "small"] and points[0]["n"] == "3"
    assert float(points[0]["val_loss_mean"]) == pytest.approx(2.5)
    assert float(points[0]["val_loss_std"]) == pytest.approx(0.5)
    assert float(points[1]["val_loss_std"]) == pytest.approx(statistics.stdev([4.0, 4.0, 4.6]))
    assert "| base | 3 | 2.5 ± 0.5 | 10 ± 0 |" in (tmp_path / "sw" / "results.md").read_text()


def test_failed_run_is_reported_and_others_still_run(tmp_path: Path, shared_data: Path) -> None:
    recipe = tiny_recipe(tmp_path, shared_data)
    cfg = sweep.SweepConfig(recipe=str(recipe), out_dir=str(tmp_path / "sw"), jobs=2,
                            points={"broken": [], "ok": []})
    result = sweep.run_sweep(cfg, recipe, fake_runner({"ok": 1.0}), log=lambda _: None)
    assert list(result.failed) == ["broken"] and result.ran == ["ok"]
    rows = read_csv(tmp_path / "sw" / "results.csv")
    assert [(r["run"], r["status"]) for r in rows] == [("broken", "failed"), ("ok", "done")]  # not "pending"
    assert rows[0]["error"] == "boom"
    assert "| broken | failed |" in (tmp_path / "sw" / "results.md").read_text()


def test_plan_checks_keys_devices_round_robin_and_threads(tmp_path: Path, shared_data: Path) -> None:
    recipe = tiny_recipe(tmp_path, shared_data)
    bad = sweep.SweepConfig(recipe=str(recipe), out_dir=str(tmp_path / "sw"), grid={"optim.lrr": [1, 2]})
    with pytest.raises(ConfigError, match="optim.lrr"):
        sweep.plan(bad, recipe)
    cfg = sweep.SweepConfig(recipe=str(recipe), out_dir=str(tmp_path / "sw"), grid={"model.n_layers": [1, 2, 3]},
                            devices=["cpu", "cuda:0"], jobs=2)
    specs = sweep.plan(cfg, recipe)
    assert [s.device for s in specs] == ["cpu", "cuda:0", "cpu"]
    assert [s.name for s in specs] == ["n_layers_1", "n_layers_2", "n_layers_3"]
    assert any(o.startswith("train.threads=") for o in specs[0].overrides)
    assert not any(o.startswith("train.threads=") for o in specs[1].overrides)
    assert sweep.run_overrides(specs[1])[-1] == "precision.device=cuda:0"


def test_sweep_file_through_the_cli_in_subprocesses(tmp_path: Path, shared_data: Path, capsys) -> None:
    recipe = tiny_recipe(tmp_path, shared_data)
    file = tmp_path / "sweep.yaml"
    file.write_text(f"recipe: {recipe.name}\nout_dir: {tmp_path / 'sw'}\n"
                    "overrides: [train.max_steps=2, train.eval_every=0]\npoints: {one: [model.n_layers=1]}\n")
    assert sweep.is_sweep_file(file) and not sweep.is_sweep_file(recipe)
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", str(file), "jobs=1"])
    assert exit_info.value.code == 0
    assert (tmp_path / "sw" / "one" / "summary.json").is_file()
    assert "lmlab run" in (tmp_path / "sw" / "logs" / "one.log").read_text()
    with pytest.raises(SystemExit):
        main(["sweep", str(file), "--dry-run"])
    assert "done" in capsys.readouterr().out
