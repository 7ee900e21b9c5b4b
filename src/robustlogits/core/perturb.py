"""Training-time adversaries in [0,1] pixel space (Linf): PGD with random start and FGSM-RS.

These are the fast inner-loop attacks used during adversarial training and by the per-epoch
robustness monitor; the reported adversarial accuracy comes from AutoAttack (`attacks.py`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class LinfPGD:
    """Madry et al. PGD: random start in the eps ball, signed-gradient ascent steps, projection.

    `bn_mode` decides how BatchNorm behaves while the attack runs ("eval": running statistics,
    left untouched; "train": batch statistics, and running stats are updated by each step).
    FGSM with random start (Wong et al., 2020) is the one-step case with step 1.25*eps.
    """

    eps: float
    step_size: float
    steps: int
    random_start: bool = True
    bn_mode: str = "eval"
    amp: bool = False

    @classmethod
    def fgsm(cls, eps: float, bn_mode: str = "eval", amp: bool = False) -> LinfPGD:
        return cls(eps=eps, step_size=1.25 * eps, steps=1, random_start=True, bn_mode=bn_mode, amp=amp)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.eps == 0:
            return x.detach()
        was_training = model.training
        model.train(self.bn_mode == "train")
        try:
            return self._attack(model, x.detach(), y, generator)
        finally:
            model.train(was_training)

    def _attack(self, model, x, y, generator):
        # One buffer for the adversarial batch and the eps-ball-within-[0,1] bounds computed once:
        # every step updates in place, so the loop allocates nothing beyond the model's own work.
        lower = (x - self.eps).clamp_(min=0)
        upper = (x + self.eps).clamp_(max=1)
        if self.random_start:
            noise = torch.rand(x.shape, generator=generator, device=generator.device if generator else x.device)
            x_adv = torch.empty_like(x).copy_(noise).mul_(2).sub_(1).mul_(self.eps).add_(x).clamp_(0, 1)
        else:
            x_adv = x.clone()
        for _ in range(self.steps):
            # A fresh leaf over the same storage each step: no copy, and autocast's cast cache
            # (keyed by leaf) can never hand back the previous step's values.
            x_in = x_adv.detach().requires_grad_(True)
            with autocast(x.device, self.amp):
                loss = F.cross_entropy(model(x_in).float(), y)
            (grad,) = torch.autograd.grad(loss, x_in)
            with torch.no_grad():
                x_adv.add_(grad.sign_(), alpha=self.step_size)
                torch.minimum(x_adv, upper, out=x_adv)
                torch.maximum(x_adv, lower, out=x_adv)
        return x_adv.detach()


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU (AMX) and GPU; a no-op context when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
