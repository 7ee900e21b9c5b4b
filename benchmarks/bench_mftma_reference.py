"""Our MFTMA (`robustlogits.core.mftma`) beside the reference implementation on the same inputs.

The reference is github schung039/neural_manifolds_replicaMFT (`manifold_analysis_corr`), the
code behind the paper's Figure 5. It needs Python 3.11 with numpy<2, scipy<1.12, cvxopt,
pymanopt==0.2.4 and autograd, so it runs in its own interpreter (a subprocess), never in ours:

    python3.11 -m venv /tmp/mftma-ref-venv
    /tmp/mftma-ref-venv/bin/pip install "numpy<2" "scipy<1.12" cvxopt pymanopt==0.2.4 autograd
    git clone https://github.com/schung039/neural_manifolds_replicaMFT /tmp/mftma-ref
    PYTHONPATH=src python benchmarks/bench_mftma_reference.py \\
        --reference-python /tmp/mftma-ref-venv/bin/python --reference-path /tmp/mftma-ref

(or set MFTMA_REFERENCE_PYTHON / MFTMA_REFERENCE_PATH). Without them it prints why and runs ours only.
Both sides are Monte Carlo estimates (Gaussian samples; the reference also draws random starts
for its centre-structure optimisation), so each is repeated over seeds and reported as
mean ± std; the last column is the gap in units of the standard error of the difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

from robustlogits.core.mftma import manifold_analysis

REFERENCE_RUNNER = textwrap.dedent("""
    import json, sys, time
    import scipy.misc, scipy.special
    scipy.misc.comb = scipy.special.comb  # removed from scipy; the reference's pymanopt still imports it
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from mftma.manifold_analysis_correlation import manifold_analysis_corr
    X = np.load(sys.argv[2])["X"]
    out = []
    for seed in map(int, sys.argv[5].split(",")):
        np.random.seed(seed)
        start = time.perf_counter()
        a, r, d, rho, k = manifold_analysis_corr([x for x in X], float(sys.argv[3]), int(sys.argv[4]), n_reps=10)
        out.append({"capacity": float(1 / np.mean(1 / a)), "radius": float(np.mean(r)), "dimension": float(np.mean(d)),
                    "center_correlation": float(rho), "K": int(k), "seconds": time.perf_counter() - start})
    print(json.dumps(out))
""")

MEASURES = ("capacity", "radius", "dimension", "center_correlation", "K")


def random_manifolds(P, N, M, radius, seed, shared_dims=0):
    """Gaussian centres (norm ~1, optionally with a shared low-dimensional structure) plus
    Gaussian clouds of the given radius relative to the centre norm."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((P, N)) / math.sqrt(N)
    if shared_dims:
        basis = np.linalg.qr(rng.standard_normal((N, shared_dims)))[0]
        centres += 2 * rng.standard_normal((P, shared_dims)) @ basis.T
    clouds = radius * rng.standard_normal((P, N, M)) / math.sqrt(N)
    return centres[:, :, None] + clouds


def ours(X, kappa, n_t, seeds, **kw):
    rows = []
    for seed in seeds:
        start = time.perf_counter()
        res = manifold_analysis(X, kappa=kappa, n_t=n_t, seed=seed, **kw)
        rows.append(
            {
                "capacity": res.mean_capacity,
                "radius": res.mean_radius,
                "dimension": res.mean_dimension,
                "center_correlation": res.center_correlation,
                "K": res.n_center_components,
                "seconds": time.perf_counter() - start,
            }
        )
    return rows


def reference(X, kappa, n_t, seeds, python, path):
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "X.npz", X=X)
        runner = Path(tmp) / "run_reference.py"
        runner.write_text(REFERENCE_RUNNER)
        done = subprocess.run(
            [python, str(runner), path, str(Path(tmp) / "X.npz"), str(kappa), str(n_t), ",".join(map(str, seeds))],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""},
        )
    if done.returncode:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "reference failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def stats(rows, key):
    v = np.array([r[key] for r in rows], float)
    return v.mean(), v.std(ddof=1) if len(v) > 1 else 0.0, len(v)


def gap(a, b, key):
    (ma, sa, na), (mb, sb, nb) = stats(a, key), stats(b, key)
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    return (ma - mb) / mb * 100, (ma - mb) / se if se > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference-python", default=os.environ.get("MFTMA_REFERENCE_PYTHON"))
    ap.add_argument("--reference-path", default=os.environ.get("MFTMA_REFERENCE_PATH"))
    ap.add_argument("--seeds", type=int, default=3, help="repetitions per side")
    ap.add_argument("--n-t", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="one small setting (a check that it runs)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    settings = [
        dict(P=20, N=100, M=20, radius=0.5),
        dict(P=20, N=200, M=20, radius=1.0),
        dict(P=20, N=200, M=20, radius=0.5, shared_dims=2),
        dict(P=50, N=500, M=50, radius=1.0),
    ]
    if args.quick:
        settings = [dict(P=10, N=60, M=10, radius=0.5)]
    have_ref = bool(
        args.reference_python
        and args.reference_path
        and Path(args.reference_python).exists()
        and (Path(args.reference_path) / "mftma").is_dir()
    )
    print(
        f"CPU: {platform.processor() or platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}"
    )
    if not have_ref:
        print(
            "reference not run: pass --reference-python (an interpreter with numpy<2, scipy<1.12, cvxopt, "
            "pymanopt==0.2.4, autograd) and --reference-path (a checkout of schung039/neural_manifolds_replicaMFT)"
        )
    results = []
    for s in settings:
        X = random_manifolds(s["P"], s["N"], s["M"], s["radius"], seed=11, shared_dims=s.get("shared_dims", 0))
        seeds = list(range(args.seeds))
        row = {
            "setting": s,
            "ours_reference": ours(X, 0.0, args.n_t, seeds),
            "ours_printed": ours(X, 0.0, args.n_t, seeds, definitions="printed", center_method="principal"),
        }
        if have_ref:
            row["reference"] = reference(X, 0.0, args.n_t, seeds, args.reference_python, args.reference_path)
        results.append(row)
        print(f"\n{s}")
        print(f"  {'measure':<19}" + "".join(f"{k:>26}" for k in row if k != "setting"))
        for key in MEASURES:
            cells = "".join(
                f"{stats(row[k], key)[0]:>17.4f} ± {stats(row[k], key)[1]:<6.4f}" for k in row if k != "setting"
            )
            print(f"  {key:<19}{cells}")
        secs = "".join(f"{stats(row[k], 'seconds')[0]:>24.2f} s" for k in row if k != "setting")
        print(f"  {'seconds (mean)':<19}{secs}")
        if have_ref:
            for name in ("ours_reference", "ours_printed"):
                diffs = ", ".join(
                    f"{key} {gap(row[name], row['reference'], key)[0]:+.1f}% "
                    f"({gap(row[name], row['reference'], key)[1]:+.1f} se)"
                    for key in ("capacity", "radius", "dimension")
                )
                print(f"  {name} vs reference: {diffs}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
