"""The `distill` job: teacher-logit artifacts and reuse, lineage, the headline command, bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app
from robustlogits.core.data import build_bundle, make_synthetic
from robustlogits.core.models import build_model
from robustlogits.jobs.distill import averaged_teacher_logits
from robustlogits.tracking import logged_model_id, students_of

REPO = Path(__file__).resolve().parents[1]
AT, ST, STUDENT = "synthetic-cnn-tiny-at", "synthetic-cnn-tiny-st", "synthetic-cnn-tiny-student"


def runs(job=None):
    client = MlflowClient()
    found = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    return [r for r in found if job is None or r.data.tags.get("robustlogits.job") == job]


def distill(*args):
    result = CliRunner().invoke(app, ["distill", "--preset", "test", *args])
    return result


def run_id_of(result):
    import re

    return re.search(r"run ([0-9a-f]{32}) finished", result.output).group(1)


def test_permute_k3_student_is_linked_attacked_and_listed(with_teachers):
    result = distill("--manipulation", "permute", "--k", "3")
    assert result.exit_code == 0, result.output
    client = MlflowClient()
    run = client.get_run(run_id_of(result))
    assert run.info.status == "FINISHED"
    tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
    assert tags["teacher_name"] == AT and tags["teacher_version"] == "2"  # the Production teacher
    assert tags["manipulation"] == "permute" and tags["k"] == "3" and tags["loss"] == "l1"
    assert params["distill.manipulation"] == "permute" and params["distill.k"] == "3"
    assert params["data.val_per_class"] == "0" and params["data.dataset"] == "synthetic"
    assert {
        "natural_accuracy",
        "adversarial_accuracy",
        "targets_teacher_error_rate",
        "targets_frac_argmax_changed",
        "train_gap_mean",
        "test_max_logit_skew",
    } <= set(metrics)
    assert metrics["adversarial_accuracy"] <= metrics["natural_accuracy"]
    assert metrics["targets_frac_argmax_changed"] == 0.0  # permute keeps the top class
    assert run.inputs.model_inputs, "the teacher model is an input of the student run"
    # The teacher-logit artifact lives on a run of its own, named in the lineage.
    logits_run = client.get_run(tags["teacher_logits_run"])
    assert logits_run.data.tags["robustlogits.job"] == "teacher-logits"
    files = {f.path for f in client.list_artifacts(logits_run.info.run_id, "teacher_logits")}
    assert "teacher_logits/teacher_logits.npz" in files
    # The registered student version carries the lineage; the registry lists students of a teacher.
    student = [v for v in students_of(AT, 2) if v.run_id == run.info.run_id]
    assert len(student) == 1 and student[0].name == STUDENT
    v = student[0]
    assert v.tags["teacher_run_id"] == with_teachers["runs"]["adversarial"]
    assert v.tags["teacher_logits_run"] == logits_run.info.run_id and "adversarial_accuracy" in v.tags
    assert all(s.tags["teacher_name"] == AT for s in students_of(AT))
    # The closing line says what was built from what, and how it fared.
    assert f"from teacher {AT} version 2 (permute k=3)" in result.output
    assert (
        f"natural {metrics['natural_accuracy']:.4f}, adversarial {metrics['adversarial_accuracy']:.4f}" in result.output
    )
    # The teacher's side lists its students; the student's logged model holds its attack's metrics.
    assert f"{STUDENT}/{v.version} (permute k=3" in client.get_model_version(AT, "2").tags["students"]
    model = client.get_logged_model(logged_model_id(v))
    assert model.source_run_id == run.info.run_id
    linked = {x.key: x.value for x in model.metrics}
    assert linked["adversarial_accuracy"] == pytest.approx(metrics["adversarial_accuracy"])
    assert {"checkpoint_test_accuracy", "train_gap_mean"} <= set(linked)
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert v.tags["attacked_natural_accuracy"] == f"{metrics['natural_accuracy']:.4f}"
    # Teacher-logit runs are artifacts, not trainings: they have an experiment of their own.
    assert client.get_experiment(logits_run.info.experiment_id).name == "robustlogits-teacher-logits"


def test_teacher_logits_are_reused_not_recomputed(with_teachers):
    first = distill("--manipulation", "average", "--k", "2", "--no-attack")
    second = distill("--manipulation", "correct-fix", "--no-attack")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    client = MlflowClient()
    a, b = (client.get_run(run_id_of(r)) for r in (first, second))
    assert a.data.tags["teacher_logits_run"] == b.data.tags["teacher_logits_run"]
    assert b.data.params["teacher_logits_reused"] == "True"
    assert len([r for r in runs("teacher-logits") if r.data.tags["teacher_name"] == AT]) == 1
    assert b.data.tags["k"] == "1"  # correct-fix defaults to the paper's correct-fix-1
    assert b.data.metrics["targets_manipulated_error_rate"] == 0.0


def test_hybrid_uses_the_standard_teacher(with_teachers):
    result = distill("--manipulation", "hybrid", "--no-attack", "--set", "optim.epochs=1")
    assert result.exit_code == 0, result.output
    tags = MlflowClient().get_run(run_id_of(result)).data.tags
    assert tags["st_teacher_name"] == ST


def test_mismatched_teacher_logit_artifact_is_refused(with_teachers):
    good = distill("--manipulation", "none", "--no-attack")
    logits_run = MlflowClient().get_run(run_id_of(good)).data.tags["teacher_logits_run"]
    before = len(runs())
    bad = distill("--teacher-logits-run", logits_run, "--set", "data.train_subset=100", "--no-attack")
    assert bad.exit_code == 2 and "does not match" in bad.output and "shape" in bad.output
    assert len(runs()) == before


BAD = [
    (["--manipulation", "permute", "--k", "0"], "k must be in 1..10"),
    (["--manipulation", "average", "--k", "11"], "k must be in 1..10"),
    (["--manipulation", "permute"], "needs k"),
    (["--manipulation", "shuffle"], "unknown manipulation 'shuffle'"),
    (["--loss", "hinge"], "unknown loss 'hinge'"),
    (["--loss", "kl", "--temperature", "0"], "temperature must be > 0"),
    (["--manipulation", "hybrid", "--st-teacher", "no-st-model"], "no registered model named 'no-st-model'"),
    (["--teacher", "missing-teacher"], "no registered model named 'missing-teacher'"),
    (["--teacher", AT, "--teacher-stage", "Staging"], "has no version in stage 'Staging'"),
    (["--n-examples", "100000"], "larger than the test split"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m[:28] for _, m in BAD])
def test_bad_input_exits_2_registers_nothing_and_leaves_no_run(with_teachers, args, message):
    before_runs = {r.info.run_id for r in runs()}
    before_versions = len(MlflowClient().search_model_versions(f"name='{STUDENT}'")) if _has(STUDENT) else 0
    result = distill(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert {r.info.run_id for r in runs()} == before_runs
    after_versions = len(MlflowClient().search_model_versions(f"name='{STUDENT}'")) if _has(STUDENT) else 0
    assert after_versions == before_versions


def _has(name):
    return any(m.name == name for m in MlflowClient().search_registered_models())


def test_averaging_over_augmentations_reduces_target_noise_and_leaves_teacher_untouched():
    raw = make_synthetic(16, 2)
    bundle = build_bundle(
        raw,
        val_per_class=0,
        split_seed=0,
        train_subset=None,
        stats_subset=8,
        heldout_subset=None,
        device=torch.device("cpu"),
    )
    torch.manual_seed(0)
    teacher = build_model("cnn-tiny", 10, "synthetic")
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}

    def spread(n):
        a = averaged_teacher_logits(teacher, bundle.train, n, "eval", seed=1)
        b = averaged_teacher_logits(teacher, bundle.train, n, "eval", seed=2)
        return (a - b).abs().mean().item()

    assert spread(16) < 0.5 * spread(1)
    same = averaged_teacher_logits(teacher, bundle.train, 3, "train", seed=5)
    np.testing.assert_array_equal(same, averaged_teacher_logits(teacher, bundle.train, 3, "train", seed=5))
    plain = averaged_teacher_logits(teacher, bundle.train, 3, "eval", seed=5)
    layout = averaged_teacher_logits(teacher, bundle.train, 3, "eval", seed=5, channels_last=True)
    torch.testing.assert_close(layout, plain, atol=1e-5, rtol=1e-5)  # a memory layout, not other targets
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_headline_mlflow_run_command(with_teachers):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "distill",
            "--env-manager",
            "local",
            "-P",
            "manipulation=permute",
            "-P",
            "k=3",
            "-P",
            "preset=test",  # the product's own usage
            "-P",
            "distill.teacher_logits_seed=123",
        ],  # fresh teacher logits: a run of their own
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=with_teachers["root"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = max(runs("distill"), key=lambda r: r.info.start_time)
    assert latest.info.status == "FINISHED"
    assert latest.data.params["distill.manipulation"] == "permute" and latest.data.params["distill.k"] == "3"
    assert f"from teacher {AT} version 2 (permute k=3); on " in proc.stdout and "adversarial 0." in proc.stdout
    # No --experiment-name: the launcher filed it under Default, and the job says so (once).
    assert proc.stderr.count("mlflow run filed this run under experiment 'Default'") == 1
    assert latest.data.tags["manipulation"] == "permute" and latest.data.tags["teacher_name"] == AT
    assert "mlflow.project.entryPoint" in latest.data.tags  # the launcher's own run was adopted
    assert latest.data.params["teacher_logits_reused"] == "False"
    logits_run = MlflowClient().get_run(latest.data.tags["teacher_logits_run"])
    assert logits_run.data.tags["robustlogits.job"] == "teacher-logits" and logits_run.info.status == "FINISHED"
    launched = [
        r
        for r in runs()
        if "mlflow.project.entryPoint" in r.data.tags and r.info.start_time >= latest.info.start_time - 60_000
    ]
    assert [r.info.run_id for r in launched] == [latest.info.run_id]  # no empty launcher run left behind
    assert all(r.info.status != "RUNNING" for r in runs())


def test_lineage_in_a_sqlite_store_teacher_is_input_student_is_output(tmp_path, monkeypatch):
    """sqlite leaves a registry version's model_id empty (its source is models:/m-...): the
    teacher's logged model must still be the student run's input, so the run page links them."""
    import mlflow

    from robustlogits.config import preset
    from robustlogits.jobs.train import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    cfg = preset("test")
    cfg.run.training = "adversarial"
    cfg.optim.epochs, cfg.run.checkpoint_epochs, cfg.run.teacher_epoch = 1, (1,), 1
    cfg.monitor.robust_every = 0
    run_training(cfg, progress=False)
    client = MlflowClient()
    teacher_version = client.get_model_version(AT, "1")
    assert teacher_version.source.startswith("models:/m-")
    result = distill("--manipulation", "none", "--no-attack", "--epochs", "1")
    assert result.exit_code == 0, result.output
    run = client.get_run(run_id_of(result))
    assert [i.model_id for i in run.inputs.model_inputs] == [logged_model_id(teacher_version)]
    student = students_of(AT, 1)[0]
    assert [o.model_id for o in run.outputs.model_outputs] == [logged_model_id(student)]
    assert client.get_logged_model(logged_model_id(student)).source_run_id == run.info.run_id
    assert client.get_model_version(AT, "1").tags["students"].startswith(f"{STUDENT}/{student.version} (none")
