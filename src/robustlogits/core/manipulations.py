"""Manipulations of the AT teacher's per-sample logit targets before distillation.

The paper (section 3, section 4.2, Figure 4, Table 2) asks which parts of an AT
teacher's logit vector carry the robustness a student can learn from clean
images, by destroying one kind of information at a time and re-distilling:

* ``permute`` (fix-k, perm): keep the top-k values at their classes, shuffle the
  other C-k values among the other classes. Keeps the value distribution, destroys
  which wrong classes the teacher thought plausible.
* ``average`` (fix-k, avg): keep the top-k, replace the other C-k values by their
  mean. Keeps the row sum and the top-k, destroys all bottom detail.
* ``correct-fix`` (the paper's correct-fix-1 with k=1): fix-k, then swap the
  values of the predicted class and the label, so the only cross-class
  information left -- *which* class the teacher wrongly preferred -- is gone.
* ``hybrid``: the AT teacher's sorted values placed in the standard-trained (ST)
  teacher's class ranking: AT confidence profile, ST class relationships.

Example row (C = 6, label = class 2 marked ``*``; the teacher predicts class 0,
a training error; ``[ ]`` marks values kept at their class)::

    class                      0      1      2*     3      4      5
    none (AT teacher)        4.0    1.0    3.0   -1.0    0.5   -2.0
    permute k=2             [4.0]  -2.0   [3.0]   0.5    1.0   -1.0   (bottom 4 shuffled)
    average k=2             [4.0] -0.375  [3.0] -0.375 -0.375 -0.375  (bottom 4 -> mean)
    correct-fix k=1, perm    0.5   -1.0    4.0    3.0    1.0   -2.0   (fix-1 perm, then
                                                                      swap classes 0, 2)
    correct-fix k=1, avg     0.3    0.3    4.0    0.3    0.3    0.3   (fix-1 avg, then swap)
    ST teacher (for hybrid)  0.2    2.5    6.0   -0.5    1.0   -1.0   ST rank: 2,1,4,0,3,5
    hybrid                   0.5    3.0    4.0   -1.0    1.0   -2.0   (AT sorted values
                                                                      4,3,1,.5,-1,-2 in ST rank)

(Rows that permute are one possible draw; the other rows are exact.)

Tie rule, used everywhere a ranking is needed (top-k, the ST ranking in
``hybrid``): rows are ranked by value descending and equal values by ascending
class index (a stable descending sort). This agrees with ``torch.argmax``, which
returns the first maximal index, so "top-1" and "argmax" are the same class.

Exact ties make some guarantees impossible without changing values (e.g. a row
whose two largest values are equal has no class that is a unique argmax).
``correct_fix`` must make the label the argmax, so in such rows it raises the
label's value by one float ulp (``torch.nextafter``); all other manipulations
never change a value, so under ties their argmax can move between tied classes.
Real teacher logits essentially never tie; constant rows and tests do.

Randomness: the permutation keys are drawn from a ``torch.Generator`` (a CPU one
seeded from an int when an int is passed) and then moved to the targets' device,
so a seed gives the same permutation on CPU and GPU.
"""

from __future__ import annotations

import torch

from robustlogits.core.errors import UserError

__all__ = [
    "MANIPULATIONS",
    "FIX_MODES",
    "manipulate",
    "fix_k_permute",
    "fix_k_average",
    "correct_fix",
    "hybrid",
    "manipulation_report",
]

MANIPULATIONS = ("none", "permute", "average", "correct-fix", "hybrid")
FIX_MODES = ("permute", "average")
_NEEDS_K = ("permute", "average", "correct-fix")


# --------------------------------------------------------------------------- checks


def _check_targets(targets: object, name: str = "targets") -> torch.Tensor:
    if not isinstance(targets, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() != 2:
        raise UserError(f"{name} must have shape [N, C], got {tuple(targets.shape)}")
    if not targets.is_floating_point():
        raise UserError(f"{name} must be a floating-point tensor, got {targets.dtype}")
    if targets.shape[0] == 0 or targets.shape[1] == 0:
        raise UserError(f"{name} is empty: shape {tuple(targets.shape)}")
    if not bool(torch.isfinite(targets).all()):
        bad = int((~torch.isfinite(targets)).any(dim=1).sum())
        raise UserError(f"{name} has non-finite values (NaN/inf) in {bad} rows")
    return targets


def _check_labels(labels: object, targets: torch.Tensor) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise UserError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UserError(f"labels must be an integer tensor, got {labels.dtype}")
    n, c = targets.shape
    if labels.shape != (n,):
        raise UserError(f"labels must have shape [{n}] to match targets [{n}, {c}], got {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        raise UserError(f"labels must lie in 0..{c - 1}, got values in {lo}..{hi}")
    return labels.to(device=targets.device, dtype=torch.long)


def _check_k(k: object, num_classes: int) -> int:
    # bool is an int subclass; k=True is a bug, not k=1.
    if isinstance(k, bool) or not isinstance(k, int):
        raise UserError(f"k must be an integer in 1..{num_classes}, got {k!r}")
    if not 1 <= k <= num_classes:
        raise UserError(f"k must be in 1..{num_classes} (number of classes), got {k}")
    return k


def _generator(rng: int | torch.Generator) -> torch.Generator:
    if isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise UserError(f"seed must be an int or a torch.Generator, got {rng!r}")
    return torch.Generator(device="cpu").manual_seed(rng)


# ------------------------------------------------------------------ building blocks


def _rank(values: torch.Tensor) -> torch.Tensor:
    """Class indices per row, largest value first, ties by ascending class index."""
    return torch.sort(values, dim=1, descending=True, stable=True).indices


def fix_k_permute(targets: torch.Tensor, k: int, rng: int | torch.Generator = 0) -> torch.Tensor:
    """Keep each row's top-k values at their classes; uniformly shuffle the rest.

    The shuffle is an argsort of i.i.d. float64 uniform keys per row, i.e. an
    independent uniform permutation of the bottom C-k values in every row.
    ``rng`` is a seed or a generator (advanced by the call).
    """
    targets = _check_targets(targets)
    n, c = targets.shape
    k = _check_k(k, c)
    gen = _generator(rng)
    out = targets.clone()
    if c - k < 2:
        return out
    bottom = _rank(targets)[:, k:]
    keys = torch.rand((n, c - k), generator=gen, dtype=torch.float64, device=gen.device)
    perm = keys.argsort(dim=1).to(targets.device)
    out.scatter_(1, bottom, targets.gather(1, bottom).gather(1, perm))
    return out


def fix_k_average(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's top-k values; set the other C-k values to their mean.

    The mean is taken in float64 so the row sum survives up to one rounding.
    """
    targets = _check_targets(targets)
    c = targets.shape[1]
    k = _check_k(k, c)
    out = targets.clone()
    if c - k < 2:
        return out
    bottom = _rank(targets)[:, k:]
    mean = targets.gather(1, bottom).double().mean(dim=1, keepdim=True).to(targets.dtype)
    out.scatter_(1, bottom, mean.expand(-1, c - k).contiguous())
    return out


def correct_fix(
    targets: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    fix_mode: str = "permute",
    rng: int | torch.Generator = 0,
) -> torch.Tensor:
    """Fix-k, then swap the predicted class's value with the label's (paper: correct-fix-1).

    Fix-k comes first, as in the paper, so the predicted class receives whatever
    the label held *after* permuting/averaging. The predicted class is the
    argmax of the fixed row (equal to the teacher's argmax unless values tie), so
    after the swap the label holds the row maximum whether the label was inside
    the top-k, outside it, or averaged. If another class still ties that maximum
    the label is raised by one ulp so ``argmax == label`` holds in every row.
    Rows the teacher already got right are exactly the fix-k rows.
    """
    targets = _check_targets(targets)
    labels = _check_labels(labels, targets)
    if fix_mode == "permute":
        out = fix_k_permute(targets, k, rng)
    elif fix_mode == "average":
        out = fix_k_average(targets, k)
    else:
        raise UserError(f"fix_mode must be one of {', '.join(FIX_MODES)}; got {fix_mode!r}")

    lab = labels.unsqueeze(1)
    pred = out.argmax(dim=1, keepdim=True)
    top = out.gather(1, pred)
    out.scatter_(1, pred, out.gather(1, lab))
    out.scatter_(1, lab, top)

    others = out.scatter(1, lab, float("-inf"))
    tied = others.max(dim=1, keepdim=True).values >= top
    bumped = torch.nextafter(top, torch.full_like(top, float("inf")))
    out.scatter_(1, lab, torch.where(tied, bumped, top))
    return out


def hybrid(at_targets: torch.Tensor, st_targets: torch.Tensor) -> torch.Tensor:
    """AT values in ST class order: the r-th largest AT value goes to the ST's r-th class.

    Each row keeps the AT teacher's sorted values exactly and takes the ST
    teacher's class ranking (ties in the ST row by ascending class index), so its
    argmax is the ST argmax whenever the AT row's top value is unique.
    """
    at_targets = _check_targets(at_targets, "targets")
    st_targets = _check_targets(st_targets, "st_targets")
    if st_targets.shape != at_targets.shape:
        raise UserError(
            f"st_targets shape {tuple(st_targets.shape)} must match targets shape {tuple(at_targets.shape)}"
        )
    at_sorted = torch.sort(at_targets, dim=1, descending=True).values
    st_order = _rank(st_targets.to(at_targets.device))
    return torch.empty_like(at_targets).scatter_(1, st_order, at_sorted)


# ---------------------------------------------------------------------- public entry


def manipulate(
    targets: torch.Tensor,
    labels: torch.Tensor,
    manipulation: str,
    k: int | None = None,
    fix_mode: str = "permute",
    st_targets: torch.Tensor | None = None,
    seed: int | torch.Generator = 0,
) -> torch.Tensor:
    """Return manipulated copies of the teacher's [N, C] targets; the input is not modified.

    ``k`` is required by permute, average and correct-fix (the paper's correct-fix
    uses k=1) and ignored by none and hybrid; ``fix_mode`` only matters for
    correct-fix; ``st_targets`` (the ST teacher's targets, same shape) only for
    hybrid. Everything is validated up front so a bad run fails before training.
    """
    if manipulation not in MANIPULATIONS:
        raise UserError(f"unknown manipulation {manipulation!r}; choose one of {', '.join(MANIPULATIONS)}")
    targets = _check_targets(targets)
    labels = _check_labels(labels, targets)
    if manipulation in _NEEDS_K:
        if k is None:
            c = targets.shape[1]
            raise UserError(f"manipulation {manipulation!r} needs k (an integer in 1..{c})")
        _check_k(k, targets.shape[1])
    if manipulation == "correct-fix" and fix_mode not in FIX_MODES:
        raise UserError(f"fix_mode must be one of {', '.join(FIX_MODES)}; got {fix_mode!r}")
    if manipulation == "hybrid" and st_targets is None:
        raise UserError("manipulation 'hybrid' needs st_targets from a standard-trained teacher")

    if manipulation == "none":
        return targets.clone()
    if manipulation == "permute":
        return fix_k_permute(targets, k, seed)
    if manipulation == "average":
        return fix_k_average(targets, k)
    if manipulation == "correct-fix":
        return correct_fix(targets, labels, k, fix_mode, seed)
    return hybrid(targets, st_targets)


def manipulation_report(original: torch.Tensor, manipulated: torch.Tensor, labels: torch.Tensor) -> dict:
    """Counts to log beside each run: how much the manipulation moved the argmax.

    ``teacher_error_rate`` is the teacher's training-set error (paper: 19.6% for
    its AT teacher), i.e. the fraction of rows correct-fix has to repair.
    Values are plain Python numbers, ready for MLflow.
    """
    original = _check_targets(original, "original")
    manipulated = _check_targets(manipulated, "manipulated")
    if manipulated.shape != original.shape:
        raise UserError(
            f"manipulated shape {tuple(manipulated.shape)} must match original shape {tuple(original.shape)}"
        )
    labels = _check_labels(labels, original)
    n = original.shape[0]
    pred_orig = original.argmax(dim=1)
    pred_man = manipulated.to(original.device).argmax(dim=1)
    changed = int((pred_orig != pred_man).sum())
    teacher_wrong = int((pred_orig != labels).sum())
    manip_wrong = int((pred_man != labels).sum())
    return {
        "n_targets": n,
        "n_argmax_changed": changed,
        "frac_argmax_changed": changed / n,
        "n_teacher_errors": teacher_wrong,
        "teacher_error_rate": teacher_wrong / n,
        "n_manipulated_errors": manip_wrong,
        "manipulated_error_rate": manip_wrong / n,
    }
