"""Benchmark of the MFTMA core (robustlogits.core.mftma) on random manifolds.

    PYTHONPATH=src python benchmarks/bench_manifold.py            # timings
    PYTHONPATH=src python benchmarks/bench_manifold.py --validate # + theory/simulation table

Times ``manifold_analysis`` at P=50, M=50, N=500 and larger sizes, and compares with two
per-sample references measured in the same run on the same embedded problems:
SLSQP on the primal anchor QP (a straightforward generic-solver implementation, timed on
a subset and extrapolated per sample) and scipy's compiled Lawson-Hanson ``nnls`` in a
Python loop over every sample.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import scipy
from scipy import optimize

from robustlogits.core import mftma as mf


def random_manifolds(P, N, M, radius, seed=0):
    """Gaussian centres (norm ~1) and Gaussian clouds with a decaying spectrum of the given radius."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((P, N, 1)) / math.sqrt(N)
    spectrum = 1.0 / np.sqrt(1.0 + np.arange(M))
    spectrum *= radius / np.linalg.norm(spectrum)
    axes = rng.standard_normal((P, N, M)) / math.sqrt(N)
    coef = rng.standard_normal((P, M, M)) * spectrum[None, :, None]
    return centres + axes @ coef


def machine_info() -> str:
    try:
        import torch

        tv = torch.__version__
    except Exception:  # torch is optional here
        tv = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"machine: {cpu}; cpu_count={os.cpu_count()} usable={usable}; load avg (1/5/15 min) {load}\n"
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, torch {tv}; "
        f"BLAS threads capped at 1 inside the analysis (blas_threads=1)"
    )


def time_it(fn, repeats):
    times = []
    out = None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times), statistics.median(times)


def embedded_problem(X, n_t, seed=0):
    """The exact per-manifold problems manifold_analysis solves (no null-space projection)."""
    emb = mf._embed(X, center_null_space=False)
    D = emb.coords.shape[2]
    T = np.zeros((X.shape[0], n_t, D + 1))
    for d in np.unique(emb.dims):
        rows = np.flatnonzero(emb.dims == d)
        s = mf._gaussian_samples(n_t, int(d), seed)
        T[rows, :, :d] = s[:, :d]
        T[rows, :, D] = s[:, d]
    return emb.coords, T


def slsqp_F(S, Tp):
    res = optimize.minimize(
        lambda v: np.sum((v - Tp) ** 2),
        Tp.copy(),
        jac=lambda v: 2 * (v - Tp),
        constraints=[{"type": "ineq", "fun": lambda v: S @ v, "jac": lambda v: S}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    return float(np.sum((res.x - Tp) ** 2))


def reference_comparison(X, n_t, n_subset, ours_seconds):
    coords, T = embedded_problem(X, n_t)
    P, M, D = coords.shape
    sol = mf._solve_anchor(coords, T, 0.0)
    S_all = np.concatenate([coords, np.ones((P, M, 1))], axis=2)
    rng = np.random.default_rng(0)
    pairs = [(int(p), int(k)) for p, k in zip(rng.integers(0, P, n_subset), rng.integers(0, n_t, n_subset))]
    t = time.perf_counter()
    errs = []
    for p, k in pairs:
        errs.append(abs(slsqp_F(S_all[p], T[p, k]) - sol.F[p, k]) / (1 + sol.F[p, k]))
    per_slsqp = (time.perf_counter() - t) / n_subset
    t = time.perf_counter()
    for p in range(P):
        for k in range(n_t):
            optimize.nnls(-S_all[p].T, T[p, k], maxiter=50 * M)
    nnls_loop = time.perf_counter() - t
    total = P * n_t
    slsqp_total = per_slsqp * total
    print(
        f"  reference SLSQP (primal QP, per sample): {per_slsqp * 1e3:.2f} ms/sample on {n_subset} samples "
        f"-> {slsqp_total:.1f} s extrapolated to {total} samples; ratio {slsqp_total / ours_seconds:.0f}x; "
        f"max rel |F_slsqp - F_ours| = {max(errs):.1e}"
    )
    print(
        f"  reference scipy.optimize.nnls loop (compiled Lawson-Hanson, all {total} samples, QP only): "
        f"{nnls_loop:.2f} s; ratio {nnls_loop / ours_seconds:.1f}x (ours includes embedding)"
    )
    fr = np.bincount(sol.regime.ravel(), minlength=3) / sol.regime.size
    print(f"  regimes interior/touching/embedded: {fr[0]:.2f}/{fr[1]:.2f}/{fr[2]:.2f}; KKT {sol.max_kkt_violation:.1e}")


def bench(P, M, N, radius, n_t, repeats, n_subset):
    X = random_manifolds(P, N, M, radius)
    res, best, med = time_it(lambda: mf.manifold_analysis(X, n_t=n_t), repeats)
    print(
        f"P={P} M={M} N={N} radius={radius} n_t={n_t}: manifold_analysis best {best:.3f} s, median {med:.3f} s "
        f"({repeats} runs); capacity {res.mean_capacity:.4f}, R_M {res.mean_radius:.3f}, D_M {res.mean_dimension:.2f}, "
        f"K={res.n_center_components}, fallbacks {res.n_fallback}"
    )
    if n_subset:
        reference_comparison(X, n_t, n_subset, best)
    return best


def validate():
    print("\nvalidation (mean field vs closed forms and simulation)")
    X = np.random.default_rng(0).standard_normal((10, 40, 1))
    print(f"  points, M=1, kappa=0, n_t=2000: alpha = {mf.manifold_analysis(X, n_t=2000).mean_capacity:.4f} (theory 2)")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_manifold import spheres  # noqa: E402  (the test helper builds ideal spheres)

    for R, D, M in [(0.5, 2, 90), (1.0, 2, 90), (0.5, 3, 300), (1.0, 3, 300), (1.5, 3, 300)]:
        r = mf.manifold_analysis(spheres(R, D, M), n_t=2000, center_null_space=False)
        ex = mf.alpha_ball(R, D, exact=True)
        print(
            f"  sphere R={R} D={D} (M={M} pts): alpha_M {r.capacity.mean():.4f} vs alpha_Ball exact {ex:.4f} "
            f"({100 * (r.capacity.mean() / ex - 1):+.1f}%), large-D form {mf.alpha_ball(R, D):.4f}; "
            f"R_M {r.radius.mean():.3f}, D_M {r.dimension.mean():.2f}"
        )
    for P, M, N, R in [(40, 10, 300, 0.3), (40, 10, 300, 0.6), (40, 20, 400, 1.0), (40, 20, 400, 2.0)]:
        X = random_manifolds(P, N, M, R, seed=1)
        mft = mf.manifold_analysis(X, n_t=500)
        t = time.perf_counter()
        sim = mf.simulated_capacity(X, n_dichotomies=101, seed=0)
        ts = time.perf_counter() - t
        ball = float(1 / np.mean(1 / mf.alpha_ball(mft.radius, mft.dimension)))
        print(
            f"  random P={P} M={M} N={N} R={R}: MFT {mft.mean_capacity:.4f}, simulated {sim:.4f} "
            f"(MFT/sim {mft.mean_capacity / sim:.3f}; sim took {ts:.1f} s), alpha_Ball(R_M,D_M) {ball:.4f}"
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--subset", type=int, default=100, help="samples solved by the SLSQP reference")
    ap.add_argument("--validate", action="store_true", help="also print the validation table")
    args = ap.parse_args(argv)
    print(machine_info())
    bench(50, 50, 500, 1.0, 200, args.repeats, args.subset)
    bench(50, 50, 500, 3.0, 200, args.repeats, 0)
    bench(100, 100, 2000, 1.0, 200, args.repeats, args.subset)
    bench(50, 50, 16384, 1.0, 200, max(1, args.repeats - 1), 0)
    if args.validate:
        validate()


if __name__ == "__main__":
    main()
