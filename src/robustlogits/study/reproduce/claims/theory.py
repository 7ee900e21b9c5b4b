"""Appendix C's analytical model: what it says about logits, tested on the model's own equations
(the admissible threshold) and on the trained teachers (their max logits, and how a small attack
moves their gaps: `analysis/gap_response.py`)."""

from __future__ import annotations

import numpy as np
from scipy import stats

from robustlogits.study.reproduce import evidence as ev
from robustlogits.study.reproduce.claims import words as w
from robustlogits.study.reproduce.claims.base import Claim, Evidence, Measured, MissingData
from robustlogits.study.reproduce.evidence import Threshold

PAPER_BETA = 3.5


def _response(e: Evidence, label: str) -> tuple[np.ndarray, np.ndarray, str]:
    found = e.study().get("gap_response")
    if not found or label not in found["models"]:
        raise MissingData(f"the gap response of the {label}")
    r = found["models"][label]
    margin, shrink = np.asarray(r["margin"]), np.asarray(r["shrink"])
    if len(margin) < 10:
        raise MissingData(f"ten or more correctly classified images of the {label} (got {len(margin)})")
    return margin, shrink, found["run"]


def _shrinks(e: Evidence) -> Measured:
    out, runs = [], []
    for label in ("AT teacher", "ST teacher"):
        margin, shrink, run = _response(e, label)
        out.append(
            (
                f"{label}: mean gap shrinkage of correct predictions",
                ev.bootstrap(np.mean, [shrink], "bootstrap over images"),
            )
        )
        runs.append(run)
    return Measured(out, runs)


def _exponent(margin: np.ndarray, shrink: np.ndarray) -> float:
    keep = (margin > 0.05) & (shrink > 1e-6)
    if keep.sum() < 5:
        return float("nan")
    return float(np.polyfit(np.log(margin[keep]), np.log(shrink[keep]), 1)[0])


def _quadratic(e: Evidence) -> Measured:
    out, runs = [], []
    for label in ("AT teacher", "ST teacher"):
        margin, shrink, run = _response(e, label)
        out.append(
            (
                f"{label}: exponent of shrinkage against gap (log-log slope)",
                ev.bootstrap(_exponent, [margin, shrink], "bootstrap over images"),
            )
        )
        runs.append(run)
    return Measured(out, runs)


def _larger_for_large(e: Evidence) -> Measured:
    out, runs = [], []
    for label in ("AT teacher", "ST teacher"):
        margin, shrink, run = _response(e, label)
        rho = lambda m, s: float(stats.spearmanr(m, s).statistic)  # noqa: E731
        out.append(
            (
                f"{label}: Spearman correlation of gap and shrinkage",
                ev.bootstrap(rho, [margin, shrink], "bootstrap over images"),
            )
        )
        runs.append(run)
    return Measured(out, runs)


def _derived_threshold(e: Evidence) -> Measured:
    theory = e.study().get("theory")
    if not theory:
        raise MissingData("the theory analysis")
    (classes, found), *_ = theory["class_counts"].items()
    value = found["misclassified_threshold"]
    return Measured(
        [
            (
                f"smallest admissible max logit of a misclassified example, C = {classes}, from equations (4, 5)",
                ev.exact(value, "solved from the model's equations; no sampling noise"),
            )
        ],
        [theory["run"]],
        {"ln(C-1)": float(np.log(int(classes) - 1))},
    )


def _mean_near(e: Evidence) -> Measured:
    return Measured(
        [("mean max logit of the AT teachers on the attacked test images", e.test_mean("at", "max_logit"))],
        e.teacher_runs("at"),
    )


def _overfit(e: Evidence) -> Measured:
    st, at = e.teachers("st"), e.teachers("at")
    errors = {
        k: [r["train_error"] for r in rows if r.get("train_error") is not None] for k, rows in (("st", st), ("at", at))
    }
    if not errors["st"] or not errors["at"]:
        raise MissingData("the teachers' training errors")
    n = e.split_size("at", "train")
    error_gap = ev.difference(ev.accuracy(errors["at"], n), ev.accuracy(errors["st"], n))
    return Measured(
        [
            ("training error, AT minus ST (ST fits its training set more closely)", error_gap),
            ("Cohen's d of ST over AT test gaps (ST's gaps are large)", e.d("gap", "st", "at")),
            ("ST adversarial accuracy (not robust)", e.teacher_accuracy("st")),
        ],
        e.teacher_runs("st", "at"),
        {"ST training error": float(np.mean(errors["st"])), "AT training error": float(np.mean(errors["at"]))},
    )


CLAIMS = [
    Claim(
        "theory-threshold-3.5",
        "C.2.4",
        "Figure C.1",
        "From the figure, we see that the only active constraint is on logits that misclassified examples, where we see that stationary solutions require $\\beta_z > 3.5$.",
        "the admissible threshold solved from the model's equations (4, 5) for the study's class count",
        (
            Threshold(
                "in",
                (PAPER_BETA * 0.85, PAPER_BETA * 1.15),
                "require $\\beta_z > 3.5$",
                "the derived threshold is 3.5 within 15%",
            ),
        ),
        _derived_threshold,
    ),
    Claim(
        "theory-robust-mean-near-3.5",
        "C.2.4",
        "Figure C.1",
        "In a surprising twist, it turns out that, empirically, adversarially robust logits happen to have a distribution with a mean that is close to 3.5!",
        "mean max logit of the AT teachers on the attacked test images",
        (Threshold("in", (PAPER_BETA * 0.85, PAPER_BETA * 1.15), "close to 3.5", "'close to': within 15% of 3.5"),),
        _mean_near,
        regimes=("paper-setup",),
    ),
    Claim(
        "theory-attacks-shrink-gaps",
        "C.2.5",
        "Figure C.3",
        "Hence adversarial attacks have the effect of shrinking the logit gaps of logits which correctly classify examples prior to the attack.",
        "mean shrinkage of the logit gap of correctly classified test images under PGD at eps = 1/255 (linear response): AT, then ST teacher",
        (w.above_zero("shrinking the logit gaps", "the mean shrinkage"),),
        _shrinks,
    ),
    Claim(
        "theory-shrinkage-quadratic",
        "C.2.5",
        "Figure C.3",
        "The magnitude of the change in the logit gap due to adversarial perturbations is quadratically dependent on the logit gaps",
        "exponent of a power law fitted to shrinkage against clean gap (log-log least squares): AT, then ST teacher",
        (Threshold("in", (1.5, 2.5), "quadratically dependent", "'quadratic': an exponent nearer 2 than 1 or 3"),),
        _quadratic,
    ),
    Claim(
        "theory-large-gaps-perturbed-more",
        "4.1",
        "Figure C.3",
        "More precisely, logits with large logit gaps suffer larger perturbations to their response compared to logits with smaller gaps.",
        "Spearman correlation between a correct prediction's clean gap and its shrinkage: AT, then ST teacher",
        (w.above_zero("larger perturbations", "the rank correlation"),),
        _larger_for_large,
    ),
    Claim(
        "theory-overfit-large-gaps-not-robust",
        "C.2.5",
        "Figure C.3",
        "Hence, we predict that models that overfit the training data (i.e. $\\varepsilon_{error} \\downarrow 0$) will fail to be robust to adversarial attacks if they exhibit large logit gaps when trained on unperturbed data.",
        "the ST teacher (trained on unperturbed data) has the lower training error, the larger gaps, and no robustness",
        (
            w.above_zero("overfit the training data", "AT's training error minus ST's"),
            w.large_effect("large logit gaps"),
            w.rounds_to_zero("fail to be robust"),
        ),
        _overfit,
    ),
]
