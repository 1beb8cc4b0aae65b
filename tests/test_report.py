"""Reports: Markdown with the plots embedded, never overwriting an earlier report without force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.evaluation.report import ReportExists, write_report


def fake_run(folder: Path) -> Path:
    """A finished run folder as `lmlab run` leaves it (config, metrics, summary)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("out_dir: x\ntrain:\n  max_steps: 4\n")
    lines = [{"step": s, "split": "train", "loss": 4.0 - s / 2, "ppl": 1.0} for s in (1, 2, 3, 4)]
    lines.append({"step": 4, "split": "val", "loss": 2.5, "ppl": 12.18})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (folder / "summary.json").write_text(json.dumps({"val_loss": 2.5, "val_ppl": 12.18, "n_params": 123456}))
    return folder


def test_run_report_embeds_plots_and_summary(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run")
    path = write_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    assert "| val_loss | 2.5 |" in text and "| n_params | 123,456 |" in text
    assert "![loss](plots/loss.png)" in text and (run / "plots" / "loss.png").stat().st_size > 1000
    assert "max_steps: 4" in text


def test_no_overwrite_without_force(tmp_path: Path, capsys) -> None:
    run = fake_run(tmp_path / "run")
    write_report(run)
    (run / "report.md").write_text("hand-edited notes\n")
    with pytest.raises(ReportExists, match="--force"):
        write_report(run)
    assert (run / "report.md").read_text() == "hand-edited notes\n"
    with pytest.raises(SystemExit) as exit_info:  # the CLI: one clear line, exit status 1
        main(["report", str(run)])
    assert exit_info.value.code == 1 and "already exists" in capsys.readouterr().err
    write_report(run, force=True)
    assert "# Run report: run" in (run / "report.md").read_text()


def test_sweep_report_with_out_file(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sw"
    fake_run(sweep_dir / "a")
    (sweep_dir / "results.csv").write_text("run,status,val_loss\na,done,2.5\n")
    (sweep_dir / "results.md").write_text("# Sweep results\n\n| run | val_loss |\n|---|---|\n| a | 2.5 |\n")
    (sweep_dir / "plots").mkdir()
    from lmlab.evaluation import plots

    plots.plot_overlay({"a": plots.read_metrics(sweep_dir / "a")}, "loss", sweep_dir / "plots" / "loss_curves.png")
    out = tmp_path / "docs" / "sweep.md"
    write_report(sweep_dir, out)
    text = out.read_text()
    assert "| a | 2.5 |" in text and "![loss_curves](../sw/plots/loss_curves.png)" in text
    with pytest.raises(ReportExists):
        write_report(sweep_dir, out)
