"""The analytically tractable logit model of Appendix C, re-derived and checked numerically.

Surrogate logits are stationary points of the cubic Taylor expansion (3) of the cross-entropy
around the max-logit point z0 = beta * e_top, with the perturbation v orthogonal to z0 (v_top = 0)
and every component below beta. Conventions used throughout: the top class is index 0; for a
correctly classified sample the label is 0 as well, for a misclassified one the label is 1 and the
remaining C - 2 classes are "others". E = exp(beta), C = number of classes.

Derived here (the extracted paper text is garbled and, where readable, disagrees; see
docs/theory.md):

* correct samples, v = f (1 - y):   (1-x) f^2 + 2(1+x) f + 2(1+x)^2 = 0 with x = (C-1)/E, so
  f_pm = (1+x)/(1-x) [-1 pm sqrt(2x - 1)]; real only for beta <= ln(2(C-1)) (the truncated loss
  along f is monotone above that, like the exact loss, which has no stationary point at all).
* misclassified samples, v = g y + psi (1 - e_top - y): two families.
  (i) the paper's: (1-x) g^2 + 2(1+x) g - 2 E (1+x)(1-x') = 0 with x' = (C-3)/E, i.e.
      g_pm = -(1+x)/(1-x) [1 pm kappa],  kappa^2 = 1 + 2 (E-C+1)(E-C+3)/(E+C-1),
      psi = 2 [g/E - (1+x)] / (1-x').
  (ii) psi = 0 (absent from the paper): (E+C-3) g^2 + 2(E+C-1) g - 2(E+C-1)^2 = 0.
* admissibility (beta really is the max): correct samples need beta <= ln(2(C-1)); the '+'
  branch of misclassified samples needs beta > ln(C-1) (the pole of 1/(1-x)), i.e. 2.197 for
  C = 10 and 4.595 for C = 100, not the paper's 3.5. Both are located numerically by scanning and
  bisecting the admissibility predicate; the logarithms are what the tests compare against.
* the stationary points are not all minima: f_+ is a minimum of (3) only below ln(C-1) and a
  saddle above; the misclassified '+' points are maxima within the ansatz (the cubic is unbounded
  below), so the numerical search drives the constrained gradient to zero instead of the loss.
* FGSM gap change (eq. 10): the misclassified term is the pairwise logit dispersion
  [(b-g)^2 + m (b-psi)^2 + m (g-psi)^2] / (m+1), m = C-2; the printed (10) drops the
  2 m/(m+1) (g-psi)^2 part.

Everything is numpy/scipy; figures use matplotlib's object API (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from scipy import optimize

from robustlogits import tracking
from robustlogits.core.errors import UserError
from robustlogits.jobs.test_logits import logits_of_run

PAPER_THRESHOLD = 3.5
CORRECT_BRANCHES = ("+", "-")
WRONG_BRANCHES = ("+", "-", "0+", "0-")
DEFAULT_GRID = (0.0, 10.0, 201)
SCAN = (-10.0, 30.0, 4001)  # beta window for locating admissibility boundaries
FILES = {
    "c1": "fig_c1_admissible_beta.png",
    "c2": "fig_c2_loss_surface.png",
    "c3": "fig_c3_fgsm_gap_change.png",
    "json": "theory.json",
}


# ----------------------------------------------------------------------------- validation


def _classes(n_classes) -> int:
    """The misclassified case needs a true class and at least one 'other' class besides the top."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)):
        raise UserError(f"number of classes must be an integer, got {n_classes!r}")
    if n_classes < 3:
        raise UserError(f"the Appendix C model needs at least 3 classes, got {n_classes}")
    return int(n_classes)


def _error_rate(error_rate) -> float:
    e = float(error_rate)
    if not math.isfinite(e) or not 0.0 <= e <= 1.0:
        raise UserError(f"error rate must lie in [0, 1], got {error_rate!r}")
    return e


def _finite(name: str, value) -> float:
    v = float(value)
    if not math.isfinite(v):
        raise UserError(f"{name} must be finite, got {value!r}")
    return v


def _beta(beta) -> np.ndarray:
    b = np.asarray(beta, dtype=float)
    if np.isnan(b).any():
        raise UserError("beta contains NaN")
    return b


def _branch(branch: str, allowed: Sequence[str]) -> str:
    if branch not in allowed:
        raise UserError(f"branch must be one of {allowed}, got {branch!r}")
    return branch


def _clean(a) -> np.ndarray:
    """Poles of the closed forms become NaN so they can never pass an admissibility test."""
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a), a, np.nan)


# ----------------------------------------------------------------------------- expansion (3)


def base_softmax(beta: float, n_classes: int, top: int = 0) -> np.ndarray:
    """The 'external field' h = softmax(beta * e_top), written to stay finite for any beta."""
    c = _classes(n_classes)
    x = (c - 1) * math.exp(-beta) if beta > -700 else math.inf
    h = np.full(c, 1.0 / (math.exp(beta) + c - 1) if beta < 700 else 0.0)
    h[top] = 1.0 / (1.0 + x)
    return h


def truncated_loss(v, beta: float, label: int, top: int = 0) -> float:
    """Expansion (3): the cross-entropy at beta*e_top + v to third order in v."""
    v = np.asarray(v, dtype=float)
    h = base_softmax(beta, v.size, top)
    y = np.zeros(v.size)
    y[label] = 1.0
    log_z = np.logaddexp(beta, math.log(v.size - 1))
    hv, hv2, hv3 = h @ v, h @ v**2, h @ v**3
    quad = hv2 - hv**2
    cubic = hv3 - 3.0 * hv2 * hv + 2.0 * hv**3
    return float(log_z - beta * y[top] + v @ (h - y) + 0.5 * quad + cubic / 6.0)


def truncated_gradient(v, beta: float, label: int, top: int = 0) -> np.ndarray:
    """Analytic gradient of (3); the constrained gradient drops component `top`."""
    v = np.asarray(v, dtype=float)
    h = base_softmax(beta, v.size, top)
    y = np.zeros(v.size)
    y[label] = 1.0
    hv, hv2 = h @ v, h @ v**2
    return (h - y) + h * v - hv * h + 0.5 * h * v**2 - hv * h * v - 0.5 * hv2 * h + hv**2 * h


def truncated_hessian(v, beta: float, top: int = 0) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    h = base_softmax(beta, v.size, top)
    hv = h @ v
    return (
        np.diag(h + h * v - hv * h)
        - np.outer(h, h)
        - np.outer(h * v, h)
        - np.outer(h, h * v)
        + 2.0 * hv * np.outer(h, h)
    )


def truncated_hessian_product(v, beta: float, u, top: int = 0) -> np.ndarray:
    """Hessian of (3) times the columns of u, in O(C) per column (C = 1000 stays cheap)."""
    v = np.asarray(v, dtype=float)
    u = np.asarray(u, dtype=float)
    u2 = u.reshape(v.size, -1)
    h = base_softmax(beta, v.size, top)
    hv = h @ v
    hu, hvu = h @ u2, (h * v) @ u2
    out = (
        (h + h * v - hv * h)[:, None] * u2
        - np.outer(h, hu)
        - np.outer(h * v, hu)
        - np.outer(h, hvu)
        + 2.0 * hv * np.outer(h, hu)
    )
    return out.reshape(u.shape)


# ----------------------------------------------------------------------------- closed forms


def f_branches(beta, n_classes) -> tuple[np.ndarray, np.ndarray]:
    """(f_+, f_-) for correct samples; NaN where 2x - 1 < 0, i.e. beta > ln(2(C-1))."""
    c, b = _classes(n_classes), _beta(beta)
    with np.errstate(all="ignore"):
        e = np.exp(b)
        disc = 2.0 * (c - 1) / e - 1.0
        s = np.sqrt(np.where(disc >= 0, disc, np.nan))
        f_plus = -2.0 * (e + c - 1) / (e * (1.0 + s))  # rationalised: finite through x = 1
        f_minus = -(e + c - 1) * (1.0 + s) / (e - c + 1)
    return _clean(f_plus), _clean(f_minus)


def kappa(beta, n_classes) -> np.ndarray:
    """Corrected kappa; kappa^2 >= 1 - 2/(2C-3) > 0 for C >= 3, so it is always real."""
    c, b = _classes(n_classes), _beta(beta)
    with np.errstate(all="ignore"):
        e = np.exp(b)
        return np.sqrt(1.0 + 2.0 * (e - c + 1) * (e - c + 3) / (e + c - 1))


def g_psi(beta, n_classes, branch: str = "+") -> tuple[np.ndarray, np.ndarray]:
    """(g, psi) of a misclassified surrogate on the given branch ('+', '-', '0+', '0-')."""
    c, b = _classes(n_classes), _beta(beta)
    _branch(branch, WRONG_BRANCHES)
    with np.errstate(all="ignore"):
        e = np.exp(b)
        if branch.startswith("0"):
            sign = 1.0 if branch == "0+" else -1.0
            g = (e + c - 1) / (e + c - 3) * (-1.0 + sign * np.sqrt(1.0 + 2.0 * (e + c - 3)))
            return _clean(g), np.zeros_like(_clean(g))
        k = kappa(b, c)
        if branch == "+":
            g = -(e + c - 1) * (1.0 + k) / (e - c + 1)
        else:  # product of roots, so the finite root stays finite at e = C - 1
            g = 2.0 * (e - c + 3) / (1.0 + k)
        psi = 2.0 * (g - (e + c - 1)) / (e - c + 3)
    return _clean(g), _clean(psi)


def printed_f(beta, n_classes, branch: str = "+") -> np.ndarray:
    """f_pm exactly as printed in the paper; kept only to show it is not stationary."""
    c, b = _classes(n_classes), _beta(beta)
    sign = 1.0 if _branch(branch, CORRECT_BRANCHES) == "+" else -1.0
    with np.errstate(all="ignore"):
        em = np.exp(-b)
        x = (c - 1) * em
        root = np.sqrt(1.0 + 2.0 * em**2 * (1.0 - x) / (1.0 + x) ** 2)
        return _clean((1.0 + x) / (1.0 - x) * (-1.0 + sign * root))


def printed_g_psi(beta, n_classes, branch: str = "+", squared: bool = False):
    """(g, psi) as printed; `squared` adds the square the extraction may have lost in kappa."""
    c, b = _classes(n_classes), _beta(beta)
    sign = 1.0 if _branch(branch, CORRECT_BRANCHES) == "+" else -1.0
    with np.errstate(all="ignore"):
        em = np.exp(-b)
        x, xp = (c - 1) * em, (c - 3) * em
        inner = 1.0 + 2.0 * (1.0 - x) * (1.0 - xp) / (1.0 + x) ** (2 if squared else 1)
        k = (1.0 + x) / (1.0 - xp) * np.sqrt(np.where(inner >= 0, inner, np.nan))
        g = -(1.0 - xp) / (1.0 - x) * (1.0 + sign * k)
        psi = 2.0 * (em / (1.0 - x) * g - (1.0 + x) / (1.0 - xp))
    return _clean(g), _clean(psi)


def surrogate_logits(beta: float, n_classes: int, correct: bool, branch: str = "+"):
    """Full surrogate logit vector and its label (top class 0; label 0 if correct, else 1)."""
    c = _classes(n_classes)
    z = np.zeros(c)
    z[0] = beta
    if correct:
        f = f_branches(beta, c)[CORRECT_BRANCHES.index(_branch(branch, CORRECT_BRANCHES))]
        z[1:] = f
        return z, 0
    g, psi = g_psi(beta, c, branch)
    z[1], z[2:] = g, psi
    return z, 1


# ----------------------------------------------------------------------------- numerics


def _ansatz_basis(n_classes: int, correct: bool) -> np.ndarray:
    """Columns span the symmetric ansatz: (1 - y) if correct; y and (1 - e_top - y) otherwise."""
    basis = np.zeros((n_classes, 1 if correct else 2))
    if correct:
        basis[1:, 0] = 1.0
    else:
        basis[1, 0] = 1.0
        basis[2:, 1] = 1.0
    return basis


def _default_starts(dim: int) -> np.ndarray:
    scales = np.r_[0.0, np.outer([-1.0, 1.0], 4.0 ** np.arange(-1, 4)).ravel()]
    return np.array(np.meshgrid(*[scales] * dim)).reshape(dim, -1).T


def numerical_stationary_points(
    beta: float, n_classes: int, correct: bool, starts=None, tol: float = 1e-9
) -> np.ndarray:
    """Stationary points of (3) in the symmetric ansatz, found without the closed forms.

    The cubic (3) is unbounded below on the constraint set and most of the paper's points are
    saddles (see `stationary_kind`), so plain minimisation of the loss cannot find them. Instead we
    minimise the squared norm of the full constrained gradient (all C-1 components, so symmetry is
    not assumed in the residual) from a spread of starts, keep zero-residual solutions, dedupe.
    """
    c = _classes(n_classes)
    basis = _ansatz_basis(c, correct)
    label = 0 if correct else 1
    starts = _default_starts(basis.shape[1]) if starts is None else np.atleast_2d(starts)

    def residual(theta):
        return truncated_gradient(basis @ theta, beta, label)[1:]

    def jacobian(theta):
        return truncated_hessian_product(basis @ theta, beta, basis)[1:]

    found: list[np.ndarray] = []
    for start in starts:
        sol = optimize.least_squares(residual, start, jac=jacobian, method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15)
        if np.max(np.abs(residual(sol.x))) > tol:
            continue
        if not any(np.allclose(sol.x, p, rtol=1e-6, atol=1e-6) for p in found):
            found.append(sol.x)
    return np.array(sorted(found, key=lambda p: tuple(p))).reshape(-1, basis.shape[1])


def minimise_correct_truncated(beta: float, n_classes: int, width: float | None = None) -> np.ndarray:
    """Local minima of (3) along v = f (1 - y) inside the constraint f < beta, by Brent's method.

    Where the correct-sample stationary point is a minimum of the truncated loss, this is the
    literal 'minimise over the constraint set' the paper describes; brackets come from a scan.
    """
    c = _classes(n_classes)
    width = 4.0 * c + 64.0 if width is None else width
    y_off = _ansatz_basis(c, True)[:, 0]

    def loss(f):
        return truncated_loss(f * y_off, beta, 0)

    grid = np.linspace(beta - width, beta, 2001)[:-1]
    vals = np.array([loss(f) for f in grid])
    minima = []
    for i in np.flatnonzero((vals[1:-1] < vals[:-2]) & (vals[1:-1] < vals[2:])) + 1:
        res = optimize.minimize_scalar(loss, bracket=(grid[i - 1], grid[i], grid[i + 1]), tol=1e-12)
        minima.append(res.x)
    return np.array(minima)


def stationary_kind(v, beta: float, basis: np.ndarray | None = None, tol: float = 1e-12) -> str:
    """'minimum' / 'maximum' / 'saddle' of (3) on the constraint set, or within `basis` columns."""
    hess = truncated_hessian(v, beta)[1:, 1:]
    if basis is not None:
        b = np.asarray(basis)[1:]
        hess = b.T @ hess @ b
    eig = np.linalg.eigvalsh(hess)
    if eig.min() > tol:
        return "minimum"
    if eig.max() < -tol:
        return "maximum"
    return "saddle"


# ----------------------------------------------------------------------------- admissibility


def correct_admissible(beta, n_classes, branch: str = "+") -> np.ndarray:
    """Equation (4)'s condition beta > f, plus existence of a real f."""
    f = f_branches(beta, n_classes)[CORRECT_BRANCHES.index(_branch(branch, CORRECT_BRANCHES))]
    with np.errstate(invalid="ignore"):
        return np.isfinite(f) & (_beta(beta) > f)


def wrong_admissible(beta, n_classes, branch: str = "+") -> np.ndarray:
    """Equation (5)'s condition beta > max(g, psi): the top class really is the top."""
    g, psi = g_psi(beta, n_classes, branch)
    with np.errstate(invalid="ignore"):
        return np.isfinite(g) & np.isfinite(psi) & (_beta(beta) > np.maximum(g, psi))


def admissible_intervals(
    predicate, lo: float = SCAN[0], hi: float = SCAN[1], n: int = SCAN[2]
) -> list[tuple[float, float]]:
    """Intervals of [lo, hi] where `predicate` holds: scan, then bisect each boundary to 1e-12.

    An end equal to lo or hi means the interval runs on past the scanned window.
    """
    grid = np.linspace(lo, hi, n)
    ok = np.asarray(predicate(grid), dtype=bool)

    def refine(a, b):  # predicate(a) != predicate(b)
        pa = bool(predicate(np.array([a]))[0])
        for _ in range(60):
            mid = 0.5 * (a + b)
            if bool(predicate(np.array([mid]))[0]) == pa:
                a = mid
            else:
                b = mid
            if b - a < 1e-12:
                break
        return 0.5 * (a + b)

    intervals, start = [], (lo if ok[0] else None)
    for i in np.flatnonzero(ok[1:] != ok[:-1]):
        edge = refine(grid[i], grid[i + 1])
        if ok[i + 1]:
            start = edge
        else:
            intervals.append((start, edge))
            start = None
    if start is not None:
        intervals.append((start, hi))
    return intervals


def misclassified_threshold(n_classes: int, branch: str = "+") -> float:
    """Lower end of the admissible beta interval that extends to large beta (paper: 3.5 at C=10)."""
    c = _classes(n_classes)
    intervals = admissible_intervals(lambda b: wrong_admissible(b, c, branch))
    if not intervals or intervals[-1][1] < SCAN[1]:
        return math.nan
    return intervals[-1][0]


def correct_upper_bound(n_classes: int, branch: str = "+") -> float:
    """Upper end of the admissible beta interval of correct samples that extends to small beta."""
    c = _classes(n_classes)
    intervals = admissible_intervals(lambda b: correct_admissible(b, c, branch))
    if not intervals or intervals[0][0] > SCAN[0]:
        return math.nan
    return intervals[0][1]


def printed_threshold(n_classes: int, squared: bool = False) -> float:
    """The same boundary computed from the printed (non-stationary) forms, for comparison."""
    c = _classes(n_classes)

    def ok(b):
        g, psi = printed_g_psi(b, c, "+", squared)
        with np.errstate(invalid="ignore"):
            return np.isfinite(g) & np.isfinite(psi) & (b > np.maximum(g, psi))

    intervals = admissible_intervals(ok)
    return intervals[-1][0] if intervals and intervals[-1][1] >= SCAN[1] else math.nan


# ----------------------------------------------------------------------------- mean-field loss


def surrogate_loss(beta, n_classes, correct: bool, branch: str = "+") -> np.ndarray:
    """Exact cross-entropy at the surrogate logits, in closed form; NaN where inadmissible."""
    c, b = _classes(n_classes), _beta(beta)
    with np.errstate(invalid="ignore"):
        if correct:
            f = f_branches(b, c)[CORRECT_BRANCHES.index(_branch(branch, CORRECT_BRANCHES))]
            loss = np.logaddexp(0.0, math.log(c - 1) + f - b)
            return np.where(correct_admissible(b, c, branch), loss, np.nan)
        g, psi = g_psi(b, c, branch)
        loss = np.logaddexp(np.logaddexp(b, g), psi + math.log(c - 2)) - g
        return np.where(wrong_admissible(b, c, branch), loss, np.nan)


def mean_field_loss(beta_correct, beta_wrong, n_classes, error_rate: float, branch: str = "+") -> np.ndarray:
    """(1 - eps) L(beta_correct) + eps L(beta_wrong), broadcasting the two beta arrays."""
    eps = _error_rate(error_rate)
    lc = surrogate_loss(beta_correct, n_classes, True)
    lw = surrogate_loss(beta_wrong, n_classes, False, branch)
    term_c = (1.0 - eps) * lc if eps < 1.0 else np.zeros_like(lc)
    term_w = eps * lw if eps > 0.0 else np.zeros_like(lw)
    return term_c + term_w


# ----------------------------------------------------------------------------- FGSM, eq. (8)-(10)


def pairwise_dispersion(z) -> np.ndarray:
    """(C z.z - (z.1)^2) / (C-1) = sum_{i<j} (z_i - z_j)^2 / (C-1), the per-sample factor of (9)."""
    z = np.asarray(z, dtype=float)
    c = z.shape[-1]
    return (c * (z**2).sum(-1) - z.sum(-1) ** 2) / (c - 1)


def surrogate_dispersion(beta, n_classes, correct: bool, branch: str = "+") -> np.ndarray:
    """Closed form of `pairwise_dispersion` at the surrogate logits."""
    c, b = _classes(n_classes), _beta(beta)
    if correct:
        f = f_branches(b, c)[CORRECT_BRANCHES.index(_branch(branch, CORRECT_BRANCHES))]
        return (b - f) ** 2
    g, psi = g_psi(b, c, branch)
    m = c - 2
    return ((b - g) ** 2 + m * (b - psi) ** 2 + m * (g - psi) ** 2) / (m + 1)


def gap_change(
    beta_correct,
    beta_wrong,
    n_classes,
    error_rate: float,
    omega_correct: float = 1.0,
    omega_wrong: float = 1.0,
    branch: str = "+",
) -> np.ndarray:
    """Corrected eq. (10): first-order FGSM change of a correct sample's gap (always <= 0).

    Omegas are the paper's Omega(eps) (the attack strength eps is absorbed in them). NaN where
    either surrogate is inadmissible (f_+ is NaN on its own above ln(2(C-1))).
    """
    eps = _error_rate(error_rate)
    oc, ow = _finite("omega_correct", omega_correct), _finite("omega_wrong", omega_wrong)
    dc = surrogate_dispersion(beta_correct, n_classes, True)
    dw = surrogate_dispersion(beta_wrong, n_classes, False, branch)
    dw = np.where(wrong_admissible(beta_wrong, n_classes, branch), dw, np.nan)
    return -((1.0 - eps) * oc * dc + (eps * ow * dw if eps > 0 else 0.0))


def gap_change_printed(
    beta_correct,
    beta_wrong,
    n_classes,
    error_rate: float,
    omega_correct: float = 1.0,
    omega_wrong: float = 1.0,
    branch: str = "+",
) -> np.ndarray:
    """Eq. (10) as printed (no (g - psi)^2 term), for comparison with `gap_change`."""
    c, eps = _classes(n_classes), _error_rate(error_rate)
    bc, bw = _beta(beta_correct), _beta(beta_wrong)
    f = f_branches(bc, c)[0]
    g, psi = g_psi(bw, c, branch)
    m = c - 2
    return -((1 - eps) * omega_correct * (bc - f) ** 2 + eps * omega_wrong * (bw - g) ** 2) - 2.0 * m / (
        m + 1
    ) * eps * omega_wrong * (bw - g) * (g - psi)


def relative_gap_change(
    beta_correct,
    beta_wrong,
    n_classes,
    error_rate: float,
    omega_correct: float = 1.0,
    omega_wrong: float = 1.0,
    branch: str = "+",
) -> np.ndarray:
    """|delta gap| / |gap| of a correct sample, gap = beta_correct - f_+(beta_correct)."""
    f = f_branches(beta_correct, n_classes)[0]
    dg = gap_change(beta_correct, beta_wrong, n_classes, error_rate, omega_correct, omega_wrong, branch)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(dg) / np.abs(_beta(beta_correct) - f)


def fgsm_logit_shift(train_logits, omegas, label: int) -> np.ndarray:
    """Eq. (8) for one sample with class `label`: sum_nu Omega_nu [z^nu.(1 - C y)] z^nu."""
    z = np.asarray(train_logits, dtype=float)
    w = np.asarray(omegas, dtype=float)
    proj = z.sum(1) - z.shape[1] * z[:, label]
    return (w * proj) @ z


def fgsm_gap_change_direct(train_logits, omegas) -> float:
    """Gap change from eq. (8) averaged over the sample's label and runner-up class (as in (9))."""
    z = np.asarray(train_logits, dtype=float)
    c = z.shape[1]
    total = 0.0
    for label in range(c):
        dz = fgsm_logit_shift(z, omegas, label)
        total += dz[label] - (dz.sum() - dz[label]) / (c - 1)
    return total / c


# ----------------------------------------------------------------------------- figures


def _canvas(fig: Figure) -> Figure:
    FigureCanvasAgg(fig)
    return fig


def _clip_for_plot(a, lim: float = 60.0) -> np.ndarray:
    """Break curves at poles instead of drawing vertical lines across the axes."""
    a = np.asarray(a, dtype=float).copy()
    a[np.abs(a) > lim] = np.nan
    return a


def _fig_admissible(class_counts, summary, path: pathlib.Path) -> None:
    betas = np.linspace(-1.0, 10.0, 2201)
    fig = _canvas(Figure(figsize=(15, 4.2 * len(class_counts))))
    axes = fig.subplots(len(class_counts), 3, squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.92, wspace=0.2, hspace=0.35)
    for row, c in zip(axes, class_counts):
        s = summary[str(c)]
        f_p, f_m = f_branches(betas, c)
        ax = row[0]
        ax.plot(betas, _clip_for_plot(f_p), label="f+")
        ax.plot(betas, _clip_for_plot(f_m), "--", label="f-")
        ax.plot(betas, betas, "k:", lw=1, label="beta")
        ax.axvspan(betas[0], s["correct_upper_bound"], color="tab:green", alpha=0.12, label="admissible (f+)")
        ax.set(title=f"C={c}: correctly classified", xlabel="beta (max logit)", ylabel="f", ylim=(-30, 12))
        ax.legend(fontsize=8)
        ax = row[1]
        for branch, style in (("+", "-"), ("-", "--")):
            g, psi = g_psi(betas, c, branch)
            ax.plot(betas, _clip_for_plot(g), style, color="tab:red", label=f"g{branch}")
            ax.plot(betas, _clip_for_plot(psi), style, color="tab:purple", label=f"psi{branch}")
        ax.plot(betas, _clip_for_plot(g_psi(betas, c, "0-")[0]), ":", color="tab:brown", label="g (psi=0 family)")
        ax.plot(betas, betas, "k:", lw=1)
        thr = s["misclassified_threshold"]
        ax.axvspan(thr, betas[-1], color="tab:red", alpha=0.10, label="admissible (+ branch)")
        ax.axvline(thr, color="tab:red", lw=1)
        ax.axvline(PAPER_THRESHOLD, color="grey", ls="-.", lw=1, label="paper: 3.5")
        ax.set(title=f"C={c}: misclassified, threshold {thr:.3f}", xlabel="beta (max logit)", ylim=(-30, 12))
        ax.legend(fontsize=7, ncol=2)
        ax = row[2]
        gap_c = np.where(correct_admissible(betas, c), betas - f_p, np.nan)
        g, psi = g_psi(betas, c, "+")
        gap_w = np.where(wrong_admissible(betas, c), betas - np.maximum(g, psi), np.nan)
        ax.plot(betas, gap_c, color="tab:green", label="correct: beta - f+")
        ax.plot(betas, _clip_for_plot(gap_w, 80), color="tab:red", label="misclassified: beta - max(g+, psi+)")
        ax.set(title=f"C={c}: surrogate logit gaps", xlabel="beta (max logit)", ylabel="gap", ylim=(0, 40))
        ax.legend(fontsize=8)
    fig.suptitle("Fig. C.1 (re-derived): admissible max-logit values of the surrogate logits")
    fig.savefig(path, dpi=110)


def _grid_heatmaps(class_counts, grid, values, title, cbar, path, mark=None) -> None:
    """Log-colour heatmaps; the top 2% is saturated so the poles at the thresholds don't wash
    out the admissible region."""
    b = np.linspace(*grid[:2], int(grid[2]))
    fig = _canvas(Figure(figsize=(6.2 * len(class_counts), 5)))
    axes = fig.subplots(1, len(class_counts), squeeze=False)[0]
    fig.subplots_adjust(left=0.07, right=0.97, bottom=0.11, top=0.88, wspace=0.25)
    for ax, c in zip(axes, class_counts):
        data = np.ma.masked_invalid(values[c])
        ax.set_facecolor("0.85")
        pos = data.compressed()[data.compressed() > 0]
        norm = None
        if pos.size and pos.min() < np.percentile(pos, 98):
            norm = LogNorm(pos.min(), np.percentile(pos, 98), clip=True)
        mesh = ax.pcolormesh(b, b, data.T, shading="nearest", cmap="viridis", norm=norm)
        fig.colorbar(mesh, ax=ax, label=cbar)
        if norm is not None:
            levels = np.geomspace(norm.vmin, norm.vmax, 8)[1:-1]
            ax.contour(b, b, np.ma.masked_greater(data, norm.vmax).T, levels=levels, colors="w", linewidths=0.6)
        if mark is not None and mark.get(c):
            ax.plot(*mark[c], "r*", ms=12, label="grid minimum of the loss")
            ax.legend(fontsize=8, loc="upper right")
        ax.set(xlabel="beta_correct", ylabel="beta_wrong", title=f"C={c} (grey: inadmissible)")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- driver


def _r(x, digits: int = 7):
    """Compact JSON numbers (significant digits, so tiny residuals stay visible); inf -> null."""
    if x is None:
        return None
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _grid(grid) -> tuple[float, float, int]:
    try:
        lo, hi, n = (float(grid[0]), float(grid[1]), int(grid[2]))
    except (TypeError, ValueError, IndexError) as exc:
        raise UserError(f"grid must be (beta_min, beta_max, n_points), got {grid!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and 3 <= n <= 2001):
        raise UserError(f"grid must have finite beta_min < beta_max and 3..2001 points, got {grid!r}")
    return lo, hi, n


def _checks(c: int, threshold: float, upper: float) -> dict:
    """Closed form vs numerical search, gradient at the closed forms, and what kind of point."""
    diffs, grads, kinds = [], [], {}
    for beta in (upper - 1.5, upper - 0.4):
        num = numerical_stationary_points(beta, c, True)
        closed = np.sort(np.ravel(f_branches(beta, c)))[:, None]
        closed = closed[np.isfinite(closed[:, 0])]
        diffs.append(_set_distance(num, closed))
        z, lab = surrogate_logits(beta, c, True)
        v = z - beta * np.eye(c)[0]
        grads.append(np.abs(truncated_gradient(v, beta, lab)[1:]).max())
        kinds[f"correct f+ at beta={beta:.3f}"] = stationary_kind(v, beta)
    for beta in (threshold + 0.5, threshold + 1.5):
        num = numerical_stationary_points(beta, c, False)
        closed = np.array([np.r_[g_psi(beta, c, br)] for br in WRONG_BRANCHES])
        closed = closed[np.all(np.isfinite(closed), 1) & (np.abs(closed).max(1) < 200)]
        diffs.append(_set_distance(num[np.abs(num).max(1) < 200], closed))
        z, lab = surrogate_logits(beta, c, False)
        v = z - beta * np.eye(c)[0]
        grads.append(np.abs(truncated_gradient(v, beta, lab)[1:]).max())
        kinds[f"misclassified + at beta={beta:.3f}"] = stationary_kind(v, beta)
        kinds[f"misclassified + at beta={beta:.3f}, within ansatz"] = stationary_kind(v, beta, _ansatz_basis(c, False))
    beta = upper - 1.0
    zp = np.r_[beta, np.full(c - 1, printed_f(beta, c)[()])]
    printed_grad = np.abs(truncated_gradient(zp - beta * np.eye(c)[0], beta, 0)[1:]).max()
    return {
        "max_abs_closed_minus_numeric": _r(max(diffs), 3),
        "max_constrained_gradient_at_closed_form": _r(max(grads), 3),
        "constrained_gradient_at_printed_f": _r(printed_grad, 3),
        "stationary_kind": kinds,
    }


def _set_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance between two point sets (inf if their sizes differ)."""
    if len(a) != len(b):
        return math.inf
    if len(a) == 0:
        return 0.0
    d = np.abs(a[:, None, :] - b[None, :, :]).max(-1)
    return float(max(d.min(0).max(), d.min(1).max()))


def _class_summary(c: int, eps: float, oc: float, ow: float, grid) -> tuple[dict, dict]:
    thr = misclassified_threshold(c)
    upper = correct_upper_bound(c)
    b = np.linspace(*grid[:2], grid[2])
    bc, bw = np.meshgrid(b, b, indexing="ij")
    loss = mean_field_loss(bc, bw, c, eps)
    rel = relative_gap_change(bc, bw, c, eps, oc, ow)
    rel = np.where(np.isfinite(loss), rel, np.nan)
    i, j = np.unravel_index(np.nanargmin(loss), loss.shape) if np.isfinite(loss).any() else (None, None)
    # the loss is separable, so its minimiser is found one beta at a time, inside the grid window
    cont = {}
    for key, correct, (left, right) in (
        ("correct", True, (grid[0], min(grid[1], upper))),
        ("wrong", False, (max(grid[0], thr), grid[1])),
    ):
        if not left < right:
            cont[key] = None
            continue
        res = optimize.minimize_scalar(
            lambda x, correct=correct: surrogate_loss(x, c, correct)[()],
            bounds=(left + 1e-9, right),
            method="bounded",
            options={"xatol": 1e-9},
        )
        vec, _ = surrogate_logits(res.x, c, correct)
        # expansion (3) assumes ||v|| << |beta|; undefined at beta ~ 0
        ratio = np.linalg.norm(vec[1:]) / abs(res.x) if abs(res.x) > 1e-6 else None
        cont[key] = {
            "beta": _r(res.x),
            "loss": _r(res.fun),
            "norm_v_over_beta": _r(ratio),
            "at_window_edge": bool(min(res.x - left, right - res.x) < 1e-6),
        }
    summary = {
        "misclassified_threshold": _r(thr),
        "misclassified_threshold_ln(C-1)": _r(math.log(c - 1)),
        "misclassified_threshold_minus_paper": _r(thr - PAPER_THRESHOLD),
        "misclassified_threshold_from_printed_forms": _r(printed_threshold(c)),
        "correct_upper_bound": _r(upper),
        "correct_upper_bound_ln(2(C-1))": _r(math.log(2 * (c - 1))),
        "admissible_intervals_misclassified": {
            br: [[_r(a), _r(z)] for a, z in admissible_intervals(lambda x, br=br: wrong_admissible(x, c, br))]
            for br in WRONG_BRANCHES
        },
        "loss_surface_grid_min": None
        if i is None
        else {
            "loss": _r(loss[i, j]),
            "beta_correct": _r(b[i]),
            "beta_wrong": _r(b[j]),
            "relative_gap_change_there": _r(rel[i, j]),
        },
        "loss_min_within_grid_window": cont,
        "relative_gap_change_min_median": [_r(np.nanmin(rel)), _r(np.nanmedian(rel))]
        if np.isfinite(rel).any()
        else None,
        "checks": _checks(c, thr, upper),
    }
    mark = None if i is None else (b[i], b[j])
    return summary, {"loss": loss, "rel": rel, "mark": mark}


def write_theory_figures(
    out_dir: pathlib.Path,
    class_counts=(10, 100),
    error_rate: float = 0.196,
    omega_correct: float = 1.0,
    omega_wrong: float = 1.0,
    grid=DEFAULT_GRID,
) -> dict:
    """Figures C.1-C.3 and theory.json in out_dir; returns the JSON-able summary."""
    counts = tuple(_classes(c) for c in class_counts)
    if not counts:
        raise UserError("class_counts is empty")
    eps = _error_rate(error_rate)
    oc, ow = _finite("omega_correct", omega_correct), _finite("omega_wrong", omega_wrong)
    if oc < 0 or ow < 0:
        raise UserError("the Omega coefficients are non-negative in the paper's eq. (8)")
    lo, hi, n = _grid(grid)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    per_class, maps = {}, {}
    for c in counts:
        per_class[str(c)], maps[c] = _class_summary(c, eps, oc, ow, (lo, hi, n))
    files = {k: str(out / name) for k, name in FILES.items()}
    _fig_admissible(counts, per_class, pathlib.Path(files["c1"]))
    _grid_heatmaps(
        counts,
        (lo, hi, n),
        {c: maps[c]["loss"] for c in counts},
        f"Fig. C.2: mean-field loss, error rate {eps:g}",
        "exact cross-entropy",
        pathlib.Path(files["c2"]),
        {c: maps[c]["mark"] for c in counts},
    )
    _grid_heatmaps(
        counts,
        (lo, hi, n),
        {c: maps[c]["rel"] for c in counts},
        f"Fig. C.3: FGSM |delta gap| / gap, Omega_correct={oc:g}, Omega_wrong={ow:g}",
        "|delta gap| / gap",
        pathlib.Path(files["c3"]),
        {c: maps[c]["mark"] for c in counts},
    )
    summary = {
        "paper_threshold": PAPER_THRESHOLD,
        "error_rate": eps,
        "omega_correct": oc,
        "omega_wrong": ow,
        "grid": {"beta_min": lo, "beta_max": hi, "n": n},
        "class_counts": per_class,
        "files": files,
    }
    pathlib.Path(files["json"]).write_text(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------- bridge to data


def _as_models(logits, labels, label: str) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """One (logits, labels, label) or a list of such triples, validated."""
    if isinstance(logits, (list, tuple)):
        if labels is not None:
            raise UserError("with a list of models, labels go inside the (logits, labels, label) triples")
        if not logits:
            raise UserError("no models given")
        raw = list(logits)
    else:
        raw = [(logits, labels, label)]
    models, names = [], set()
    for k, item in enumerate(raw):
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise UserError("each model must be a (logits, labels, label) triple")
        z, y, name = item
        z = np.asarray(z, dtype=float)
        if y is None:
            raise UserError("labels are required")
        y = np.asarray(y)
        if z.ndim != 2 or z.shape[0] == 0:
            raise UserError(f"logits must be a non-empty [N, C] array, got shape {z.shape}")
        _classes(z.shape[1])
        if not np.isfinite(z).all():
            raise UserError("logits contain NaN or infinite values")
        if y.shape != (z.shape[0],):
            raise UserError(f"labels must have shape ({z.shape[0]},), got {y.shape}")
        if not np.issubdtype(y.dtype, np.integer):
            if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
                raise UserError("labels must be integer class indices")
            y = y.astype(int)
        if y.min() < 0 or y.max() >= z.shape[1]:
            raise UserError(f"labels must lie in [0, {z.shape[1]})")
        name = str(name) or f"model {k + 1}"
        while name in names:
            name += "'"
        names.add(name)
        models.append((z, y, name))
    if len({m[0].shape[1] for m in models}) != 1:
        raise UserError("all models must have the same number of classes")
    return models


def empirical_stats(logits, labels) -> dict[str, np.ndarray]:
    """Per-sample max logit, gap (top-1 minus top-2), correctness, mean of the non-max logits."""
    z = np.asarray(logits, dtype=float)
    top2 = -np.sort(-z, axis=1)[:, :2]
    return {
        "max_logit": top2[:, 0],
        "gap": top2[:, 0] - top2[:, 1],
        "correct": z.argmax(1) == np.asarray(labels),
        "nonmax_mean": (z.sum(1) - top2[:, 0]) / (z.shape[1] - 1),
    }


def _mean(a) -> float | None:
    return _r(np.mean(a)) if len(a) else None


def place_empirical(logits, labels, out_path: pathlib.Path, label: str = "") -> dict:
    """Empirical max-logit/gap distributions drawn on the model's admissible-beta axes.

    `logits` is an [N, C] array with `labels` [N], or a list of (logits, labels, label) triples
    (labels=None) to overlay several models, e.g. ST and AT. The model's beta is the max logit in
    the gauge where non-max logits sit near 0, so the non-max mean is reported as a diagnostic.
    """
    models = _as_models(logits, labels, label)
    c = models[0][0].shape[1]
    thr, upper = misclassified_threshold(c), correct_upper_bound(c)
    stats = {name: empirical_stats(z, y) for z, y, name in models}
    result = {
        "n_classes": c,
        "misclassified_threshold": _r(thr),
        "correct_upper_bound": _r(upper),
        "paper_threshold": PAPER_THRESHOLD,
        "models": {},
    }
    for name, s in stats.items():
        ok, wrong = s["correct"], ~s["correct"]
        result["models"][name] = {
            "n": int(ok.size),
            "accuracy": _r(ok.mean()),
            "mean_max_logit": _mean(s["max_logit"]),
            "mean_max_logit_correct": _mean(s["max_logit"][ok]),
            "mean_max_logit_misclassified": _mean(s["max_logit"][wrong]),
            "mean_max_logit_minus_paper_3.5": _r(np.mean(s["max_logit"]) - PAPER_THRESHOLD),
            "mean_max_logit_misclassified_minus_threshold": _r(np.mean(s["max_logit"][wrong]) - thr)
            if wrong.any()
            else None,
            "fraction_misclassified_above_threshold": _r(np.mean(s["max_logit"][wrong] > thr)) if wrong.any() else None,
            "fraction_correct_within_upper_bound": _r(np.mean(s["max_logit"][ok] <= upper)) if ok.any() else None,
            "mean_gap_correct": _mean(s["gap"][ok]),
            "mean_gap_misclassified": _mean(s["gap"][wrong]),
            "mean_nonmax_logit": _mean(s["nonmax_mean"]),
        }
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    _fig_empirical(stats, c, thr, upper, out)
    result["file"] = str(out)
    return result


def _fig_empirical(stats: dict, c: int, thr: float, upper: float, path: pathlib.Path) -> None:
    allmax = np.concatenate([s["max_logit"] for s in stats.values()])
    lo = min(np.percentile(allmax, 0.5), thr, upper) - 0.5
    hi = max(np.percentile(allmax, 99.5), thr, upper) + 0.5
    bins = np.linspace(lo, hi, 61)
    fig = _canvas(Figure(figsize=(13, 4.8)))
    ax_h, ax_s = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    rng = np.random.default_rng(0)
    for k, (name, s) in enumerate(stats.items()):
        col = colors[k % len(colors)]
        for mask, style, what in ((s["correct"], "-", "correct"), (~s["correct"], "--", "wrong")):
            if mask.any():
                ax_h.hist(
                    s["max_logit"][mask],
                    bins=bins,
                    density=True,
                    histtype="step",
                    ls=style,
                    color=col,
                    label=f"{name} {what} (n={mask.sum()})",
                )
                idx = np.flatnonzero(mask)
                idx = rng.choice(idx, min(idx.size, 3000), replace=False)
                ax_s.scatter(
                    s["max_logit"][idx],
                    s["gap"][idx],
                    s=4,
                    alpha=0.3,
                    color=col,
                    marker="o" if what == "correct" else "x",
                    label=f"{name} {what}",
                )
        ax_h.axvline(np.mean(s["max_logit"]), color=col, lw=0.8, ls=":")
    for ax in (ax_h, ax_s):
        ax.axvspan(lo, upper, color="tab:green", alpha=0.07)
        ax.axvspan(thr, hi, color="tab:red", alpha=0.07)
        ax.axvline(thr, color="tab:red", lw=1, label=f"model threshold (wrong) {thr:.2f}")
        ax.axvline(upper, color="tab:green", lw=1, label=f"model bound (correct) {upper:.2f}")
        ax.axvline(PAPER_THRESHOLD, color="grey", ls="-.", lw=1, label="paper 3.5")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("max logit (beta)")
    betas = np.linspace(lo, hi, 600)
    f_p = f_branches(betas, c)[0]
    g, psi = g_psi(betas, c, "+")
    ax_s.plot(
        betas, np.where(correct_admissible(betas, c), betas - f_p, np.nan), "g-", lw=2, label="model gap, correct"
    )
    ax_s.plot(
        betas,
        np.where(wrong_admissible(betas, c), betas - np.maximum(g, psi), np.nan),
        "r-",
        lw=2,
        label="model gap, misclassified",
    )
    gaps = np.concatenate([s["gap"] for s in stats.values()])
    ax_s.set_ylim(0, max(np.percentile(gaps, 99.5), 1.0) * 1.2)
    ax_h.set(ylabel="density", title=f"max logit vs admissible beta (C={c})")
    ax_s.set(ylabel="logit gap (top-1 minus top-2)", title="gap vs max logit, model curves")
    ax_h.legend(fontsize=7)
    ax_s.legend(fontsize=7, markerscale=3)
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- the tracked job


def _flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        name = re.sub(r"[^0-9A-Za-z_\-./ ]", "_", f"{prefix}{key}")
        if isinstance(value, dict):
            out |= _flat_numbers(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[name] = float(value)
    return out


def run(
    out_dir: Path,
    class_counts=(10, 100),
    error_rate: float = 0.196,
    omega_correct: float = 1.0,
    omega_wrong: float = 1.0,
    logits_runs: list[str] = (),
    track: bool = True,
    experiment: str = "robustlogits",
) -> dict:
    """The analysis as every other: the figures of `write_theory_figures`, plus these runs' logits
    placed on the model's axes, in one tracked run."""
    out_dir = Path(out_dir)
    if track:
        tracking.check_store(experiment)
    models = [logits_of_run(spec) for spec in logits_runs]  # resolve runs before writing anything
    if models and len({z.shape[1] for z, _, _ in models}) != 1:
        raise UserError("the runs given have different class counts; compare runs of one dataset")
    summary = write_theory_figures(
        out_dir,
        class_counts=tuple(class_counts),
        error_rate=error_rate,
        omega_correct=omega_correct,
        omega_wrong=omega_wrong,
    )
    if models:
        summary["empirical"] = place_empirical(
            [(z, y, name) for z, y, name in models], None, out_dir / "fig_empirical_admissible.png"
        )
        (out_dir / "theory.json").write_text(json.dumps(summary, indent=1, default=str))
    if track:
        with tracking.job_run(experiment, "analyze-theory", {"robustlogits.job": "analyze-theory"}) as run_id:
            tracking.log_params(
                {
                    "class_counts": list(class_counts),
                    "error_rate": error_rate,
                    "omega_correct": omega_correct,
                    "omega_wrong": omega_wrong,
                    "logits_runs": list(logits_runs),
                }
            )
            metrics = {k: v for k, v in _flat_numbers(summary).items() if not k.startswith("files")}
            tracking.log_results(dict(list(metrics.items())[:900]))
            tracking.log_folder(out_dir, "theory")
            summary["run_id"] = run_id
    return summary
