"""The `attack` job: registry resolution, linking, per-example artifact, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app
from robustlogits.config import AttackConfig
from robustlogits.core.errors import UserError
from robustlogits.jobs.attack import run_attack
from robustlogits.tracking import resolve_model
from robustlogits.tracking.attack_records import load_attack_result

AT = "synthetic-cnn-tiny-at"


def run_count():
    client = MlflowClient()
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


@pytest.mark.parametrize(
    "spec,kwargs,expected",
    [
        (f"models:/{AT}/Production", {}, "2"),
        (f"models:/{AT}@teacher", {}, "2"),
        (f"models:/{AT}/1", {}, "1"),
        (AT, {"stage": "Production"}, "2"),
        (AT, {"alias": "teacher"}, "2"),
        (AT, {"version": 1}, "1"),
        (AT, {}, "2"),  # a bare name means its Production version
    ],
)
def test_registry_resolution_by_stage_alias_and_version(with_teachers, spec, kwargs, expected):
    uri, version = resolve_model(spec, **kwargs)
    assert str(version.version) == expected and uri == f"models:/{AT}/{expected}"


def train_job_model_id(version):
    from robustlogits.tracking import logged_model_id

    return logged_model_id(version)


def test_attack_registered_teacher_links_run_and_tags_version(with_teachers):
    cfg = AttackConfig(model=f"models:/{AT}@teacher", n_examples=60, n_iter=5)
    run_id, result = run_attack(cfg, progress=False)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["model_name"] == AT and run.data.tags["model_version"] == "2"
    assert run.data.tags["source_run_id"] == with_teachers["runs"]["adversarial"]
    m = run.data.metrics
    assert m["adversarial_accuracy"] <= m["accuracy_after_apgd_ce"] <= m["natural_accuracy"]
    assert m["n_examples"] == 60
    version = client.get_model_version(AT, "2")
    assert float(version.tags["adversarial_accuracy"]) == pytest.approx(m["adversarial_accuracy"], abs=1e-4)
    assert version.tags["adversarial_accuracy_run"] == run_id
    assert run.inputs.model_inputs, "the attacked model is an input of the run"
    # The attack's metrics also belong to the attacked logged model: the models table ranks by them.
    model_id = train_job_model_id(version)
    assert [i.model_id for i in run.inputs.model_inputs] == [model_id]
    linked = {x.key: x for x in client.get_logged_model(model_id).metrics}
    assert linked["adversarial_accuracy"].value == pytest.approx(m["adversarial_accuracy"])
    assert linked["adversarial_accuracy"].run_id == run_id
    assert "checkpoint_test_accuracy" in linked  # and its training epoch's metrics, from the training run
    assert version.tags["attacked_natural_accuracy"] == f"{m['natural_accuracy']:.4f}"
    # The per-example artifact agrees with the metrics.
    rows = load_attack_result(run_id)
    assert len(rows.index) == 60 and len(set(rows.index)) == 60
    assert rows.robust.mean() == pytest.approx(m["adversarial_accuracy"])
    assert (rows.clean_logits.argmax(1) == rows.label).mean() == pytest.approx(m["natural_accuracy"])
    robust_rows = rows.robust
    assert np.all(rows.adv_logits[robust_rows].argmax(1) == rows.label[robust_rows])
    assert set(rows.broken_by[~robust_rows]) <= {"clean", "apgd-ce", "apgd-dlr"}
    artifacts = {f.path for f in client.list_artifacts(run_id, "attack")}
    assert {"attack/attack_per_example.csv", "attack/attack_result.npz"} <= artifacts


def test_standard_trained_model_is_less_robust_than_adversarial(with_teachers):
    _, st = run_attack(
        AttackConfig(model="synthetic-cnn-tiny-st", eps=16 / 255, n_examples=80, n_iter=10), progress=False
    )
    assert st.adversarial_accuracy < st.natural_accuracy


BAD = [
    (["--model", "no-such-model"], "no registered model named 'no-such-model'"),
    (["--model", AT, "--alias", "nope"], "has no alias 'nope'"),
    (["--model", AT, "--stage", "Staging"], "has no version in stage 'Staging'"),
    (["--model", f"models:/{AT}/99"], "has no version 99"),
    (["--model", AT, "--eps", "-0.1"], "eps must be >= 0"),
    (["--model", AT, "--n-examples", "-3"], "n-examples must be >= 1"),
    (["--model", AT, "--n-examples", "100000"], "larger than the test split"),
    (["--model", AT, "--suite", "mega"], "unknown suite 'mega'"),
]


@pytest.mark.parametrize("args,message", BAD, ids=[m.split("'")[0].strip()[:30] for _, m in BAD])
def test_bad_input_exits_2_without_runs_or_tags(with_teachers, args, message):
    before = run_count()
    tags_before = dict(MlflowClient().get_model_version(AT, "2").tags)
    result = CliRunner().invoke(app, ["attack", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert run_count() == before
    assert dict(MlflowClient().get_model_version(AT, "2").tags) == tags_before


def test_model_with_other_class_count_is_refused(with_teachers, tmp_path):
    from tests.test_data import write_cifar100_pickles

    write_cifar100_pickles(tmp_path / "c100")
    before = run_count()
    with pytest.raises(UserError, match="outputs 10 classes but cifar100 has 100"):
        run_attack(AttackConfig(model=AT, dataset="cifar100", data_dir=str(tmp_path / "c100"), n_examples=10))
    assert run_count() == before
