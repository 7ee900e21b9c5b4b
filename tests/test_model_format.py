"""Stored models are weights plus an architecture spec: they survive code changes and loading them
runs nothing from the store. Old pickled models still load, through an allowlist."""

from __future__ import annotations

import io
import os

import mlflow
import pytest
import torch
from torch import nn

from robustlogits import tracking
from robustlogits.config import OptimConfig
from robustlogits.core import model_format, models
from robustlogits.core.errors import UserError
from robustlogits.core.training import TrainState, make_state
from robustlogits.tracking.models import resolve_and_load

X = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def logged(model: nn.Module, name: str = "m", register: str | None = None):
    tracking.check_store("robustlogits")  # this test's store, whatever experiment an earlier test set
    with mlflow.start_run():
        info = tracking.log_torch_model(model, name)
    if register:
        tracking.register_version(info.model_uri, register, {"dataset": "synthetic"})
    return info


def legacy_logged(model: nn.Module, register: str):
    """What `log_torch_model` wrote before the spec format: a pickled eager module."""
    tracking.check_store("robustlogits")
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(
            model.eval(), name="legacy", serialization_format="pickle", pip_requirements=["torch"]
        )
    tracking.register_version(info.model_uri, register, {"dataset": "synthetic"})
    return info


def trained_like(arch: str) -> models.Normalized:
    torch.manual_seed(1)
    model = models.build_model(arch, 10, "synthetic")
    with torch.no_grad():  # non-default BatchNorm statistics, so a lost buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_model_is_stored_as_spec_and_weights_and_rebuilt_from_them():
    model = trained_like("cnn-tiny")
    info = logged(model)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri)
    spec = model_format.ArchitectureSpec.from_json(
        open(os.path.join(folder, "extra_files", model_format.SPEC_FILE)).read()
    )
    assert (spec.builder, spec.arch, spec.num_classes) == ("factory", "cnn-tiny", 10)
    assert spec.mean == pytest.approx([0.5] * 3) and spec.weights_sha256
    # The weights are a plain state dict: the restricted unpickler reads them.
    state = torch.load(os.path.join(folder, "extra_files", model_format.WEIGHTS_FILE), weights_only=True)
    assert set(state) == set(model.state_dict())
    loaded = tracking.load_model(info.model_uri)
    assert isinstance(loaded, models.Normalized) and not loaded.training and loaded.stages == model.stages
    torch.testing.assert_close(loaded(X), model(X))
    by_run = resolve_and_load(f"runs:/{info.run_id}/m").model  # also through a run's URI
    torch.testing.assert_close(by_run(X), model(X))


def test_mlflow_load_model_still_works_without_pickle(monkeypatch):
    model = trained_like("cnn-tiny")
    info = logged(model)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    plain = mlflow.pytorch.load_model(info.model_uri)
    torch.testing.assert_close(plain(X), model(X))


def test_stored_model_loads_after_its_class_is_renamed(monkeypatch):
    model = trained_like("resnet20")
    logged(model, register="renamed-new")
    legacy_logged(model, register="renamed-legacy")
    expected = model(X)

    # The code moves on: CifarResNet becomes ResNetForCifar, and the factory builds the new class.
    renamed = type("ResNetForCifar", (models.CifarResNet,), {"__module__": "robustlogits.core.models"})
    monkeypatch.delattr(models, "CifarResNet")
    monkeypatch.setattr(models, "ResNetForCifar", renamed, raising=False)
    monkeypatch.setitem(
        models.ARCHS,
        "resnet20",
        lambda c: (
            renamed((3, 3, 3), (16, 32, 64), c),
            {"stem": "stem", "layer1": "layers.0", "layer2": "layers.1", "layer3": "layers.2"},
        ),
    )
    loaded = resolve_and_load("renamed-new", version=1).model
    assert type(loaded.net).__name__ == "ResNetForCifar"
    torch.testing.assert_close(loaded(X), expected)
    # The pickled form of the same model names a class that no longer exists.
    with pytest.raises(UserError, match="CifarResNet"):
        resolve_and_load("renamed-legacy", version=1)


def test_legacy_pickled_model_still_loads():
    model = trained_like("cnn-tiny")
    legacy_logged(model, register="old-format")
    resolved = resolve_and_load("old-format", version=1)
    assert isinstance(resolved.model, models.Normalized) and resolved.dataset == "synthetic"
    torch.testing.assert_close(resolved.model(X), model(X))


def test_legacy_pickle_written_before_the_package_had_layers_still_loads(monkeypatch):
    """Models pickled when the classes lived in `robustlogits.models` (now `robustlogits.core.models`)."""
    import sys
    import types

    old_module = types.ModuleType("robustlogits.models")
    old_class = type("Normalized", (models.Normalized,), {"__module__": "robustlogits.models"})
    old_module.Normalized = old_class
    monkeypatch.setitem(sys.modules, "robustlogits.models", old_module)
    model = trained_like("cnn-tiny")
    old = old_class(
        model.net, model.mean.flatten().tolist(), model.std.flatten().tolist(), "cnn-tiny", 10, model.stages
    )
    legacy_logged(old, register="before-layers")
    monkeypatch.delitem(sys.modules, "robustlogits.models")  # the module is gone, as in the new code
    loaded = resolve_and_load("before-layers", version=1).model
    assert type(loaded) is models.Normalized
    torch.testing.assert_close(loaded(X), model(X))


class Intruder(nn.Module):
    """A module class outside the allowlist; unpickling it would run its __setstate__."""

    ran = False

    def __setstate__(self, state):
        Intruder.ran = True
        super().__setstate__(state)

    def forward(self, x):
        return x.flatten(1)[:, :10]


def test_legacy_pickle_naming_other_code_is_refused_not_run():
    legacy_logged(models.Normalized(Intruder(), (0, 0, 0), (1, 1, 1), "cnn-tiny", 10, {}), register="intruder")
    with pytest.raises(UserError, match="Intruder"):
        resolve_and_load("intruder", version=1)
    assert not Intruder.ran


def test_altered_weights_are_refused(tmp_path):
    spec, (spec_file, weights_file) = model_format.write_files(trained_like("cnn-tiny"), tmp_path)
    blob = bytearray(weights_file.read_bytes())
    blob[-40] ^= 1
    with pytest.raises(UserError, match="SHA-256"):
        model_format.rebuild(spec, bytes(blob))


def test_newer_spec_version_is_refused_with_a_clear_message():
    text = model_format.ArchitectureSpec("factory", "cnn-tiny", 10, [0] * 3, [1] * 3, format_version=99).to_json()
    with pytest.raises(UserError, match="upgrade robustlogits"):
        model_format.ArchitectureSpec.from_json(text)


def test_resume_state_is_read_with_weights_only():
    model = models.build_model("cnn-tiny", 10, "synthetic")
    optim = OptimConfig(epochs=4)
    state = make_state(model, optim, torch.device("cpu"), 0)
    state.epoch, state.extra = 2, {"versions": {2: "3"}}
    blob = state.to_bytes()
    fresh = make_state(models.build_model("cnn-tiny", 10, "synthetic"), optim, torch.device("cpu"), 1)
    fresh.load_bytes(blob)
    assert fresh.epoch == 2 and fresh.extra == {"versions": {2: "3"}}
    torch.testing.assert_close(fresh.model.state_dict(), model.state_dict())
    # A state file that smuggles in an object is refused instead of executed.
    buf = io.BytesIO()
    torch.save({"model": Intruder()}, buf)
    with pytest.raises(Exception, match="Weights only load failed"):
        TrainState.load_bytes(fresh, buf.getvalue())
    assert not Intruder.ran
