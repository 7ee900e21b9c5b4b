"""Replica mean-field theoretic manifold analysis (MFTMA).

Measures how linearly separable P object manifolds (point clouds of M points in N
features) are, following Chung, Lee & Sompolinsky (PRX 2018) and Cohen et al.
(Nat. Commun. 2020), as used for Figure 5 / Appendix A.4 of the paper.

Per manifold, after removing the global centroid of the manifold centres (and, by
default, the low-rank shared structure of the centres), the points are written as
``x_mu = c + ||c|| s_mu`` with ``s_mu`` in the D-dimensional span of the deviations,
and each point becomes ``S_mu = (s_mu, 1)`` in D+1 dimensions.  For Gaussian
``T = (t, t0)`` the anchor-point problem is the projection

    F(T) = min_V ||V - T||^2   s.t.   V . S_mu >= kappa   for every point mu,

whose dual is the non-negative quadratic program (shared Hessian per manifold)

    min_{lam >= 0}  1/2 lam' G lam + lam' h,   G = S S',  h = S T - kappa,

with ``V = T + S' lam``, ``F = lam' G lam`` and anchor ``s~ = sum lam_mu s_mu / sum lam``.
Then ``1/alpha_M = <F>``, ``R_M^2 = <||s~||^2>`` and ``D_M = <(t . s~/||s~||)^2>``.

Samples where T already satisfies every constraint ("interior", F = 0, anchor = the
point minimising t.s) and samples solved by one active constraint ("touching",
closed form) are handled analytically; the rest ("embedded") go through a batched
Lawson-Hanson active-set NNQP solver written here in numpy, warm-started from the
touching candidate; any sample it does not finish in its iteration cap is handed to
``scipy.optimize.nnls`` (same problem in least-squares form).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy import integrate, optimize, special

from robustlogits.core.errors import UserError

__all__ = [
    "ManifoldResult",
    "AnchorSolution",
    "manifold_analysis",
    "simulated_capacity",
    "alpha_point",
    "alpha_ball",
    "anchor_points",
    "center_correlation",
]

_CHUNK_ELEMS = 8_000_000  # floats per temporary block (deviations, QP batches): ~64 MB


# --------------------------------------------------------------------------- closed forms


def alpha_point(kappa: float | np.ndarray) -> float | np.ndarray:
    """Capacity of random points with margin kappa: 1/alpha = int_{-inf}^{kappa} Dt (kappa - t)^2.

    Closed form (1 + k^2) Phi(k) + k phi(k); alpha_point(0) = 2 (Cover / Gardner).
    """
    k = np.asarray(kappa, dtype=float)
    inv = (1.0 + k**2) * special.ndtr(k) + k * np.exp(-0.5 * k**2) / math.sqrt(2 * math.pi)
    out = 1.0 / inv
    return float(out) if out.ndim == 0 else out


def _gauss_sq_antideriv(b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Antiderivative in x of (b - x)^2 phi(x); limits at -inf are 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        phi = np.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
        val = (1.0 + b**2) * special.ndtr(x) + (2.0 * b - x) * phi
    return np.where(np.isneginf(x), 0.0, val)


def _ball_inv_given_r(r: np.ndarray, R: float, kappa: float) -> np.ndarray:
    """<F> over t0 for an L2 ball of radius R when ||t|| = r (touching + fully embedded regimes)."""
    b = kappa + R * r
    a = kappa - r / R
    touching = (_gauss_sq_antideriv(b, b) - _gauss_sq_antideriv(b, a)) / (1.0 + R**2)
    embedded = r**2 * special.ndtr(a) + _gauss_sq_antideriv(np.full_like(a, kappa), a)
    return touching + embedded


def alpha_ball(
    radius: float | np.ndarray,
    dimension: float | np.ndarray,
    kappa: float = 0.0,
    exact: bool = False,
) -> float | np.ndarray:
    """Capacity of L2 balls of radius R (relative to the centre norm) in D dimensions.

    ``exact=False`` is the A.4.2 / Chung et al. large-D form (1 + R^2) alpha_point(kappa + R sqrt(D))
    used to relate alpha_M to (R_M, D_M).  ``exact=True`` integrates the mean-field
    integrand over ||t|| ~ chi_D including the fully-embedded regime, which is what a
    sampled sphere should reproduce at finite D.
    """
    R, D = np.broadcast_arrays(np.asarray(radius, float), np.asarray(dimension, float))
    if np.any(R < 0) or np.any(D < 0):
        raise UserError("alpha_ball needs radius >= 0 and dimension >= 0")
    if not exact:
        out = (1.0 + R**2) * np.asarray(alpha_point(kappa + R * np.sqrt(D)))
        return float(out) if out.ndim == 0 else out

    def one(r_: float, d_: float) -> float:
        if r_ == 0.0 or d_ == 0.0:
            return float(alpha_point(kappa))
        log_norm = (1 - d_ / 2) * math.log(2) - special.gammaln(d_ / 2)

        def integrand(x: float) -> float:
            pdf = math.exp(log_norm + (d_ - 1) * math.log(x) - x * x / 2) if x > 0 else 0.0
            return pdf * float(_ball_inv_given_r(np.array(x), r_, kappa))

        mode = math.sqrt(max(d_ - 1, 0.0))
        hi = mode + 12.0
        inv, _ = integrate.quad(integrand, 0.0, hi, points=[mode], limit=200, epsabs=1e-12, epsrel=1e-10)
        return 1.0 / inv

    out = np.vectorize(one, otypes=[float])(R, D)
    return float(out) if out.ndim == 0 else out


# --------------------------------------------------------------------------- input handling


def _validate(X: Any, kappa: float = 0.0) -> np.ndarray:
    try:
        X = np.asarray(X)
    except Exception as exc:  # ragged lists etc.
        raise UserError(f"manifold data must be an array of shape (P, N, M): {exc}") from exc
    if X.ndim != 3:
        raise UserError(f"manifold data must have shape (P manifolds, N features, M points); got ndim={X.ndim}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise UserError(f"manifold data must be real numbers; got dtype {X.dtype}")
    P, N, M = X.shape
    if P < 2:
        raise UserError(f"need at least 2 manifolds (P >= 2); got P={P}")
    if N < 1 or M < 1:
        raise UserError(f"need N >= 1 features and M >= 1 points per manifold; got N={N}, M={M}")
    if not np.all(np.isfinite(X)):
        raise UserError("manifold data contains NaN or infinite values")
    if not math.isfinite(float(kappa)):
        raise UserError(f"kappa must be finite; got {kappa}")
    return X


@contextlib.contextmanager
def _blas_threads(n: int | None):
    """Cap BLAS threads: the work is many small products, where extra threads only contend
    (6-10x slower on a busy 2-core machine); None leaves the library default."""
    if n is None:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


def _want_progress(progress: bool | None) -> bool:
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except Exception:
        return False


def _progress_iter(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False)


# --------------------------------------------------------------------------- centre structure


def _mean_abs_cos(gram: np.ndarray) -> float:
    """Mean |cosine| over distinct pairs, from a P x P Gram matrix of centre vectors."""
    d = np.sqrt(np.clip(np.diag(gram), 0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = gram / np.outer(d, d)
    iu = np.triu_indices(gram.shape[0], 1)
    return float(np.mean(np.abs(cos[iu])))


def center_correlation(centers: np.ndarray) -> float:
    """Mean absolute pairwise cosine of manifold centres after removing their common centroid."""
    C = np.asarray(centers, float)
    C = C - C.mean(axis=0, keepdims=True)
    return _mean_abs_cos(C @ C.T)


CENTER_METHODS = ("reference", "principal")
DEFINITIONS = ("reference", "printed")


def _center_subspace(C0: np.ndarray, max_components: int | None) -> tuple[np.ndarray, int, float]:
    """Low-rank shared structure of the centres to project out: principal directions.

    Candidates are the top-K principal directions of the centred centres; K is the one
    (0 allowed) minimising the residual mean |correlation| between centres, so
    unstructured centres keep K = 0 and clustered ones lose their shared axes.
    """
    P = C0.shape[0]
    U, S, Wt = np.linalg.svd(C0, full_matrices=False)
    scale = S[0] if S.size and S[0] > 0 else 1.0
    rank = int(np.sum(S > 1e-10 * scale))
    kmax = (P // 2) if max_components is None else int(max_components)
    kmax = max(0, min(kmax, rank - 2))
    best_k, best_rho = 0, _mean_abs_cos((U * S**2) @ U.T)
    for k in range(1, kmax + 1):
        Uk, Sk = U[:, k:], S[k:]
        gram = (Uk * Sk**2) @ Uk.T
        if np.any(np.diag(gram) <= (1e-12 * scale) ** 2):
            break
        rho = _mean_abs_cos(gram)
        if rho < best_rho - 1e-12:
            best_k, best_rho = k, rho
    return Wt[:best_k].T.copy(), best_k, best_rho


def _residual_corr_cost(A: np.ndarray, X: np.ndarray) -> tuple[float, np.ndarray]:
    """Cohen et al.'s objective and its gradient in A: the squared correlations left between the
    centres (rows of X) after projecting out span(A), half the sum over all ordered pairs with
    the diagonal included. Depends on span(A) only, so A needs no orthonormality constraint.

    With H = (A'A)^-1, W = XA, C = XX' - WHW', d = diag C: cost = 1/2 sum C_mn^2 / (d_m d_n);
    dcost/dC = C/(d d') + diag(-sum_n C_mn^2 / (d_m^2 d_n)) =: B, and
    dcost/dA = -2 X'BWH + 2 AH(W'BW)H.
    """
    H = np.linalg.inv(A.T @ A)
    W = X @ A
    C = X @ X.T - W @ H @ W.T
    # A centre lying (numerically) inside span(A) has no residual left: floor its variance so the
    # cost stays finite there instead of turning the line search to NaN.
    d = np.maximum(np.diag(C).copy(), 1e-12 * max(float(np.max(np.diag(X @ X.T))), 1e-300))
    R = C / np.outer(d, d)
    cost = 0.5 * float(np.sum(C * R))
    B = R - np.diag(np.sum(C * R, axis=1) / d)
    BWH = B @ W @ H
    grad = -2 * X.T @ BWH + 2 * A @ H @ (W.T @ BWH)
    return cost, grad


def _optimise_subspace(X: np.ndarray, V0: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """Minimise the residual-correlation cost over K-dimensional subspaces from V0 (L-BFGS on an
    unconstrained basis); returns an orthonormal basis."""
    shape = V0.shape

    def fun(flat):
        cost, grad = _residual_corr_cost(flat.reshape(shape), X)
        return cost, grad.ravel()

    res = optimize.minimize(
        fun, V0.ravel(), jac=True, method="L-BFGS-B", options={"maxiter": max_iter, "gtol": 1e-8, "ftol": 1e-12}
    )
    Q, _ = np.linalg.qr(res.x.reshape(shape))
    return Q


def _center_subspace_reference(C0: np.ndarray, n_reps: int, seed: int) -> tuple[np.ndarray, int, float]:
    """The low-rank centre structure as the MFTMA reference code (Cohen et al. 2020) finds it.

    In the (P-1)-dimensional span of the centred centres, for K = 1, 2, ...: from `n_reps`
    random starts (the previous K's subspace plus one random centre combination), minimise the
    residual-correlation cost over K-dimensional subspaces and keep the most "stable" solution
    (the one leaving every centre the largest fraction of its norm); stop after three
    consecutive increases of the residual mean |correlation|, up to K = (components for 95% of
    the variance) + 10. K is the argmin of that residual, so at least one direction always goes.
    """
    P = C0.shape[0]
    S = np.linalg.svd(C0, compute_uv=False)
    if P < 3 or S[0] <= 0 or np.sum(S > 1e-10 * S[0]) < 2:  # nothing to remove while keeping distinct centres
        return np.zeros((C0.shape[1], 0)), 0, _mean_abs_cos(C0 @ C0.T)
    rng = np.random.default_rng([int(seed), 4049])
    Q, _ = np.linalg.qr(C0.T)  # (N, min(N, P)): an orthonormal basis of the centres' span
    basis = Q[:, : min(P - 1, Q.shape[1])]
    X = C0 @ basis  # (P, P-1)
    total = np.cumsum(S**2 / np.sum(S**2))
    max_k = int(np.argmax([v if v < 0.95 else 0 for v in total])) + 11
    max_k = max(1, min(max_k, basis.shape[1] - 1))
    row_norm = np.linalg.norm(X, axis=1)
    V1 = np.zeros((basis.shape[1], 0))
    solutions, residuals = [], []
    for k in range(1, max_k + 1):
        best, best_stability = None, -np.inf
        for _ in range(max(1, n_reps)):
            s = rng.standard_normal((P, 1))
            V0, _ = np.linalg.qr(np.concatenate([(s.T @ X).T, V1], axis=1))
            V = _optimise_subspace(X, V0)
            X0 = X - (X @ V) @ V.T
            stability = float(np.min(np.linalg.norm(X0, axis=1) / row_norm))
            if stability > best_stability:
                best, best_stability = V, stability
        V1 = best
        X0 = X - (X @ V1) @ V1.T
        solutions.append(V1)
        residuals.append(_mean_abs_cos(X0 @ X0.T))
        if k > 4 and residuals[-1] > residuals[-2] > residuals[-3] > residuals[-4]:
            break
    best_k = int(np.argmin(residuals)) + 1
    return basis @ solutions[best_k - 1], best_k, float(residuals[best_k - 1])


# --------------------------------------------------------------------------- embedding


@dataclass
class _Embedded:
    coords: np.ndarray  # (P, M, Dmax) deviations / ||centre|| in an orthonormal basis
    dims: np.ndarray  # (P,) rank of each manifold's deviations
    center_norms: np.ndarray  # (P,)
    center_corr: float
    residual_center_corr: float
    n_components: int


def _embed(
    X: np.ndarray,
    center_null_space: bool,
    max_center_components: int | None = None,
    center_method: str = "principal",
    center_reps: int = 10,
    seed: int = 0,
) -> _Embedded:
    """Centre-normalised coordinates of every manifold's points (Gram + eigh, batched)."""
    P, N, M = X.shape
    centers = X.mean(axis=2, dtype=np.float64)  # (P, N)
    C0 = centers - centers.mean(axis=0, keepdims=True)
    rho0 = _mean_abs_cos(C0 @ C0.T)
    V = np.zeros((N, 0))
    k, rho_res = 0, rho0
    if center_null_space and center_method == "reference":
        V, k, rho_res = _center_subspace_reference(C0, center_reps, seed)
    elif center_null_space:
        V, k, rho_res = _center_subspace(C0, max_center_components)
    Cp = C0 - (C0 @ V) @ V.T
    cn = np.linalg.norm(Cp, axis=1)
    scale = max(float(np.max(np.abs(X))), 1e-300)
    if np.any(cn <= 1e-10 * scale * math.sqrt(N)):
        bad = np.flatnonzero(cn <= 1e-10 * scale * math.sqrt(N)).tolist()
        raise UserError(
            f"manifold(s) {bad[:10]} have a centre at the common origin (after removing the shared "
            "centre structure); the analysis needs distinct manifold centres"
        )
    step = max(1, _CHUNK_ELEMS // max(1, N * M))

    def deviations(a: int, b: int) -> np.ndarray:
        dev = X[a:b].astype(np.float64) - centers[a:b, :, None]
        if k:
            dev -= np.einsum("nk,pkm->pnm", V, np.einsum("nk,pnm->pkm", V, dev))
        return dev / cn[a:b, None, None]

    gram = np.empty((P, M, M))
    for a in range(0, P, step):
        dev = deviations(a, min(P, a + step))
        gram[a : a + step] = np.matmul(dev.transpose(0, 2, 1), dev)
    evals, evecs = np.linalg.eigh(gram)  # ascending
    evals, evecs = evals[:, ::-1], evecs[:, :, ::-1]
    keep = evals > np.maximum(1e-10 * evals[:, :1], 1e-28)
    dims = keep.sum(axis=1)
    dmax = int(dims.max()) if dims.size else 0
    evecs = evecs[:, :, :dmax]
    # Orient each principal axis by its feature-space direction (largest |entry| positive), so
    # the coordinates, hence the Gaussian samples they meet, do not depend on point order or
    # on repeated points.
    for a in range(0, P, step):
        axes = np.matmul(deviations(a, min(P, a + step)), evecs[a : a + step])  # (p, N, dmax)
        pick = np.abs(axes).argmax(axis=1)[:, None, :]
        sign = np.where(np.take_along_axis(axes, pick, axis=1)[:, 0, :] < 0, -1.0, 1.0)
        evecs[a : a + step] *= sign[:, None, :]
    coords = evecs * np.sqrt(np.where(keep[:, :dmax], evals[:, :dmax], 0.0))[:, None, :]
    return _Embedded(coords, dims, cn, rho0, rho_res, k)


def _gaussian_samples(n_t: int, dim: int, seed: int, stratify: bool = True) -> np.ndarray:
    """Samples of T = (t, t0), t in R^dim; depends only on (seed, dim) so identical manifolds get identical T.

    ``stratify`` Latin-hypercube stratifies t0 and ||t|| (chi_dim quantiles) with uniform
    directions: still unbiased, much lower variance at the n_t ~ 200 used in practice.
    """
    rng = np.random.default_rng([int(seed), int(dim), 7919])
    if stratify:
        t0 = special.ndtri((rng.permutation(n_t) + rng.random(n_t)) / n_t)
        if dim:
            u = (rng.permutation(n_t) + rng.random(n_t)) / n_t
            r = np.sqrt(2.0 * special.gammaincinv(dim / 2.0, u))
            g = rng.standard_normal((n_t, dim))
            t = g * (r / np.linalg.norm(g, axis=1))[:, None]
        else:
            t = np.zeros((n_t, 0))
    else:
        t = rng.standard_normal((n_t, dim))
        t0 = rng.standard_normal(n_t)
    return np.concatenate([t, t0[:, None]], axis=1)


# --------------------------------------------------------------------------- anchor QP


@dataclass
class AnchorSolution:
    """Per-sample solution of the anchor QP for a batch of manifolds (shapes (P, n_t, ...))."""

    F: np.ndarray  # (P, n_t)  ||V - T||^2
    anchors: np.ndarray  # (P, n_t, D)  s~(T)
    lam: np.ndarray  # (P, n_t, M)  dual weights
    regime: np.ndarray  # (P, n_t) 0 interior, 1 touching, 2 embedded
    max_kkt_violation: float
    n_fallback: int


def _nnls_batched(
    S: np.ndarray,
    pid: np.ndarray,
    G: Callable[[np.ndarray, np.ndarray], np.ndarray],
    h: np.ndarray,
    Tp: np.ndarray,
    lam: np.ndarray,
    passive: np.ndarray,
    tol: np.ndarray,
    max_iter: int,
) -> np.ndarray:
    """Batched Lawson-Hanson for min_{lam>=0} ||S_b' lam + T'_b||^2 over samples b.

    S: (P, M, D+1) augmented points of every manifold, pid: (b,) each sample's manifold,
    G(idx, order) -> (len(idx), K, K) Gram blocks of those samples' points, h = S T'.
    One iteration = one batched solve of the normal equations on each live sample's
    passive set, gathered compactly (size = the largest passive set, <= D + 1), so cost
    tracks the number of support points rather than M.  A sample either accepts that
    solution and adds its most violated constraint, or steps back to feasibility and
    drops the index that hit zero.  ``lam``/``passive`` are updated in place from a valid
    LH state; returns the mask of samples that met the KKT conditions (constraint values
    >= -tol off the passive set).
    """
    B, M = lam.shape
    done = np.zeros(B, bool)
    just_added = np.full(B, -1)
    live = np.arange(B)
    for _ in range(max_iter):
        if live.size == 0:
            break
        b = live.size
        rows = np.arange(b)
        Pl, lam_l = passive[live], lam[live]
        cnt = Pl.sum(axis=1)
        K = max(1, int(cnt.max()))
        order = np.argpartition(~Pl, K - 1, axis=1)[:, :K] if K < M else np.argsort(~Pl, axis=1)
        valid = np.take_along_axis(Pl, order, axis=1)  # passive indices first, padded with others
        A = G(live, order)
        A = np.where(valid[:, :, None] & valid[:, None, :], A, 0.0)
        ridge = 1e-13 * np.max(np.abs(A), axis=(1, 2))
        A[:, np.arange(K), np.arange(K)] += np.where(valid, ridge[:, None], 1.0)
        rhs = np.where(valid, -np.take_along_axis(h[live], order, axis=1), 0.0)
        zc = np.linalg.solve(A, rhs[..., None])[..., 0]
        z = np.zeros((b, M))
        z[rows[:, None], order] = np.where(valid, zc, 0.0)
        bad = Pl & (z <= 0)
        feas = ~bad.any(axis=1)
        if feas.any():
            f = np.flatnonzero(feas)
            zf = z[f]
            cons = np.empty((f.size, M))
            gid = pid[live[f]]
            for g in np.unique(gid):  # per manifold: two small GEMMs instead of a (b, M, D+1) gather
                sel = np.flatnonzero(gid == g)
                V = Tp[live[f[sel]]] + zf[sel] @ S[g]
                cons[sel] = V @ S[g].T  # S_mu . V
            cons = np.where(Pl[f], np.inf, cons)
            j = cons.argmin(axis=1)
            cmin = cons[np.arange(f.size), j]
            lam[live[f]] = zf
            conv = cmin >= -tol[live[f]]
            done[live[f[conv]]] = True
            grow = f[~conv]
            passive[live[grow], j[~conv]] = True
            just_added[live[grow]] = j[~conv]
        if not feas.all():
            q = np.flatnonzero(~feas)
            lq, zq, bq = lam_l[q], z[q], bad[q]
            ratio = np.where(bq, lq / np.where(bq, lq - zq, 1.0), np.inf)
            k = ratio.argmin(axis=1)
            step = ratio[np.arange(q.size), k]
            # a just-added index that cannot enter at all: the previous solution is optimal to precision
            stalled = (k == just_added[live[q]]) & (step <= 0)
            done[live[q[stalled]]] = True
            passive[live[q[stalled]], k[stalled]] = False
            mv = ~stalled
            qm = q[mv]
            new = lq[mv] + step[mv, None] * (zq[mv] - lq[mv])
            new[np.arange(qm.size), k[mv]] = 0.0
            pm = Pl[qm] & (new > 0)
            passive[live[qm]] = pm
            lam[live[qm]] = np.where(pm, new, 0.0)
            just_added[live[qm]] = -1
        live = live[~done[live]]
    return done


def _solve_anchor(
    coords: np.ndarray, T: np.ndarray, kappa: float, max_iter: int | None = None, progress: bool = False
) -> AnchorSolution:
    P, M, D = coords.shape
    n_t = T.shape[1]
    Tp = T.copy()
    Tp[..., D] -= kappa  # shifting t0 turns margin kappa into a projection onto a cone
    S = np.concatenate([coords, np.ones((P, M, 1))], axis=2)  # (P, M, D+1) augmented points
    h = np.matmul(Tp, S.transpose(0, 2, 1))  # (P, n_t, M) = S_mu . T'
    snorm2 = np.sum(S**2, axis=2)  # (P, M)
    tol = 1e-9 * (1.0 + np.max(np.abs(h), axis=2))

    lam = np.zeros((P, n_t, M))
    regime = np.zeros((P, n_t), np.int8)
    interior = h.min(axis=2) >= 0
    # touching candidate: the most violated half-space in Euclidean distance; if projecting
    # onto it alone is feasible, it is the projection onto the polyhedron
    mu = (-h / np.sqrt(snorm2)[:, None, :]).argmax(axis=2)
    pp, kk = np.meshgrid(np.arange(P), np.arange(n_t), indexing="ij")
    lam_mu = np.maximum(-h[pp, kk, mu] / snorm2[pp, mu], 0.0)
    V1 = Tp + lam_mu[..., None] * S[pp, mu]
    cons = np.matmul(V1, S.transpose(0, 2, 1))
    touching = ~interior & (cons.min(axis=2) >= -tol)
    sel = ~interior
    lam[pp[sel], kk[sel], mu[sel]] = lam_mu[sel]
    regime[touching] = 1
    emb = ~interior & ~touching
    regime[emb] = 2
    del cons, V1

    n_fallback = 0
    max_iter = max_iter or (4 * M + 50)
    ep, ek = np.nonzero(emb)
    if ep.size:
        Gall = np.matmul(S, S.transpose(0, 2, 1))  # (P, M, M)
        chunk = max(256, _CHUNK_ELEMS // (M * max(8, D + 1)))  # (b, K, K) blocks, K <= D + 1
        starts = range(0, ep.size, chunk)
        for a in _progress_iter(starts, len(starts), "anchor QP", progress):
            cp, ck = ep[a : a + chunk], ek[a : a + chunk]
            lam_c = lam[cp, ck]

            def gram_blocks(idx, order, cp=cp):
                return Gall[cp[idx][:, None, None], order[:, :, None], order[:, None, :]]

            done = _nnls_batched(S, cp, gram_blocks, h[cp, ck], Tp[cp, ck], lam_c, lam_c > 0, tol[cp, ck], max_iter)
            for i in np.flatnonzero(~done):  # rare stragglers: solved exactly by scipy
                n_fallback += 1
                try:
                    lam_c[i], _ = optimize.nnls(-S[cp[i]].T, Tp[cp[i], ck[i]], maxiter=50 * M)
                except RuntimeError:  # keep the LH iterate; the KKT diagnostic reports it
                    pass
            lam[cp, ck] = lam_c

    W = np.matmul(lam, S)  # (P, n_t, D+1) = S' lam = V - T'
    F = np.sum(W**2, axis=2)
    F[interior] = 0.0
    lsum = W[..., D]
    with np.errstate(invalid="ignore", divide="ignore"):
        anchors = W[..., :D] / lsum[..., None]
    # interior: the anchor is the manifold point touching the support function, argmin_mu t . s_mu
    arg = h.argmin(axis=2)
    fix = interior | (lsum <= 0)
    anchors[fix] = coords[pp[fix], arg[fix]]

    cons = np.matmul(Tp + W, S.transpose(0, 2, 1))  # constraint values S_mu . V at the solution
    scale = 1.0 + np.max(np.abs(h), axis=2)
    primal = np.max(np.maximum(-cons, 0.0), axis=2) / scale
    comp = np.max(np.abs(lam * cons), axis=2) / scale**2
    kkt = float(max(primal.max(initial=0.0), comp.max(initial=0.0)))
    return AnchorSolution(F, anchors, lam, regime, kkt, n_fallback)


def anchor_points(points: np.ndarray, T: np.ndarray, kappa: float = 0.0) -> AnchorSolution:
    """Solve the anchor QP directly for given manifold coordinates.

    points: (P, M, D) centre-normalised deviations (the centre direction is implicit),
    T: (P, n_t, D+1) with the last column t0.  Exposed so the solver can be checked
    against generic QP solvers and reused by callers with their own embeddings.
    """
    points = np.asarray(points, float)
    T = np.asarray(T, float)
    if points.ndim != 3 or T.ndim != 3 or T.shape[0] != points.shape[0] or T.shape[2] != points.shape[2] + 1:
        raise UserError("anchor_points needs points (P, M, D) and T (P, n_t, D+1)")
    return _solve_anchor(points, T, float(kappa))


# --------------------------------------------------------------------------- analysis


@dataclass
class ManifoldResult:
    """MFTMA measures per manifold and their summaries (Cohen et al. 2020 conventions)."""

    capacity: np.ndarray  # alpha_M per manifold
    radius: np.ndarray  # R_M per manifold (relative to the centre norm)
    dimension: np.ndarray  # D_M per manifold
    mean_capacity: float  # 1 / mean(1 / alpha_M)
    mean_radius: float
    mean_dimension: float
    center_correlation: float  # mean |cos| between centres (before null-space projection)
    residual_center_correlation: float = float("nan")
    n_center_components: int = 0
    embedding_dimension: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    definitions: str = "reference"
    center_method: str = "reference"
    kappa: float = 0.0
    n_t: int = 0
    regime_fractions: dict[str, float] = field(default_factory=dict)
    max_kkt_violation: float = 0.0
    n_fallback: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: scalars as float/int, per-manifold arrays as lists."""
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            if isinstance(v, np.ndarray):
                out[k] = v.tolist()
            elif isinstance(v, (np.floating, np.integer)):
                out[k] = v.item()
            elif isinstance(v, dict):
                out[k] = {a: float(b) for a, b in v.items()}
            else:
                out[k] = v
        return out


def manifold_analysis(
    X: np.ndarray,
    kappa: float = 0.0,
    n_t: int = 200,
    seed: int = 0,
    center_null_space: bool = True,
    *,
    definitions: str = "reference",
    center_method: str = "reference",
    center_reps: int = 10,
    max_center_components: int | None = None,
    stratify: bool = True,
    progress: bool | None = None,
    blas_threads: int | None = 1,
) -> ManifoldResult:
    """Manifold capacity, radius, dimension and centre correlation of P manifolds.

    X: (P manifolds, N features, M points).  ``center_null_space`` projects out the
    shared low-rank structure of the centres first (Cohen et al. 2020): ``center_method``
    "reference" as the MFTMA reference code does (subspace optimisation, K >= 1, ``center_reps``
    random starts per K), "principal" with principal directions (K >= 0). The reported
    ``center_correlation`` is measured before that projection.  ``definitions``: "reference"
    (the reference code, Chung et al. 2018 eq. 28-29: R_M^2 = <|s~ - <s~>|^2>,
    D_M = D <t^.s^>^2) or "printed" (the paper's A.4: R_M^2 = <|s~|^2>, D_M = <(t.s^)^2>).
    ``n_t`` Gaussian samples per manifold; results are deterministic given ``seed``.
    """
    if definitions not in DEFINITIONS:
        raise UserError(f"unknown definitions {definitions!r}; choose {' or '.join(DEFINITIONS)}")
    if center_method not in CENTER_METHODS:
        raise UserError(f"unknown center_method {center_method!r}; choose {' or '.join(CENTER_METHODS)}")
    with _blas_threads(blas_threads):
        return _manifold_analysis(
            X,
            kappa,
            n_t,
            seed,
            center_null_space,
            max_center_components,
            stratify,
            progress,
            definitions,
            center_method,
            center_reps,
        )


def _manifold_analysis(
    X,
    kappa,
    n_t,
    seed,
    center_null_space,
    max_center_components,
    stratify,
    progress,
    definitions="reference",
    center_method="reference",
    center_reps=10,
):
    t_start = time.perf_counter()
    X = _validate(X, kappa)
    if int(n_t) < 1:
        raise UserError(f"n_t must be >= 1; got {n_t}")
    if int(seed) < 0:
        raise UserError(f"seed must be a non-negative integer; got {seed}")
    n_t = int(n_t)
    P, N, M = X.shape
    emb = _embed(X, center_null_space, max_center_components, center_method, center_reps, int(seed))
    D = emb.coords.shape[2]
    T = np.zeros((P, n_t, D + 1))
    for d in np.unique(emb.dims):  # one sample set per distinct dimension, padded with zeros
        rows = np.flatnonzero(emb.dims == d)
        s = _gaussian_samples(n_t, int(d), int(seed), stratify)
        T[rows, :, :d] = s[:, :d]
        T[rows, :, D] = s[:, d]
    sol = _solve_anchor(emb.coords, T, float(kappa), progress=_want_progress(progress))

    mean_F = sol.F.mean(axis=1)
    with np.errstate(divide="ignore"):
        capacity = np.where(mean_F > 0, 1.0 / np.where(mean_F > 0, mean_F, 1.0), np.inf)
    sq = np.sum(sol.anchors**2, axis=2)
    ts = np.einsum("pkd,pkd->pk", T[..., :D], sol.anchors)
    if definitions == "reference":
        spread = sol.anchors - sol.anchors.mean(axis=1, keepdims=True)
        radius = np.sqrt(np.sum(spread**2, axis=2).mean(axis=1))
        # The reference writes each manifold in min(N, M) coordinates (its QR keeps the null
        # direction of the centred points), so its t has min(N, M) - rank extra Gaussian
        # components that meet no point: they enter only through |t|.
        extra = np.minimum(N, M) - emb.dims
        rng = np.random.default_rng([int(seed), 6007])
        null_sq = np.stack([rng.chisquare(e, n_t) if e > 0 else np.zeros(n_t) for e in extra])
        t_norm = np.sqrt(np.sum(T[..., :D] ** 2, axis=2) + null_sq)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(t_norm > 0, ts / (np.where(t_norm > 0, t_norm, 1.0) * np.sqrt(sq + 1e-12)), 0.0)
        dimension = np.maximum(emb.dims, np.minimum(N, M)) * cos.mean(axis=1) ** 2
    else:
        radius = np.sqrt(sq.mean(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            proj2 = np.where(sq > 0, ts**2 / np.where(sq > 0, sq, 1.0), 0.0)
        dimension = proj2.mean(axis=1)
    names = ("interior", "touching", "embedded")
    fr = {name: float(np.mean(sol.regime == i)) for i, name in enumerate(names)}
    return ManifoldResult(
        capacity=capacity,
        radius=radius,
        dimension=dimension,
        mean_capacity=float(1.0 / np.mean(1.0 / capacity)),
        mean_radius=float(radius.mean()),
        mean_dimension=float(dimension.mean()),
        center_correlation=emb.center_corr,
        residual_center_correlation=emb.residual_center_corr,
        n_center_components=emb.n_components,
        embedding_dimension=emb.dims.astype(int),
        definitions=definitions,
        center_method=center_method if center_null_space else "none",
        kappa=float(kappa),
        n_t=n_t,
        regime_fractions=fr,
        max_kkt_violation=sol.max_kkt_violation,
        n_fallback=sol.n_fallback,
        seconds=time.perf_counter() - t_start,
    )


# --------------------------------------------------------------------------- simulation


def _separable(Y: np.ndarray) -> bool:
    """Is there w with w . y_k >= 1 for every (label-signed) column y_k?

    Solved as least-distance programming through NNLS (Lawson & Hanson, ch. 23):
    with E = [Y; 1'] and f = e_{n+1}, the constraints are infeasible exactly when f is
    in the cone of E's columns, i.e. the NNLS residual is zero.  ~7x faster than an LP
    here; residuals in the ambiguous band are settled by HiGHS linprog.
    """
    n, K = Y.shape
    E = np.vstack([Y, np.ones((1, K))])
    f = np.zeros(n + 1)
    f[n] = 1.0
    try:
        _, rnorm = optimize.nnls(E, f, maxiter=20 * K)
    except RuntimeError:  # iteration cap: let the LP decide
        rnorm = 1e-9
    if rnorm > 1e-7:
        return True
    if rnorm < 1e-11:
        return False
    res = optimize.linprog(np.zeros(n), A_ub=-Y.T, b_ub=-np.ones(K), bounds=[(None, None)] * n, method="highs")
    return res.status == 0


def simulated_capacity(
    X: np.ndarray,
    n_dichotomies: int = 100,
    seed: int = 0,
    tol: float = 0.01,
    *,
    progress: bool | None = None,
    callback: Callable[[int, float], None] | None = None,
    blas_threads: int | None = 1,
) -> float:
    """Empirical manifold capacity P / N_c (A.4.3, Figure A.8).

    N_c is the smallest number of random Gaussian projections of the (globally centred)
    data at which at least half of ``n_dichotomies`` random manifold dichotomies are
    separable by a hyperplane through the origin (kappa = 0).  Each dichotomy keeps one
    projection matrix whose first n rows give the n-feature problem, so separability is
    monotone in n and the search (doubling from P/2, then bisection) is exact for the
    drawn sample.  It stops when the bracket is within ``tol`` (relative) or one feature.  Returns 0.0 when even the full
    data rank does not reach 50% (e.g. duplicated manifolds with conflicting labels).
    ``callback(n, fraction)`` is called after each probed n (fraction over the trials
    evaluated before the majority was decided).
    """
    with _blas_threads(blas_threads):
        return _simulated_capacity(X, n_dichotomies, seed, tol, progress, callback)


def _simulated_capacity(X, n_dichotomies, seed, tol, progress, callback):
    X = _validate(X)
    if int(n_dichotomies) < 1:
        raise UserError(f"n_dichotomies must be >= 1; got {n_dichotomies}")
    if not (0 <= tol < 1):
        raise UserError(f"tol must be in [0, 1); got {tol}")
    if int(seed) < 0:
        raise UserError(f"seed must be a non-negative integer; got {seed}")
    P, N, M = X.shape
    centers = X.mean(axis=2, dtype=np.float64)
    data = (X.astype(np.float64) - centers.mean(axis=0)[None, :, None]).transpose(1, 0, 2).reshape(N, P * M)
    # Gaussian projections only see the data's rank-r coordinates (G U is Gaussian again)
    if N > P * M:
        _, S, Wt = np.linalg.svd(data, full_matrices=False)
        if S[0] == 0:
            raise UserError("all manifold points coincide; capacity is undefined")
        r = int(np.sum(S > 1e-10 * S[0]))
        Z = (S[:r, None] / S[0]) * Wt[:r]  # (r, P*M)
    else:
        r, Z = N, data / max(float(np.abs(data).max()), 1e-300)
    rng = np.random.default_rng(int(seed))
    n_trials = int(n_dichotomies)
    signs = np.repeat(rng.choice(np.array([-1.0, 1.0]), size=(n_trials, P)), M, axis=1)
    proj_seeds = rng.integers(0, 2**63 - 1, size=n_trials)
    need = (n_trials + 1) // 2
    sep_at = np.full(n_trials, np.inf)  # smallest n known separable
    nonsep_at = np.zeros(n_trials)  # largest n known non-separable (0: trivially)

    def separable(i: int, n: int) -> bool:
        if n >= sep_at[i]:
            return True
        if n <= nonsep_at[i]:
            return False
        # the first n rows of one fixed Gaussian matrix per dichotomy (numpy fills row-major)
        g = np.random.default_rng(int(proj_seeds[i])).standard_normal((n, r))
        ok = _separable((g @ Z) * signs[i])
        if ok:
            sep_at[i] = n
        else:
            nonsep_at[i] = n
        return ok

    def majority(n: int) -> bool:
        yes = no = 0
        for i in range(n_trials):
            if separable(i, n):
                yes += 1
            else:
                no += 1
            if yes >= need or no > n_trials - need:
                break
        if callback is not None:
            callback(n, yes / (yes + no))
        return yes >= need

    # gallop up from P/2 (capacity <= 2 at kappa = 0 for large P), then bisect: probes at
    # small n are cheap, the full rank r is only reached when the manifolds are hard
    lo, n = 0, min(r, max(1, P // 2))
    while not majority(n):
        lo = n
        if n == r:
            return 0.0
        n = min(r, 2 * n)
    hi = n
    steps = max(1, int(math.ceil(math.log2(max(2, hi - lo)))))
    bar = _progress_iter(iter(int, 1), steps, "simulated capacity", _want_progress(progress))
    for _ in bar:  # infinite iterator; the bracket test ends it
        if hi - lo <= max(1, tol * hi):
            break
        mid = (lo + hi) // 2
        if majority(mid):
            hi = mid
        else:
            lo = mid
    return P / hi
