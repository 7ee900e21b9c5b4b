"""The patch-whitening stem: fitted to the training data, saved with the model, refused unfitted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustlogits.config import apply_overrides, preset
from robustlogits.core.data import load_bundle
from robustlogits.core.errors import UserError
from robustlogits.core.logits import compute_logits
from robustlogits.core.models import PatchWhitening, build_model, fit_to_data
from robustlogits.core.training import fit, make_state, standard_objective
from robustlogits.jobs import tracked_training as training_run
from robustlogits.jobs import train as train_job
from robustlogits.tracking.models import resolve_and_load


def whitening_layer(model) -> PatchWhitening:
    return next(m for m in model.modules() if isinstance(m, PatchWhitening))


def correlated_images(n: int = 400) -> torch.Tensor:
    """uint8 images whose channels and neighbouring pixels are strongly correlated, like photographs."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=32, mode="bilinear")
    noise = torch.rand(n, 3, 32, 32, generator=g)
    return ((0.8 * base + 0.2 * noise).clamp(0, 1) * 255).to(torch.uint8)


def test_fitted_stem_turns_the_datas_patches_into_uncorrelated_unit_variance_features():
    model = build_model("vgg-fast-white", 10)
    images = correlated_images()
    x = (images.float() / 255 - model.mean) / model.std
    patches = torch.nn.functional.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 12)
    raw = torch.corrcoef(patches.T)
    assert (raw - torch.eye(12)).abs().max() > 0.5  # the input is far from white

    fit_to_data(model, images)
    layer = whitening_layer(model)
    features = torch.nn.functional.conv2d(x.double(), layer.weight.double())[:, :12]  # +v half; -v mirrors it
    cov = torch.cov(features.permute(0, 2, 3, 1).reshape(-1, 12).T)
    # unit variance up to the eps that keeps near-zero eigenvalues from exploding
    np.testing.assert_allclose(cov.diagonal().numpy(), 1.0, atol=0.05)
    assert (cov - torch.diag(cov.diagonal())).abs().max() < 1e-3
    np.testing.assert_array_equal(layer.weight[12:].numpy(), -layer.weight[:12].numpy())


def test_whitening_eps_bounds_how_far_the_smallest_patch_directions_are_scaled_up():
    """eps is added to each eigenvalue: a whitened coordinate of variance v comes out with variance
    v / (v + eps), so a large eps leaves the low-variance directions (where a sign-gradient
    perturbation is amplified most) near their input scale instead of blowing them up to 1."""
    model = build_model("vgg-fast-white", 10)
    images = correlated_images()
    x = (images.float() / 255 - model.mean) / model.std
    patches = torch.nn.functional.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(patches.T))
    assert eigenvalues[0] < 0.05 < 1.0 < eigenvalues[-1]  # a spread like CIFAR-10's

    variances = {}
    for eps in (5e-4, 1.0):
        fit_to_data(model, images, eps=eps)
        features = torch.nn.functional.conv2d(x.double(), whitening_layer(model).weight.double())[:, :12]
        variances[eps] = features.permute(0, 2, 3, 1).reshape(-1, 12).var(0)
        np.testing.assert_allclose(
            variances[eps].numpy(), (eigenvalues / (eigenvalues + eps)).numpy(), rtol=0.02, atol=1e-3
        )
    assert variances[1.0][0] < 0.05 and variances[5e-4][0] > 0.9


def test_a_runs_whitening_eps_is_the_one_its_stem_is_fitted_with_and_a_bad_one_is_refused():
    cfg = apply_overrides(preset("test"), ["model.arch=vgg-fast-white", "model.whitening_eps=0.5"])
    bundle = load_bundle(cfg, torch.device("cpu"))
    state = training_run.new_state(cfg, bundle, torch.device("cpu"))
    expected = build_model("vgg-fast-white", bundle.num_classes, cfg.data.dataset)
    fit_to_data(expected, bundle.train.images, eps=0.5)
    torch.testing.assert_close(whitening_layer(state.model).weight, whitening_layer(expected).weight)
    fit_to_data(expected, bundle.train.images)
    assert not torch.allclose(whitening_layer(state.model).weight, whitening_layer(expected).weight)
    with pytest.raises(UserError, match="model.whitening_eps must be > 0"):
        apply_overrides(preset("test"), ["model.whitening_eps=0"]).validate()


def test_training_refuses_a_whitening_stem_never_fitted():
    model = build_model("vgg-fast-white", 10)
    cfg = preset("test")
    bundle = load_bundle(cfg, torch.device("cpu"))
    state = make_state(model, cfg.optim, torch.device("cpu"), 0)
    with pytest.raises(UserError, match="never fitted"):
        fit(state, bundle.train, standard_objective(), cfg.optim)


def test_a_trained_whitened_model_is_registered_with_its_fitted_stem():
    cfg = apply_overrides(
        preset("test"),
        [
            "run.training=standard",
            "model.arch=vgg-fast-white",
            "optim.epochs=1",
            "run.checkpoint_epochs=1",
            "monitor.robust_every=0",
        ],
    )
    run_id = train_job.run_training(cfg, progress=False)

    loaded = resolve_and_load("models:/synthetic-vgg-fast-white-st/1").model
    layer = whitening_layer(loaded)
    assert bool(layer.fitted) and layer.weight.abs().sum() > 0
    bundle = load_bundle(cfg, torch.device("cpu"))
    expected = build_model("vgg-fast-white", bundle.num_classes, cfg.data.dataset)
    fit_to_data(expected, bundle.train.images)  # the same images give the same, never-trained weights
    torch.testing.assert_close(layer.weight, whitening_layer(expected).weight)
    logged = training_run.checkpoint_test_logits(run_id, 1)["logits"]
    recomputed = compute_logits(loaded, bundle.test.images, batch_size=256).numpy()
    np.testing.assert_allclose(recomputed, logged, atol=1e-4)


def test_importing_weights_whose_whitening_stem_was_never_fitted_is_one_clear_error_and_registers_nothing(tmp_path):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from robustlogits.cli import app

    path = tmp_path / "unfitted.pt"
    torch.save(build_model("vgg-fast-white", 10, "synthetic").net.state_dict(), path)
    args = ["import", "--checkpoint", str(path), "--name", "unfitted", "--arch", "vgg-fast-white", "--dataset"]
    result = CliRunner().invoke(app, [*args, "synthetic"])
    assert result.exit_code != 0
    assert "never fitted" in result.output and "Traceback" not in result.output
    client = MlflowClient()
    assert [m.name for m in client.search_registered_models()] == []
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert all(r.info.status != "RUNNING" for r in runs)
