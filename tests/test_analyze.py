"""The `analyze` job wiring: figures and numbers on disk and in MLflow."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app


def test_theory_writes_figures_json_and_logs_run_with_empirical_bridge(with_teachers, tmp_path):
    at, st = with_teachers["runs"]["adversarial"], with_teachers["runs"]["standard"]
    result = CliRunner().invoke(app, ["analyze", "theory", "--classes", "10", "--runs", f"{at},{st}:1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "misclassified samples need max logit > 2.1972" in result.output
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"fig_c1_admissible_beta.png", "fig_c2_loss_surface.png", "fig_c3_fgsm_gap_change.png",
            "fig_empirical_admissible.png", "theory.json"} <= files
    summary = json.loads((tmp_path / "out" / "theory.json").read_text())
    assert len(summary["empirical"]["models"]) == 2
    run_id = result.output.strip().split("run ")[-1]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert abs(run.data.metrics["class_counts.10.misclassified_threshold"] - 2.197225) < 1e-5
    logged = {f.path for f in MlflowClient().list_artifacts(run_id, "theory")}
    assert "theory/fig_c2_loss_surface.png" in logged


def test_theory_bad_run_is_a_clear_error(with_teachers, tmp_path):
    result = CliRunner().invoke(app, ["analyze", "theory", "--runs", "deadbeef", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no run 'deadbeef'" in result.output
    assert not (tmp_path / "o").exists()
