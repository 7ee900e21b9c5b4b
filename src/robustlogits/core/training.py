"""The one training loop. Standard training, adversarial training and distillation differ only in
the `Objective` passed in: how inputs are perturbed, what the target is, and which loss is used.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.nn import functional as F

from robustlogits.core.data import Split, augment, iterate_batches, to_float
from robustlogits.core.errors import UserError
from robustlogits.core.models import check_fitted
from robustlogits.core.perturb import LinfPGD, autocast
from robustlogits.core.progress import Progress

if TYPE_CHECKING:  # configs are read, never imported: core sits below config
    from robustlogits.config import AdversaryConfig, OptimConfig


class TrainingDiverged(UserError):
    """The loss became NaN/inf: the run stops at once instead of training on garbage."""


@dataclass
class Objective:
    """What distinguishes one kind of training from another.

    perturb: maps clean inputs to training inputs (None = clean inputs).
    loss:    (logits, labels, positions in the training split) -> scalar loss; distillation
             looks up each image's fixed target by its position.
    """

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    perturb: LinfPGD | None = None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, _positions: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def smoothed_cross_entropy(smoothing: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    if not smoothing:
        return cross_entropy

    def loss(logits: torch.Tensor, labels: torch.Tensor, _positions: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)

    return loss


def standard_objective(label_smoothing: float = 0.0) -> Objective:
    return Objective("standard", smoothed_cross_entropy(label_smoothing))


def adversarial_objective(adv: AdversaryConfig, amp: bool, label_smoothing: float = 0.0) -> Objective:
    if adv.method == "fgsm":
        attack = LinfPGD.fgsm(adv.eps, bn_mode=adv.bn_mode, amp=amp)
    else:
        attack = LinfPGD(adv.eps, adv.step_size, adv.steps, adv.random_start, adv.bn_mode, amp)
    return Objective("adversarial", smoothed_cross_entropy(label_smoothing), attack)


DISTILLATION_LOSSES = ("l1", "kl", "mse")


@dataclass
class LogitTargetLoss:
    """Match fixed per-image target logits, looked up by each image's position in the train split.

    l1:  sum over classes of |z - t|, mean over the batch (the paper's choice, A.3 point 2);
    mse: half the squared error summed over classes, mean over the batch;
    kl:  T^2 * KL(softmax(t/T) || softmax(z/T)), mean over the batch (Hinton et al.).
    Per-example sums keep gradient scales comparable to cross-entropy at the same learning rate.
    """

    targets: torch.Tensor
    kind: str = "l1"
    temperature: float = 1.0

    def __call__(self, logits: torch.Tensor, _labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        z, t = logits.float(), self.targets[positions]
        if self.kind == "l1":
            return (z - t).abs().sum(1).mean()
        if self.kind == "mse":
            return 0.5 * (z - t).pow(2).sum(1).mean()
        temp = self.temperature
        return (
            F.kl_div(F.log_softmax(z / temp, 1), F.log_softmax(t / temp, 1), log_target=True, reduction="batchmean")
            * temp
            * temp
        )


def distillation_objective(targets: torch.Tensor, kind: str, temperature: float) -> Objective:
    if kind not in DISTILLATION_LOSSES:
        raise UserError(f"unknown distillation loss {kind!r}; choose one of: {', '.join(DISTILLATION_LOSSES)}")
    if not temperature > 0:
        raise UserError(f"temperature must be > 0, got {temperature}")
    return Objective("distillation", LogitTargetLoss(targets, kind, temperature))


@dataclass
class EpochResult:
    epoch: int
    loss: float
    accuracy: float
    seconds: float
    images: int
    lr: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass
class TrainState:
    """Everything needed to continue a killed run exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    epoch: int = 0  # epochs completed
    extra: dict = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch": self.epoch,
                "extra": self.extra,
            },
            buf,
        )
        return buf.getvalue()

    def load_bytes(self, blob: bytes) -> None:
        # weights_only: tensors, numbers, strings and containers; a state file never runs code.
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch = int(state["epoch"])
        self.extra = state.get("extra", {})


def make_state(model: nn.Module, optim: OptimConfig, device: torch.device, seed: int) -> TrainState:
    """SGD with momentum and step decay at fractions of training (paper: /10 at 50% and 75%)."""
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=optim.lr,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
        weight_decay=optim.weight_decay,
    )
    milestones = sorted({max(1, round(f * optim.epochs)) for f in optim.lr_milestones})
    if optim.schedule == "onecycle":
        milestones = []  # `fit` sets the rate at every step (`onecycle_lr`)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=1 / optim.lr_decay)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return TrainState(model, optimizer, scheduler, generator)


def onecycle_lr(optim: OptimConfig, epochs_done: float) -> float:
    """Linear warm-up from lr/10 to lr over the first `warmup` share of training, then linear to 0."""
    t = epochs_done / optim.epochs
    if optim.warmup and t < optim.warmup:
        return optim.lr * (0.1 + 0.9 * t / optim.warmup)
    return optim.lr * max(0.0, (1 - t) / (1 - optim.warmup))


def fit(
    state: TrainState,
    split: Split,
    objective: Objective,
    optim: OptimConfig,
    *,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    sync_every: int = 50,
    crop_pad: int = 4,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    progress: bool | None = None,
) -> TrainState:
    """Train from `state.epoch` to `optim.epochs`, calling `on_epoch_end` after every epoch.

    Loss, accuracy and the NaN check accumulate on the device (`EpochTally`) and reach the host
    every `sync_every` steps (0 = once per epoch), so a GPU never waits for Python within a step;
    a divergence is still reported at the exact step, and `sync_every=1` stops before the update
    that would train on it. `compile` runs forward and attack through `torch.compile`;
    `state.model` stays the eager module that checkpoints pickle.
    """
    model, device = state.model, split.labels.device
    check_fitted(model)
    forward = compiled(model) if compile else model
    for epoch in range(state.epoch + 1, optim.epochs + 1):
        model.train()
        lr = onecycle_lr(optim, epoch - 1) if optim.schedule == "onecycle" else state.optimizer.param_groups[0]["lr"]
        tally = EpochTally(device)
        started = time.perf_counter()
        bar = Progress(len(split), f"{objective.name} epoch {epoch}/{optim.epochs}", "img", progress)
        steps = max(len(split) // optim.batch_size, 1)
        for step, idx in enumerate(iterate_batches(len(split), optim.batch_size, state.generator, drop_last=True)):
            if optim.schedule == "onecycle":
                for group in state.optimizer.param_groups:
                    group["lr"] = onecycle_lr(optim, epoch - 1 + step / steps)
            idx = idx.to(device)
            x = to_float(augment(split.images[idx], state.generator, crop_pad), channels_last)
            y = split.labels[idx]
            if objective.perturb is not None:
                x = objective.perturb(forward, x, y, state.generator)
            with autocast(device, amp):
                logits = forward(x)
            loss = objective.loss(logits, y, idx)
            tally.add(step, loss, logits, y)
            if sync_every and (step + 1) % sync_every == 0:
                tally.read(objective.name, epoch, bar)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            bar.update(len(idx))
        mean_loss, accuracy, seen = tally.read(objective.name, epoch, bar)
        bar.close()
        state.scheduler.step()
        state.epoch = epoch
        result = EpochResult(epoch, mean_loss, accuracy, time.perf_counter() - started, seen, lr)
        if not math.isfinite(result.loss):
            raise TrainingDiverged(f"{objective.name} loss is not finite after epoch {epoch}")
        if on_epoch_end is not None:
            on_epoch_end(result)
    return state


class EpochTally:
    """An epoch's loss sum, correct count and first non-finite step, kept on the device.

    `add` launches a few tiny kernels and never waits; `read` is the one host synchronisation
    (a single transfer) and raises `TrainingDiverged` naming the first step whose loss was not
    finite. The loss sum is float64, as the host-side sum it replaces was.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        loss = loss.detach().double()
        n = len(labels)
        self.loss_sum.add_(loss * n)
        self.correct.add_((logits.detach().argmax(1) == labels).sum())
        first = (self.first_bad_step < 0) & ~torch.isfinite(loss)
        self.first_bad_step.copy_(torch.where(first, step, self.first_bad_step))
        self.bad_loss.copy_(torch.where(first, loss, self.bad_loss))
        self.seen += n

    def read(self, name: str, epoch: int, bar=None) -> tuple[float, float, int]:
        """(mean loss, accuracy, images) so far; raises at the first step that diverged."""
        loss_sum, correct, bad_step, bad_loss = torch.stack(
            [self.loss_sum, self.correct.double(), self.first_bad_step.double(), self.bad_loss]
        ).tolist()
        if bad_step >= 0:
            raise TrainingDiverged(
                f"{name} loss became {bad_loss} at epoch {epoch}, step {int(bad_step)}; "
                "lower optim.lr or check the targets"
            )
        seen = max(self.seen, 1)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        return loss_sum / seen, correct / seen, self.seen


# Overridable so tests can exercise the compiled path without a C++ toolchain's compile times.
COMPILE_BACKEND = "inductor"


def compiled(model: nn.Module) -> nn.Module:
    """`torch.compile`d view of `model` sharing its parameters (train/eval switch through it)."""
    return torch.compile(model, backend=COMPILE_BACKEND)
