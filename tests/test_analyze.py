"""The `analyze` job wiring: figures and numbers on disk and in MLflow."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app


def test_theory_writes_figures_json_and_logs_run_with_empirical_bridge(with_teachers, tmp_path):
    at, st = with_teachers["runs"]["adversarial"], with_teachers["runs"]["standard"]
    result = CliRunner().invoke(
        app, ["analyze", "theory", "--classes", "10", "--runs", f"{at},{st}:1", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "misclassified samples need max logit > 2.1972" in result.output
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "fig_c1_admissible_beta.png",
        "fig_c2_loss_surface.png",
        "fig_c3_fgsm_gap_change.png",
        "fig_empirical_admissible.png",
        "theory.json",
    } <= files
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


def test_manifold_runs_every_stage_and_logs_per_layer_metrics(with_teachers, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "analyze",
            "manifold",
            "--models",
            "synthetic-cnn-tiny-st",
            "synthetic-cnn-tiny-at",
            "--n-images",
            "8",
            "--n-perturbations",
            "6",
            "--n-features",
            "40",
            "--pgd-steps",
            "2",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "m" / "manifold.json").read_text())
    stages = ["input", "block1", "block2", "block3", "logits"]
    assert len(summary["models"]) == 2
    for table in summary["models"].values():
        assert table["stage"] == stages
        assert all(c > 0 for c in table["capacity"]) and all(r >= 0 for r in table["radius"])
        assert table["width"][0] == 3 * 32 * 32
    assert (tmp_path / "m" / "figure5_manifold.png").is_file()
    client = MlflowClient()
    parent_id = result.output.strip().split("run ")[-1]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "capacity")] == list(range(5))
        assert {"radius", "dimension", "center_correlation"} <= set(child.data.metrics)
    assert any(k.endswith(".block2.capacity") for k in parent.data.metrics)


def test_manifold_bad_input(with_teachers, tmp_path):
    too_many = CliRunner().invoke(
        app,
        [
            "analyze",
            "manifold",
            "--models",
            "synthetic-cnn-tiny-at",
            "--n-images",
            "100000",
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert too_many.exit_code == 2 and "n-images must be in 2.." in too_many.output
    none = CliRunner().invoke(app, ["analyze", "manifold", "--out", str(tmp_path / "m")])
    assert none.exit_code == 2 and "at least one model" in none.output
    unknown = CliRunner().invoke(app, ["analyze", "manifold", "--models", "nope", "--out", str(tmp_path / "m")])
    assert unknown.exit_code == 2 and "no registered model named 'nope'" in unknown.output


def test_gap_robustness_from_attack_runs(with_teachers, tmp_path):
    from robustlogits.config import AttackConfig
    from robustlogits.jobs.attack import run_attack

    runs = [
        run_attack(AttackConfig(model=m, n_examples=60, n_iter=5), progress=False)[0]
        for m in ("synthetic-cnn-tiny-st", "synthetic-cnn-tiny-at")
    ]
    result = CliRunner().invoke(
        app, ["analyze", "gap", "--runs", ",".join(runs), "--bins", "4", "--out", str(tmp_path / "g")]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "g" / "gap_robustness.json").read_text())
    assert len(summary["edges"]) == 5 and len(summary["models"]) == 2
    for info in summary["models"].values():
        table = info["bins"]
        assert sum(table["n"]) == 60  # every example lands in a bin (the last bin is open-ended)
        total = sum(a * n for a, n in zip(table["adversarial_accuracy"], table["n"]) if n)
        assert abs(total / 60 - info["adversarial_accuracy"]) < 1e-9
    assert (tmp_path / "g" / "figure2_gap_robustness.png").is_file()
    bad = CliRunner().invoke(app, ["analyze", "gap", "--runs", "nope", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no run 'nope'" in bad.output
