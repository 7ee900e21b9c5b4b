"""Section 4.2's manifold analysis (Figure 5) and A.4.3: how well adversarial perturbation
manifolds separate, stage by stage, in the teachers and the students the paper names.

Stage 0 is the input; stage 1 the first residual block (the stem's output for a plain CNN); the
last stage the last block. Seeds are the repeated analyses, one per seed's set of networks.
"""

from __future__ import annotations

import numpy as np

from robustlogits.study.reproduce import evidence as ev
from robustlogits.study.reproduce.claims import words as w
from robustlogits.study.reproduce.claims.base import Claim, Evidence, Measured, MissingData
from robustlogits.study.reproduce.evidence import Estimate, Threshold

ROBUST = ("AT teacher", "normal student", "fix-1 (avg) student")  # non-zero adversarial accuracy in Table 2 / Fig. 4B
NON_ROBUST = ("ST teacher", "correct-fix-1 student", "hybrid student")


def _over_seeds(values: list[float], how: str) -> Estimate:
    s = ev.seed_se(values)
    value = float(np.mean(values))
    return ev.Estimate(
        value, value - ev.Z * s, value + ev.Z * s, s or None, f"{how}; {len(values)} seed(s): spread over seeds only"
    )


def _per_seed(e: Evidence, roles: tuple[str, ...], measure: str, reduce) -> list[float]:
    """Per seed, `reduce(stages)` averaged over the roles present; a seed lacking all of them is skipped."""
    out = []
    for found in e.manifolds().values():
        values = [reduce(found["models"][r][measure]) for r in roles if r in found["models"]]
        if values:
            out.append(float(np.mean(values)))
    if not out:
        raise MissingData(f"manifold {measure} of {', '.join(roles)}")
    return out


def _radius_rise(e: Evidence) -> Measured:
    rise = lambda v: v[1] - v[0]  # noqa: E731 - input to the first block
    non, rob = _per_seed(e, NON_ROBUST, "radius", rise), _per_seed(e, ROBUST, "radius", rise)
    diff = [a - b for a, b in zip(non, rob)]
    return Measured(
        [
            (
                "radius rise from input to first block: non-robust minus robust networks",
                _over_seeds(diff, "per-seed difference"),
            )
        ],
        e.manifold_runs(),
        {"non-robust": float(np.mean(non)), "robust": float(np.mean(rob))},
    )


def _near_st(e: Evidence) -> Measured:
    deep = lambda v: float(np.mean(v[1:]))  # noqa: E731 - every stage after the input
    out, numbers = [], {}
    for role in ("correct-fix-1 student", "hybrid student"):
        x = _per_seed(e, (role,), "capacity", deep)
        normal = _per_seed(e, ("normal student",), "capacity", deep)
        st, at = _per_seed(e, ("ST teacher",), "capacity", deep), _per_seed(e, ("AT teacher",), "capacity", deep)
        out.append(
            (
                f"{role}: capacity below the normal student's (normal minus it)",
                _over_seeds([n - v for n, v in zip(normal, x)], "mean over stages after the input"),
            )
        )
        out.append(
            (
                f"{role}: nearer the ST than the AT teacher (|to AT| minus |to ST|)",
                _over_seeds(
                    [abs(v - a) - abs(v - s) for v, a, s in zip(x, at, st)], "mean over stages after the input"
                ),
            )
        )
        numbers[role] = float(np.mean(x))
    return Measured(out, e.manifold_runs(), numbers)


def _falls_early(e: Evidence) -> Measured:
    first = lambda v: v[1]  # noqa: E731
    rob = _per_seed(e, ("AT teacher", "normal student"), "capacity", first)
    non = _per_seed(e, ("correct-fix-1 student", "hybrid student"), "capacity", first)
    return Measured(
        [
            (
                "capacity at the first block: robust minus non-robust networks",
                _over_seeds([a - b for a, b in zip(rob, non)], "per-seed difference"),
            )
        ],
        e.manifold_runs(),
    )


def _deeper_increase(e: Evidence) -> Measured:
    out = []
    for role in ROBUST:
        try:
            values = [v[-1] - v[1] for v in e.manifold_values(role, "capacity")]
        except MissingData:
            continue
        out.append((f"{role}: capacity at the last block minus at the first", _over_seeds(values, "per seed")))
    if not out:
        raise MissingData("manifold capacity of a robust network")
    return Measured(out, e.manifold_runs())


def _last_block_decrease(e: Evidence) -> Measured:
    values = [v[-2] - v[-1] for v in e.manifold_values("fix-1 (avg) student", "capacity")]
    return Measured(
        [
            (
                "fix-1 (avg) student: capacity at the next-to-last block minus at the last",
                _over_seeds(values, "per seed"),
            )
        ],
        e.manifold_runs(),
    )


def _similar(measure: str):
    def run(e: Evidence) -> Measured:
        per_seed = []
        for found in e.manifolds().values():
            means = [float(np.mean(m[measure][1:])) for m in found["models"].values()]
            per_seed.append(float(np.std(means) / abs(np.mean(means))) if np.mean(means) else float("inf"))
        return Measured(
            [
                (
                    f"coefficient of variation of {measure.replace('_', ' ')} across networks",
                    _over_seeds(per_seed, "per seed"),
                )
            ],
            e.manifold_runs(),
        )

    return run


def _overestimates(e: Evidence) -> Measured:
    per_seed = []
    for found in e.manifolds().values():
        pairs = [
            (c, s)
            for m in found["models"].values()
            for c, s in zip(m.get("capacity", []), m.get("simulated_capacity") or [])
            if c is not None and s
        ]
        if pairs:
            per_seed.append(float(np.mean([(c - s) / s for c, s in pairs])))
    if not per_seed:
        raise MissingData("a simulated capacity (the scale runs the manifold analysis without `simulated`)")
    est = _over_seeds(per_seed, "mean relative excess of the mean-field capacity over the simulated one")
    return Measured(
        [("(MFTMA - simulated) / simulated capacity", est), ("(MFTMA - simulated) / simulated capacity", est)],
        e.manifold_runs(),
    )


CLAIMS = [
    Claim(
        "manifold-radius-grows-early",
        "4.2",
        "Figure 5B",
        "This analysis suggests that the radius of the manifold for images perturbed within an ℓ_{∞} ball with radius $\\epsilon = 8/255$ increases quickly in early layers of networks that are not adversarially robust (Figure 5B).",
        "rise of the manifold radius from the input to the first block, non-robust networks (ST teacher, correct-fix-1, hybrid) minus robust ones (AT teacher, normal, fix-1 (avg))",
        (w.above_zero("increases quickly in early layers"),),
        _radius_rise,
    ),
    Claim(
        "manifold-nonrobust-students-near-st",
        "4.2",
        "Figure 5A",
        'Student networks trained on the "corrected-fix-1" and the "hybrid" logits exhibited significantly decreased capacity for adversarially perturbed images, nearing that of the non-robust standard trained teacher network (Figure 5A).',
        "for correct-fix-1 and hybrid students: capacity below the normal student's, and nearer the ST teacher's than the AT teacher's (mean over stages after the input)",
        (
            w.above_zero("significantly decreased capacity"),
            w.above_zero("nearing that of the non-robust standard trained teacher"),
        ),
        _near_st,
        regimes=("teacher",),
    ),
    Claim(
        "manifold-falls-at-first-block",
        "4.2",
        "Figure 5A",
        "Student networks that are not robust show poor representations of adversarial images as early as the first residual block, similar to ST teachers",
        "capacity at the first block: robust networks (AT teacher, normal) minus non-robust students (correct-fix-1, hybrid)",
        (w.above_zero("as early as the first residual block"),),
        _falls_early,
        regimes=("teacher",),
    ),
    Claim(
        "manifold-robust-increase-deeper",
        "4.2",
        "Figure 5A",
        "Each tested network that exhibited non-zero adversarial accuracy showed increased capacity in the deeper layers",
        "for the AT teacher, normal and fix-1 (avg) students: capacity at the last block minus at the first",
        (w.above_zero("increased capacity in the deeper layers"),),
        _deeper_increase,
        regimes=("teacher",),
    ),
    Claim(
        "manifold-fix1-last-block-decrease",
        "4.2",
        "Figure 5A",
        'though the student trained with "fix-1" logits exhibited a final decrease in capacity in the last residual block.',
        "fix-1 (avg) student: capacity at the next-to-last block minus at the last",
        (w.above_zero("a final decrease in capacity"),),
        _last_block_decrease,
        regimes=("teacher",),
    ),
    Claim(
        "manifold-dimension-similar",
        "4.2",
        "Figure 5C",
        "The manifold dimension (C) and center correlations (D) are similar across networks.",
        "coefficient of variation across the networks of the manifold dimension (mean over stages after the input)",
        (
            Threshold(
                "<", 0.2, "similar across networks", "'similar': the networks differ by less than a fifth of the mean"
            ),
        ),
        _similar("dimension"),
    ),
    Claim(
        "manifold-center-correlation-similar",
        "4.2",
        "Figure 5D",
        "The manifold dimension (C) and center correlations (D) are similar across networks.",
        "coefficient of variation across the networks of the centre correlation (mean over stages after the input)",
        (
            Threshold(
                "<", 0.2, "similar across networks", "'similar': the networks differ by less than a fifth of the mean"
            ),
        ),
        _similar("center_correlation"),
    ),
    Claim(
        "mftma-mildly-overestimates",
        "A.4.3",
        "Figure A.8",
        "We observe a tight relationship between MFTMA and simulated capacity, with MFTMA mildly overestimating capacity consistent with prior work [42].",
        "mean relative excess of the MFTMA capacity over the simulated capacity, every network and stage",
        (
            Threshold(">", 0.0, "overestimating", "an overestimate: the excess is above 0"),
            Threshold("<", 0.25, "mildly", "'mildly': by less than a quarter"),
        ),
        _overestimates,
    ),
]
