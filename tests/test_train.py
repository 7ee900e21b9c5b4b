"""The `train` job end to end on synthetic data with a local file store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app, mlproject
from robustlogits.config import apply_overrides, flatten, preset
from robustlogits.core.data import load_bundle
from robustlogits.core.logits import compute_logits
from robustlogits.jobs import tracked_training as training_run
from robustlogits.jobs import train as train_job

REPO = Path(__file__).resolve().parents[1]
STAT_KEYS = [
    f"{split}_{q}_{s}"
    for split in ("train", "test")
    for q in ("max_logit", "gap")
    for s in ("mean", "std", "median", "skew")
]


def test_config(training="adversarial", *overrides):
    cfg = preset("test")
    cfg.run.training = training
    return apply_overrides(cfg, overrides)


test_config.__test__ = False  # a helper, not a test


def history_steps(client, run_id, key):
    return [m.step for m in client.get_metric_history(run_id, key)]


def all_runs():
    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def test_two_epoch_adversarial_run_logs_every_epoch_and_registers_checkpoints():
    cfg = test_config("adversarial")
    run_id = train_job.run_training(cfg, progress=False)
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # Every value of the config is a param.
    assert set(flatten(cfg)) <= set(run.data.params)
    assert run.data.params["adversary.eps"] == str(8 / 255)
    assert run.data.params["data.val_per_class"] == "0" and run.data.params["run.teacher_epoch"] == "2"
    # Every per-epoch metric at steps 1 and 2, none duplicated.
    for key in [
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "train_clean_accuracy",
        "monitor_pgd_accuracy",
        "checkpoint_test_accuracy",
        *STAT_KEYS,
    ]:
        assert history_steps(client, run_id, key) == [1, 2], key
    # One histogram per epoch on fixed bins, with every example counted; epoch 0 is the initial network.
    hists = training_run.load_histograms(run_id)
    assert sorted(hists) == [0, 1, 2] and hists[0] != hists[1]
    for split, n in (("train", 64), ("test", 160)):
        h1, h2 = hists[1][split]["gap"], hists[2][split]["gap"]
        assert h1["edges"] == h2["edges"] and len(h1["edges"]) == cfg.monitor.bins + 1
        assert sum(h1["counts"]) + h1["underflow"] + h1["overflow"] == n
    # Checkpoints: registered versions with their tags, teacher promoted by stage and alias.
    name = "synthetic-cnn-tiny-at"
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    assert [v.tags["epoch"] for v in versions] == ["1", "2"]
    for v in versions:
        assert {"training", "seed", "dataset", "arch", "preset", "test_accuracy"} <= set(v.tags)
        assert v.tags["training"] == "adversarial" and v.run_id == run_id
    assert client.get_model_version_by_alias(name, "teacher").version == versions[-1].version
    # The registered teacher loads back as an nn.Module that reproduces the saved test logits.
    uri, mv = train_job.tracking.resolve_model(name, stage="Production")
    model = train_job.tracking.load_model(uri)
    assert isinstance(model, torch.nn.Module) and mv.tags["epoch"] == "2"
    saved = training_run.checkpoint_test_logits(run_id, 2)
    raw = load_bundle(cfg, torch.device("cpu")).test
    np.testing.assert_allclose(compute_logits(model, raw.images).numpy(), saved["logits"], atol=1e-4)
    accuracy = (saved["logits"].argmax(1) == saved["labels"]).mean()
    assert float(versions[-1].tags["test_accuracy"]) == pytest.approx(accuracy, abs=1e-4)
    assert "natural_accuracy" not in versions[-1].tags  # that name belongs to attacks (their example subset)
    # Figures, the split record and the dataset input.
    artifacts = {f.path for f in client.list_artifacts(run_id, "figures")}
    assert {"figures/max_logit_evolution.png", "figures/gap_evolution.png"} <= artifacts
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest


def test_epoch_histogram_images_and_checkpoint_model_metrics():
    """The UI's step slider (one image per epoch, step = epoch) and the models table (metrics of each
    checkpoint's logged model, ranked by search_logged_models)."""
    import mlflow
    from PIL import Image

    cfg = test_config("standard", "optim.epochs=3", "run.checkpoint_epochs=1,3", "monitor.robust_every=0")
    run_id = train_job.run_training(cfg, progress=False)
    client = MlflowClient()
    # Images logged with a key and step: MLflow stores them under images/ as KEY+step+N+...png.
    images = [f.path for f in client.list_artifacts(run_id, "images")]
    pngs = sorted(p for p in images if p.endswith(".png") and training_run.HISTOGRAM_IMAGE_KEY in p)
    steps = sorted(int(p.split("+step+")[1].split("+")[0]) for p in pngs)
    assert steps == [0, 1, 2, 3]  # epoch 0: the initial network, before any training step
    first = Image.open(client.download_artifacts(run_id, pngs[0]))
    assert first.size[0] >= 400 and first.size[1] >= 400 and len(np.unique(np.asarray(first.convert("L")))) > 10
    # The panel shows MLflow's thumbnail (at most 256 px a side) in a square box: a square image fills it.
    thumbnail = next(p for p in images if p.startswith(pngs[0][: -len(".png")]) and p.endswith("+compressed.webp"))
    assert Image.open(client.download_artifacts(run_id, thumbnail)).size == (256, 256)
    # Each checkpoint is a logged model of this run with its epoch's metrics linked to it.
    run = client.get_run(run_id)
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        output_format="list",
        order_by=[{"field_name": "metrics.checkpoint_test_accuracy", "ascending": False}],
    )
    assert len(models) == 2 and {m.source_run_id for m in models} == {run_id}
    for m in models:
        linked = {x.key: x for x in m.metrics}
        assert {"checkpoint_test_accuracy", "test_accuracy", "train_clean_accuracy", *STAT_KEYS} <= set(linked)
        assert len({x.step for x in m.metrics}) == 1
    accuracies = [{x.key: x.value for x in m.metrics}["checkpoint_test_accuracy"] for m in models]
    assert accuracies == sorted(accuracies, reverse=True)
    by_epoch = {int(next(x.step for x in m.metrics)): m for m in models}
    assert sorted(by_epoch) == [1, 3]
    history = {m.step: m.value for m in client.get_metric_history(run_id, "checkpoint_test_accuracy")}
    assert {e: {x.key: x.value for x in by_epoch[e].metrics}["checkpoint_test_accuracy"] for e in by_epoch} == history


def test_resume_after_interruption_matches_uninterrupted_run(monkeypatch):
    cfg = test_config("standard", "optim.epochs=3", "run.checkpoint_epochs=3", "monitor.robust_every=0")
    full = train_job.run_training(cfg, progress=False)

    original = training_run.EpochLogger.__call__

    def killed_during_epoch_3(self, result):
        if result.epoch == 3:
            raise KeyboardInterrupt("simulated kill")
        original(self, result)

    monkeypatch.setattr(training_run.EpochLogger, "__call__", killed_during_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_job.run_training(
            test_config("standard", "optim.epochs=3", "run.checkpoint_epochs=3", "monitor.robust_every=0"),
            progress=False,
        )
    client = MlflowClient()
    interrupted = [r for r in all_runs() if r.info.run_id != full][0].info.run_id
    assert client.get_run(interrupted).info.status == "FAILED"
    assert history_steps(client, interrupted, "train_loss") == [1, 2]

    monkeypatch.setattr(training_run.EpochLogger, "__call__", original)
    resumed = train_job.run_training(preset("smoke"), resume=interrupted, progress=False)  # config comes from the run
    assert resumed == interrupted
    assert client.get_run(resumed).info.status == "FINISHED"
    assert history_steps(client, resumed, "train_loss") == [1, 2, 3]
    for key in ("train_loss", "test_gap_mean"):
        a = [m.value for m in client.get_metric_history(full, key)]
        b = [m.value for m in client.get_metric_history(resumed, key)]
        np.testing.assert_allclose(a, b, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(
        training_run.checkpoint_test_logits(full, 3)["logits"],
        training_run.checkpoint_test_logits(resumed, 3)["logits"],
        atol=1e-5,
    )


def test_resumed_adversarial_run_names_the_model_it_registered(monkeypatch, caplog):
    original = training_run.EpochLogger.__call__

    def killed_in_epoch_2(self, result):
        if result.epoch == 2:
            raise KeyboardInterrupt("simulated kill")
        original(self, result)

    monkeypatch.setattr(training_run.EpochLogger, "__call__", killed_in_epoch_2)
    with caplog.at_level("INFO", logger="robustlogits"):
        killed = CliRunner().invoke(
            app, ["train", "--preset", "test", "--training", "adversarial", "--set", "monitor.robust_every=0"]
        )
    assert killed.exit_code == 130
    # No terminal here (as under `mlflow run`): the epoch reports its progress in lines, every 10%.
    assert "epoch 1/2: 10% (" in caplog.text and "epoch 1/2: 100% (" in caplog.text
    run_id = all_runs()[0].info.run_id
    assert MlflowClient().get_run(run_id).data.tags["error"] == "KeyboardInterrupt: simulated kill"
    monkeypatch.setattr(training_run.EpochLogger, "__call__", original)
    resumed = CliRunner().invoke(app, ["train", "--resume", run_id])  # CLI defaults say "standard"
    assert resumed.exit_code == 0, resumed.output
    assert f"run {run_id} finished; registered model synthetic-cnn-tiny-at version(s) 1,2" in resumed.output
    assert "-st" not in resumed.output
    tags = MlflowClient().get_run(run_id).data.tags
    assert "error" not in tags and tags["previous_error"] == "KeyboardInterrupt: simulated kill"


def test_resume_refuses_a_finished_run():
    run_id = train_job.run_training(
        test_config("standard", "optim.epochs=1", "run.checkpoint_epochs=1"), progress=False
    )
    with pytest.raises(train_job.UserError, match="already FINISHED"):
        train_job.run_training(preset("test"), resume=run_id)


def test_nan_loss_fails_the_run_and_registers_nothing():
    result = CliRunner().invoke(
        app, ["train", "--preset", "test", "--set", "optim.lr=1e30", "--set", "run.checkpoint_epochs=2"]
    )
    assert result.exit_code == 2, result.output
    assert "loss became" in result.output
    runs = all_runs()
    assert [r.info.status for r in runs] == ["FAILED"]
    # The store says why: the one-line error as a tag, the traceback as an artifact.
    assert "loss became nan" in runs[0].data.tags["error"]
    trace = train_job.tracking.download_artifact(runs[0].info.run_id, "error/traceback.txt").read_text()
    assert "Traceback" in trace and "loss became" in trace
    assert MlflowClient().search_registered_models() == [] or not MlflowClient().search_model_versions("")


BAD_INPUTS = [
    (["--dataset", "mnist"], "unknown data.dataset 'mnist'"),
    (["--arch", "vgg"], "unknown model.arch 'vgg'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--training", "magic"], "unknown run.training 'magic'"),
    (["--epochs", "0"], "optim.epochs must be >= 1"),
    (["--checkpoint-epochs", "1,5"], "checkpoint epoch 5 is outside 1..2"),
    (["--set", "adversary.eps=-1/255"], "adversary.eps must be >= 0"),
    (["--set", "optim.nope=1"], "unknown config key 'optim.nope'"),
    (["--dataset", "cifar10", "--data-dir", "empty"], "no cifar10 data found"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m.split()[0] + "-" + a[-1] for a, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["train", "--preset", "test", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert all_runs() == []


def test_epochs_override_keeps_preset_checkpoints_that_exist():
    explicit = CliRunner().invoke(app, ["train", "--preset", "test", "--epochs", "1", "--teacher-epoch", "2"])
    assert explicit.exit_code == 2 and "teacher epoch 2 is not a checkpoint epoch" in explicit.output
    result = CliRunner().invoke(app, ["train", "--preset", "test", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    versions = MlflowClient().search_model_versions("name='synthetic-cnn-tiny-st'")
    assert [v.tags["epoch"] for v in versions] == ["1"]  # the preset's (1, 2) became (1,)
    assert str(MlflowClient().get_model_version_by_alias("synthetic-cnn-tiny-st", "teacher").version) == "1"


def test_corrupt_data_is_a_clear_error(tmp_path):
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"corrupt")
    result = CliRunner().invoke(app, ["train", "--preset", "test", "--dataset", "cifar10", "--data-dir", "data"])
    assert result.exit_code == 2 and "corrupt dataset file" in result.output
    assert all_runs() == []


def test_unwritable_store_is_a_clear_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (blocker / "store").as_uri())
    result = CliRunner().invoke(app, ["train", "--preset", "test"])
    assert result.exit_code == 2, result.output
    assert "tracking store" in result.output and "not usable" in result.output


def test_mlflow_run_entry_point_with_local_env_manager(tmp_path, isolated_store):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(REPO),
            "-e",
            "train",
            "--env-manager",
            "local",
            "-P",
            "run.training=adversarial",
            "-P",
            "preset=test",
            "-P",
            "optim.epochs=1",
            "-P",
            "run.checkpoint_epochs=1",
            "--experiment-name",
            "mlproject-test",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = all_runs()
    assert [r.info.status for r in runs] == ["FINISHED"]
    params = runs[0].data.params
    assert params["run.training"] == "adversarial" and params["optim.epochs"] == "1"
    # Every config value under the name the run's config uses; beside them only the launcher's
    # record of the declared `preset`: no placeholder (`training=default`) contradicts `run.training`.
    assert set(mlproject.declared_parameters("train")) == {"preset"}
    assert set(params) == set(flatten(preset("test"))) | {"run.precision", "preset"}
    assert params["preset"] == "test"
    assert mlproject.NOT_GIVEN not in params.values() and "''" not in params.values()
    assert "registered model synthetic-cnn-tiny-at version(s) 1" in proc.stdout
    assert str(MlflowClient().get_model_version_by_alias("synthetic-cnn-tiny-at", "teacher").version) == "1"


def test_mlflow_run_rejects_unknown_parameters(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "entrypoints" / "train.py"), "--trainig", "adversarial"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown MLproject parameter 'trainig' for train: use one it declares (see MLproject) or a config "
        "key as the run logs it, e.g. -P run.training=adversarial (`robustlogits config` lists every key)"
    ]
    assert all_runs() == []


@pytest.mark.realdata
def test_real_cifar10_short_run_logs_logit_statistics(real_cifar10_dir, real_data_cache, monkeypatch):
    monkeypatch.setenv("ROBUSTLOGITS_CACHE", str(real_data_cache))
    cfg = preset("smoke")
    apply_overrides(
        cfg,
        [
            f"data.data_dir={real_cifar10_dir}",
            "data.train_subset=500",
            "optim.epochs=1",
            "model.arch=cnn-tiny",
            "run.checkpoint_epochs=1",
            "monitor.robust_examples=50",
            "data.heldout_subset=500",
            "data.stats_subset=200",
        ],
    )
    run_id = train_job.run_training(cfg, progress=False)
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_accuracy"] > 0.15  # better than chance after one epoch on real images
    assert {"train_max_logit_mean", "val_gap_skew"} <= set(run.data.metrics)
    split = json.loads(train_job.tracking.download_artifact(run_id, "data/split.json").read_text())
    assert len(split["val_indices"]) == 5000 and len(split["train_indices"]) == 500
