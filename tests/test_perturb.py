"""Training-time PGD/FGSM: bounds, effectiveness, and the stated BatchNorm behaviour."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from robustlogits.core.models import build_model
from robustlogits.core.perturb import LinfPGD

EPS = 8 / 255


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = build_model("cnn-tiny", 10, "synthetic")
    x = torch.rand(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    return model, x, y


@pytest.mark.parametrize(
    "attack", [LinfPGD(EPS, 2 / 255, 10), LinfPGD.fgsm(EPS), LinfPGD(EPS, 2 / 255, 5, random_start=False)]
)
def test_attack_stays_in_eps_ball_and_pixel_range(model_and_batch, attack):
    model, x, y = model_and_batch
    x_adv = attack(model, x, y, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


def test_pgd_raises_the_loss(model_and_batch):
    model, x, y = model_and_batch
    model.eval()
    x_adv = LinfPGD(EPS, 2 / 255, 10)(model, x, y, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.01


def test_zero_eps_is_identity(model_and_batch):
    model, x, y = model_and_batch
    assert torch.equal(LinfPGD(0.0, 0.0, 3)(model, x, y), x)


def test_bn_eval_mode_leaves_running_stats_and_restores_train_mode(model_and_batch):
    model, x, y = model_and_batch
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    LinfPGD(EPS, 2 / 255, 3, bn_mode="eval")(model, x, y, torch.Generator().manual_seed(0))
    assert model.training
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bn_train_mode_uses_batch_stats_and_updates_them(model_and_batch):
    model, x, y = model_and_batch
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    LinfPGD(EPS, 2 / 255, 3, bn_mode="train")(model, x, y, torch.Generator().manual_seed(0))
    assert not model.training
    after = {k: v for k, v in model.state_dict().items() if "running_mean" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_random_start_is_seeded(model_and_batch):
    model, x, y = model_and_batch
    attack = LinfPGD(EPS, 2 / 255, 2)
    a = attack(model, x, y, torch.Generator().manual_seed(5))
    b = attack(model, x, y, torch.Generator().manual_seed(5))
    c = attack(model, x, y, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
