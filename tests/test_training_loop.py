"""The training loop's device-side bookkeeping: equal results however often the host reads,
no host read per step, the exact failing step, the compiled path, and PGD updating in place."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from robustlogits.config import AdversaryConfig, OptimConfig
from robustlogits.core import training
from robustlogits.core.data import build_bundle, make_synthetic
from robustlogits.core.models import build_model
from robustlogits.core.perturb import LinfPGD
from robustlogits.core.training import (
    Objective,
    TrainingDiverged,
    adversarial_objective,
    cross_entropy,
    fit,
    make_state,
    standard_objective,
)

DEVICE = torch.device("cpu")


@pytest.fixture(scope="module")
def split():
    raw = make_synthetic(train_per_class=26, test_per_class=2)
    return build_bundle(
        raw, val_per_class=0, split_seed=0, train_subset=256, stats_subset=10, heldout_subset=None, device=DEVICE
    ).train


def train(split, objective, *, epochs=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build_model("cnn-tiny", 10, "synthetic")
    optim = OptimConfig(epochs=epochs, batch_size=32, lr=0.05)
    results = []
    state = fit(
        make_state(model, optim, DEVICE, seed),
        split,
        objective,
        optim,
        on_epoch_end=results.append,
        progress=False,
        **kwargs,
    )
    return state, [(r.loss, r.accuracy, r.images) for r in results]


OBJECTIVES = {
    "standard": standard_objective,
    "adversarial": lambda: adversarial_objective(AdversaryConfig(steps=2, step_size=4 / 255), amp=False),
}


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_host_read_frequency_changes_no_result(split, kind):
    """A few steps of the per-step synced loop and of the unsynced one, same seed: identical."""
    synced_state, synced = train(split, OBJECTIVES[kind](), sync_every=1)
    for every in (0, 3):
        state, results = train(split, OBJECTIVES[kind](), sync_every=every)
        assert results == synced
        for a, b in zip(state.model.state_dict().values(), synced_state.model.state_dict().values()):
            assert torch.equal(a, b)


class HostReads(TorchDispatchMode):
    """Counts tensor-to-Python-scalar reads (`.item()`, `bool(t)`, `int(t)`): each one is a
    blocking device-to-host synchronisation on a GPU."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", OBJECTIVES)
def test_no_host_read_per_step(split, kind, monkeypatch):
    """Nothing in a step turns a tensor into a Python number, and the tally reaches the host
    once per epoch (plus every `sync_every` steps when asked)."""
    tally_reads = []
    read = training.EpochTally.read
    monkeypatch.setattr(training.EpochTally, "read", lambda self, *a: tally_reads.append(1) or read(self, *a))
    steps = len(split) // 32
    for every, expected in ((0, 1), (1, steps + 1), (3, steps // 3 + 1)):
        tally_reads.clear()
        with HostReads() as counter:
            train(split, OBJECTIVES[kind](), epochs=1, sync_every=every)
        assert counter.count == 0
        assert len(tally_reads) == expected


def test_host_read_counter_sees_item_calls():
    with HostReads() as counter:
        float(torch.ones(()).sum())
        bool(torch.ones(()) > 0)
    assert counter.count == 2


class NanAtCall:
    """Cross-entropy that returns `value` on its n-th call (0-based), as a diverging run would."""

    def __init__(self, n, value):
        self.n, self.value, self.calls = n, value, 0

    def __call__(self, logits, labels, positions):
        loss = cross_entropy(logits, labels, positions)
        self.calls += 1
        return loss * self.value if self.calls - 1 == self.n else loss


@pytest.mark.parametrize("every, value", [(0, float("nan")), (5, float("inf")), (1, float("nan"))])
def test_divergence_is_reported_at_its_exact_step(split, every, value):
    steps = len(split) // 32  # 8 per epoch: call 10 is epoch 2, step 2
    with pytest.raises(TrainingDiverged, match=f"loss became {value} at epoch 2, step 2;"):
        train(split, Objective("standard", NanAtCall(steps + 2, value)), sync_every=every)


def test_per_step_sync_stops_before_the_diverged_update(split):
    torch.manual_seed(0)
    model = build_model("cnn-tiny", 10, "synthetic")
    optim = OptimConfig(epochs=1, batch_size=32, lr=0.05)
    state = make_state(model, optim, DEVICE, 0)
    with pytest.raises(TrainingDiverged, match="step 0;"):
        fit(state, split, Objective("standard", NanAtCall(0, float("nan"))), optim, sync_every=1, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_compiled_path_matches_eager_and_keeps_the_eager_model(split, monkeypatch):
    # aot_eager runs dynamo and AOTAutograd (the same graph capture and train/eval switching as
    # inductor) without minutes of C++ compilation on a 2-core CI machine.
    monkeypatch.setattr(training, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    eager_state, eager = train(split, OBJECTIVES["adversarial"](), epochs=1)
    state, results = train(split, OBJECTIVES["adversarial"](), epochs=1, compile=True)
    torch._dynamo.reset()
    assert type(state.model) is type(eager_state.model)  # checkpoints pickle the eager module
    assert results[0][0] == pytest.approx(eager[0][0], rel=1e-4)
    for a, b in zip(state.model.state_dict().values(), eager_state.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    copy.deepcopy(state.model)


def naive_pgd(model, x, y, attack, generator):
    """The textbook formulation (a new tensor per step), as the reference."""
    model.eval()
    noise = torch.rand(x.shape, generator=generator)
    x_adv = (x + (noise * 2 - 1) * attack.eps).clamp(0, 1)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + attack.step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - attack.eps), x + attack.eps).clamp(0, 1)
    return x_adv


class InputSizedAllocations(TorchDispatchMode):
    """Counts ops that allocate a new tensor of the attacked batch's shape (not views, not
    in-place, not out= writes: those return an alias of an existing tensor)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if (
            isinstance(out, torch.Tensor)
            and tuple(out.shape) == self.shape
            and returns
            and returns[0].alias_info is None
        ):
            self.count += 1
        return out


def test_pgd_updates_in_place_and_equals_the_textbook_attack():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    counts = {}
    for steps in (1, 6):
        attack = LinfPGD(8 / 255, 2 / 255, steps)
        expected = naive_pgd(model, x, y, attack, torch.Generator().manual_seed(3))
        with InputSizedAllocations(x.shape) as allocations:
            got = attack(model, x, y, torch.Generator().manual_seed(3))
        counts[steps] = allocations.count
        assert torch.equal(got, expected)
    assert counts[6] == counts[1]  # set-up only: no batch-sized allocation per step


def test_negative_sync_every_is_one_clear_error():
    from robustlogits.config import preset
    from robustlogits.core.errors import UserError

    cfg = preset("test")
    cfg.run.sync_every = -1
    with pytest.raises(UserError, match="run.sync_every must be >= 0"):
        cfg.validate()
    assert preset("paper").run.compile is False and preset("paper").run.sync_every == 50


def test_onecycle_warms_up_then_decays_to_zero_and_is_set_every_step(split):
    optim = OptimConfig(epochs=4, batch_size=32, lr=0.4, schedule="onecycle", warmup=0.25)
    assert training.onecycle_lr(optim, 0) == pytest.approx(0.04)  # starts at lr / 10
    assert training.onecycle_lr(optim, 1) == pytest.approx(0.4)  # the peak at the end of warm-up
    assert training.onecycle_lr(optim, 2.5) == pytest.approx(0.2)
    assert training.onecycle_lr(optim, 4) == 0.0
    torch.manual_seed(0)
    model = build_model("cnn-tiny", 10, "synthetic")
    seen = []
    state = make_state(model, optim, DEVICE, 0)
    step = state.optimizer.step

    def record(*args, **kwargs):
        seen.append(state.optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    state.optimizer.step = record
    fit(state, split, standard_objective(), optim, progress=False)
    per_epoch = len(split) // 32
    assert len(seen) == 4 * per_epoch and len(set(seen)) == len(seen)  # a new rate at every step
    assert max(seen) == pytest.approx(0.4, rel=0.05) and seen[-1] < 0.4 / per_epoch


def test_label_smoothing_changes_the_loss_and_zero_is_plain_cross_entropy():
    logits, labels = torch.randn(8, 10), torch.randint(0, 10, (8,))
    positions = torch.arange(8)
    plain = standard_objective().loss(logits, labels, positions)
    assert standard_objective(0.0).loss is cross_entropy
    smoothed = standard_objective(0.1).loss(logits, labels, positions)
    assert torch.isclose(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert not torch.isclose(plain, smoothed)


def test_crop_pad_reaches_the_augmentation_and_nesterov_the_optimizer(split, monkeypatch):
    pads = []
    augment = training.augment

    def recording(images, generator, pad=4):
        pads.append(pad)
        return augment(images, generator, pad)

    monkeypatch.setattr(training, "augment", recording)
    optim = OptimConfig(epochs=1, batch_size=64, lr=0.05, nesterov=True)
    state = make_state(build_model("cnn-tiny", 10, "synthetic"), optim, DEVICE, 0)
    assert state.optimizer.param_groups[0]["nesterov"] is True
    fit(state, split, standard_objective(), optim, crop_pad=2, progress=False)
    assert pads and set(pads) == {2}
    frames = augment(split.images[:64], torch.Generator().manual_seed(0), 0)
    flipped = frames.flip(-1)
    assert all(torch.equal(f, x) or torch.equal(g, x) for f, g, x in zip(frames, flipped, split.images[:64]))


@pytest.mark.parametrize(
    "change, message",
    [({"data.crop_pad": -1}, "data.crop_pad must be in 0..16"), ({"optim.momentum": 0.0}, "optim.nesterov needs")],
)
def test_bad_crop_pad_or_nesterov_without_momentum_is_one_clear_error(change, message):
    from robustlogits.config import apply_overrides, preset
    from robustlogits.core.errors import UserError

    cfg = preset("test")
    apply_overrides(cfg, ["optim.nesterov=true"] + [f"{k}={v}" for k, v in change.items()])
    if "data.crop_pad" in change:
        cfg.optim.nesterov = False
    with pytest.raises(UserError, match=message):
        cfg.validate()


def test_new_knobs_at_their_old_behaviour_keep_every_key():
    """Results computed before `crop_pad`, `nesterov` and `whitening_eps` existed are still found by their keys."""
    from robustlogits import tracking
    from robustlogits.config import TrainConfig, flatten, keyed_view
    from robustlogits.jobs.train import training_identity

    cfg = TrainConfig()
    before = {
        k: v for k, v in flatten(cfg).items() if k not in ("data.crop_pad", "optim.nesterov", "model.whitening_eps")
    }
    assert keyed_view(cfg) == before
    assert training_identity(cfg) == tracking.job_key({"job": "train", **before})
    cfg.data.crop_pad = 2
    assert keyed_view(cfg)["data.crop_pad"] == 2 and training_identity(cfg) != tracking.job_key(
        {"job": "train", **before}
    )
    cfg.data.crop_pad = 4
    cfg.model.whitening_eps = 1.0
    assert keyed_view(cfg)["model.whitening_eps"] == 1.0 and training_identity(cfg) != tracking.job_key(
        {"job": "train", **before}
    )
