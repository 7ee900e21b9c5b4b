"""The paper's reported numbers and claims, each claim with the rule that decides it from our runs.

Numbers are read from the paper's text (Table 1, Table 2, section 4.2, appendix A.3). Table 1's
CIFAR-10 natural accuracies and CIFAR-100 adversarial accuracies are illegible in our copy of
the paper, so those cells say so rather than guess. Every rule is written out in `rule`, and a
claim whose numbers the study did not produce gets the verdict "not measured".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

HELD, NOT_HELD, NOT_MEASURED = "held", "not held", "not measured"

# (dataset, model) -> (natural, adversarial) as "mean ± std" strings in percent; None: illegible.
TABLE1 = {
    ("cifar10", "st"): (None, "0.00 ± 0.00"),
    ("cifar10", "at"): (None, "41.5 ± 0.63"),
    ("cifar100", "st"): ("76.1 ± 0.58", None),
    ("cifar100", "at"): ("49.1 ± 0.85", None),
}
# student -> (natural, adversarial), CIFAR-10, ResNet-18 students of the epoch-40 AT teacher.
TABLE2 = {
    "normal": ("75.2 ± 0.30", "30.4 ± 0.34"),
    "permute-k1": ("77.6 ± 0.6", "13.3 ± 2.0"),
    "correct-fix-1": ("92.1 ± 0.19", "0.1 ± 0.05"),
    "hybrid": ("87.86 ± 0.19", "0.00 ± 0.00"),
}
TABLE2_LABELS = {
    "normal": "Normal",
    "permute-k1": "Fix-1 (perm)",
    "correct-fix-1": "Correct-fix-1 (perm)",
    "hybrid": "Hybrid ST-AT",
}
TEACHER_TRAIN_ERROR = "19.6 ± 0.6"  # section 4.2: AT teacher's error on the training set, percent
FIX1_ADVERSARIAL = 12.43  # section 4.2, Figure 4B (fix-1 permute), percent


@dataclass
class Outcome:
    verdict: str
    numbers: dict[str, float]
    runs: list[str]


@dataclass
class Claim:
    id: str
    where: str  # the paper's section or figure
    paper: str  # what the paper says
    rule: str  # how we decide it from our runs
    judge: Callable[[dict], Outcome]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _runs(rows) -> list[str]:
    return [r["run"] for r in rows if r.get("run")]


def _teacher_compare(metric: str, at_above: bool):
    def judge(results: dict) -> Outcome:
        rows = results.get("teachers", {})
        st, at = rows.get("st", []), rows.get("at", [])
        a, s = _mean(r.get(metric) for r in at), _mean(r.get(metric) for r in st)
        if a is None or s is None:
            return Outcome(NOT_MEASURED, {}, [])
        held = a > s if at_above else a < s
        return Outcome(
            HELD if held else NOT_HELD,
            {f"AT {metric}": a, f"ST {metric}": s},
            [r["train_run"] for r in st + at if r.get("train_run")],
        )

    return judge


def _student_ratio(label: str, reference: str, threshold: float, above: bool = True):
    """adversarial(label) / adversarial(reference) against a threshold."""

    def judge(results: dict) -> Outcome:
        students = results.get("students", {})
        x, ref = (
            _mean(r["adversarial"] for r in students.get(label, [])),
            _mean(r["adversarial"] for r in students.get(reference, [])),
        )
        if x is None or ref is None:
            return Outcome(NOT_MEASURED, {}, [])
        ratio = x / ref if ref > 0 else float("inf") if x > 0 else 1.0
        held = ratio >= threshold if above else ratio < threshold
        return Outcome(
            HELD if held else NOT_HELD,
            {f"{label} adversarial": x, f"{reference} adversarial": ref, "ratio": ratio},
            _runs(students.get(label, []) + students.get(reference, [])),
        )

    return judge


def _student_order(metric: str, lower: str, higher: str):
    def judge(results: dict) -> Outcome:
        students = results.get("students", {})
        lo, hi = _mean(r[metric] for r in students.get(lower, [])), _mean(r[metric] for r in students.get(higher, []))
        if lo is None or hi is None:
            return Outcome(NOT_MEASURED, {}, [])
        return Outcome(
            HELD if lo < hi else NOT_HELD,
            {f"{lower} {metric}": lo, f"{higher} {metric}": hi},
            _runs(students.get(lower, []) + students.get(higher, [])),
        )

    return judge


def _st_not_robust(results: dict) -> Outcome:
    st = results.get("teachers", {}).get("st", [])
    a = _mean(r.get("adversarial") for r in st)
    if a is None:
        return Outcome(NOT_MEASURED, {}, [])
    return Outcome(HELD if a <= 0.01 else NOT_HELD, {"ST adversarial": a}, _runs(st))


def _at_more_robust(results: dict) -> Outcome:
    rows = results.get("teachers", {})
    a, s = (
        _mean(r.get("adversarial") for r in rows.get("at", [])),
        _mean(r.get("adversarial") for r in rows.get("st", [])),
    )
    if a is None or s is None:
        return Outcome(NOT_MEASURED, {}, [])
    return Outcome(
        HELD if a - s >= 0.05 else NOT_HELD,
        {"AT adversarial": a, "ST adversarial": s},
        _runs(rows.get("at", []) + rows.get("st", [])),
    )


def _large_gap_robust(results: dict) -> Outcome:
    gap = results.get("gap_split")
    if not gap:
        return Outcome(NOT_MEASURED, {}, [])
    lo, hi = gap["at_below_median"], gap["at_above_median"]
    return Outcome(
        HELD if hi > lo else NOT_HELD,
        {"AT adversarial, gap above median": hi, "AT adversarial, gap below median": lo},
        gap["runs"],
    )


def _fix1_above_st(results: dict) -> Outcome:
    fix1 = results.get("students", {}).get("permute-k1", [])
    st = results.get("teachers", {}).get("st", [])
    f, s = _mean(r["adversarial"] for r in fix1), _mean(r.get("adversarial") for r in st)
    if f is None or s is None:
        return Outcome(NOT_MEASURED, {}, [])
    return Outcome(HELD if f > s else NOT_HELD, {"fix-1 adversarial": f, "ST teacher adversarial": s}, _runs(fix1 + st))


def _fix_k_rises(mode: str):
    def judge(results: dict) -> Outcome:
        students = results.get("students", {})
        ks = sorted(int(label.split("-k")[1]) for label in students if label.startswith(f"{mode}-k"))
        if len(ks) < 2:
            return Outcome(NOT_MEASURED, {}, [])
        first = _mean(r["adversarial"] for r in students[f"{mode}-k{ks[0]}"])
        last = _mean(r["adversarial"] for r in students[f"{mode}-k{ks[-1]}"])
        return Outcome(
            HELD if last > first else NOT_HELD,
            {f"{mode} k={ks[0]} adversarial": first, f"{mode} k={ks[-1]} adversarial": last},
            _runs(students[f"{mode}-k{ks[0]}"] + students[f"{mode}-k{ks[-1]}"]),
        )

    return judge


def _early_teacher_better(results: dict) -> Outcome:
    sweep = {e: r for (e, loss), r in results.get("sweeps", {}).items() if loss == "l1"}
    if len(sweep) < 2:
        return Outcome(NOT_MEASURED, {}, [])
    last = max(sweep)
    best_early = max(sweep[e]["adversarial"] for e in sweep if e != last)
    return Outcome(
        HELD if best_early > sweep[last]["adversarial"] else NOT_HELD,
        {
            "best earlier-checkpoint student adversarial": best_early,
            f"epoch-{last} student adversarial": sweep[last]["adversarial"],
        },
        [r["run"] for r in sweep.values()],
    )


def _l1_beats_kl(results: dict) -> Outcome:
    sweeps = results.get("sweeps", {})
    epochs = sorted({e for e, loss in sweeps if (e, "l1") in sweeps and (e, "kl") in sweeps})
    if not epochs:
        return Outcome(NOT_MEASURED, {}, [])
    l1 = _mean(sweeps[(e, "l1")]["adversarial"] for e in epochs)
    kl = _mean(sweeps[(e, "kl")]["adversarial"] for e in epochs)
    return Outcome(
        HELD if l1 > kl else NOT_HELD,
        {"L1 adversarial (mean over epochs)": l1, "KL adversarial (mean over epochs)": kl},
        [sweeps[(e, loss)]["run"] for e in epochs for loss in ("l1", "kl")],
    )


def _manifold(measure: str, higher: str, lower: str, stages: str):
    def judge(results: dict) -> Outcome:
        models = (results.get("manifold") or {}).get("models", {})
        if higher not in models or lower not in models:
            return Outcome(NOT_MEASURED, {}, [])
        pick = (lambda v: v[-1]) if stages == "last" else (lambda v: float(np.mean(v)))
        h, lo = pick(models[higher][measure]), pick(models[lower][measure])
        return Outcome(
            HELD if h > lo else NOT_HELD,
            {f"{higher} {measure}": h, f"{lower} {measure}": lo},
            [results["manifold"]["run"]],
        )

    return judge


def _theory(results: dict) -> Outcome:
    models = (results.get("theory") or {}).get("models", {})
    st = next((v for k, v in models.items() if "standard" in k), None)
    at = next((v for k, v in models.items() if "adversarial" in k), None)
    if (
        not st
        or not at
        or st.get("fraction_misclassified_above_threshold") is None
        or at.get("fraction_misclassified_above_threshold") is None
    ):
        return Outcome(NOT_MEASURED, {}, [])
    s, a = st["fraction_misclassified_above_threshold"], at["fraction_misclassified_above_threshold"]
    return Outcome(
        HELD if s > a else NOT_HELD,
        {"ST misclassified above threshold": s, "AT misclassified above threshold": a},
        [results["theory"]["run"]],
    )


def _cross(analysis: str, measure: Callable[[dict], tuple[dict[str, float], bool] | None]):
    """A claim read from a cross-model analysis' summary (ranks, errors, overlap, images)."""

    def judge(results: dict) -> Outcome:
        summary = (results.get("cross") or {}).get(analysis)
        found = measure(summary) if summary else None
        if not found:
            return Outcome(NOT_MEASURED, {}, [])
        numbers, held = found
        return Outcome(HELD if held else NOT_HELD, numbers, [summary["run"]])

    return judge


def _rank_disagreement(summary: dict):
    stats = summary.get("group_stats", {})
    if "AT-ST" not in stats or "AT-AT" not in stats:
        return None
    cross, within = stats["AT-ST"]["mean"], stats["AT-AT"]["mean"]
    return {"AT-ST far-apart fraction": cross, "AT-AT far-apart fraction": within}, cross > within


def _error_rank2(summary: dict):
    curves = summary.get("group_curves", {})
    if "AT" not in curves or "ST" not in curves:
        return None
    chance = 1 / (len(summary["classes"]) - 1)
    at, st = curves["AT"]["natural"]["mean"][1], curves["ST"]["natural"]["mean"][1]
    return {"AT errors at rank 2": at, "ST errors at rank 2": st, "chance": chance}, min(at, st) > chance


def _mean_curve(curves: dict, group: str, kind: str) -> float | None:
    entry = curves.get(group, {}).get(kind)
    return float(np.mean(entry["mean"])) if entry else None


def _overlap_within(summary: dict):
    curves = summary.get("group_curves", {})
    within, cross = _mean_curve(curves, "AT-AT", "same_example"), _mean_curve(curves, "AT-ST", "same_example")
    if within is None or cross is None:
        return None
    return {"AT-AT mean AO@k": within, "AT-ST mean AO@k": cross}, within > cross


def _overlap_permuted(summary: dict):
    curves = summary.get("group_curves", {})
    at, st = (
        _mean_curve(curves, "AT self", "permuted_within_class"),
        _mean_curve(curves, "ST self", "permuted_within_class"),
    )
    if at is None or st is None:
        return None
    return {"AT against itself, permuted within class": at, "ST against itself, permuted within class": st}, at < st


def _neighbours(summary: dict):
    groups, models = summary.get("groups", {}), summary.get("neighbours", {}).get("models", {})
    values = {
        g: _mean(models[m].get("same_class_fraction") for m in members if m in models) for g, members in groups.items()
    }
    if values.get("AT") is None or values.get("ST") is None:
        return None
    return {"ST neighbours of the same class": values["ST"], "AT neighbours of the same class": values["AT"]}, values[
        "ST"
    ] > values["AT"]


CLAIMS: list[Claim] = [
    Claim(
        "max-logit-mean",
        "4.1, Figure 1",
        "AT max logits have a much lower mean than ST's.",
        "mean over seeds of the held-out max-logit mean at the teacher epoch: AT < ST",
        _teacher_compare("max_logit_mean", at_above=False),
    ),
    Claim(
        "max-logit-skew",
        "4.1, Figure 1",
        "AT max logits are positively skewed; ST's are more symmetric.",
        "held-out max-logit skewness at the teacher epoch, mean over seeds: AT > ST",
        _teacher_compare("max_logit_skew", at_above=True),
    ),
    Claim(
        "gap-smaller",
        "4.1, Figure 2A",
        "AT logit gaps are smaller than ST's.",
        "held-out logit-gap mean at the teacher epoch, mean over seeds: AT < ST",
        _teacher_compare("gap_mean", at_above=False),
    ),
    Claim(
        "gap-skew",
        "4.1, Figure B.1",
        "AT logit gaps stay small and positively skewed.",
        "held-out logit-gap skewness at the teacher epoch, mean over seeds: AT > ST",
        _teacher_compare("gap_skew", at_above=True),
    ),
    Claim(
        "large-gap-robust",
        "4.1, Figure 2B",
        "For AT models, large logit gaps indicate adversarial robustness.",
        "AT teachers' adversarial accuracy on test examples with a clean gap above the median > below it",
        _large_gap_robust,
    ),
    Claim(
        "st-not-robust",
        "Table 1",
        "ST models have (about) 0% adversarial accuracy.",
        "ST teachers' adversarial accuracy, mean over seeds, <= 1%",
        _st_not_robust,
    ),
    Claim(
        "at-robust",
        "Table 1",
        "AT models are far more robust than ST models.",
        "AT minus ST adversarial accuracy >= 5 points",
        _at_more_robust,
    ),
    Claim(
        "top3",
        "4.2, Figure 4B",
        "The top-3 values provide almost 80% of the full robustness.",
        "adversarial accuracy of fix-3 (permute) students >= 75% of normal distillation's",
        _student_ratio("permute-k3", "normal", 0.75),
    ),
    Claim(
        "top7",
        "4.2, Figure 4B",
        "The top-7 values are required to be within 99% of the full robustness.",
        "adversarial accuracy of fix-7 (permute) students >= 99% of normal distillation's",
        _student_ratio("permute-k7", "normal", 0.99),
    ),
    Claim(
        "fix-k-rises",
        "4.2, Figure 4B",
        "Adversarial accuracy increases as more top values are kept (permute).",
        "fix-k (permute) students: adversarial accuracy at the largest k > at the smallest k",
        _fix_k_rises("permute"),
    ),
    Claim(
        "fix-k-average",
        "4.2, Figure 4B",
        "Averaging the rest is qualitatively similar to permuting it.",
        "fix-k (average) students: adversarial accuracy at the largest k > at the smallest k",
        _fix_k_rises("average"),
    ),
    Claim(
        "fix1-below-normal",
        "Table 2",
        "Fix-1 students lose much of normal distillation's robustness.",
        "fix-1 (permute) adversarial accuracy < normal distillation's",
        _student_order("adversarial", "permute-k1", "normal"),
    ),
    Claim(
        "fix1-above-st",
        "4.2",
        "Fix-1 students keep far more robustness than a standard-trained network (12.43% vs 0).",
        "fix-1 (permute) adversarial accuracy > the ST teachers'",
        _fix1_above_st,
    ),
    Claim(
        "correct-fix-adversarial",
        "Table 2",
        "Correcting the teacher's training errors removes the robustness.",
        "correct-fix-1 adversarial accuracy < fix-1's",
        _student_order("adversarial", "correct-fix-1", "permute-k1"),
    ),
    Claim(
        "correct-fix-natural",
        "Table 2",
        "Correct-fix-1 students have much higher natural accuracy.",
        "correct-fix-1 natural accuracy > fix-1's",
        _student_order("natural", "permute-k1", "correct-fix-1"),
    ),
    Claim(
        "hybrid",
        "4.2, Table 2",
        "Hybrid ST-AT students have remarkably little robustness.",
        "hybrid adversarial accuracy < 50% of normal distillation's",
        _student_ratio("hybrid", "normal", 0.5, above=False),
    ),
    Claim(
        "manifold-capacity",
        "4.3, Figure 5A",
        "Non-robust students lose manifold capacity, like the ST teacher.",
        "last-stage capacity: robust student (normal) > non-robust student (correct-fix-1)",
        _manifold("capacity", "robust student (normal)", "non-robust student (correct-fix-1)", "last"),
    ),
    Claim(
        "manifold-teachers",
        "4.3, Figure 5A",
        "The AT teacher's perturbation manifolds stay more separable.",
        "last-stage capacity: AT teacher > ST teacher",
        _manifold("capacity", "AT teacher", "ST teacher", "last"),
    ),
    Claim(
        "manifold-radius",
        "4.3, Figure 5B",
        "Non-robust networks have larger manifold radii.",
        "radius averaged over stages: ST teacher > AT teacher",
        _manifold("radius", "ST teacher", "AT teacher", "mean"),
    ),
    Claim(
        "teacher-epoch",
        "A.3, Figure A.6",
        "Late teacher checkpoints distil less robustness than early ones.",
        "L1 sweep: best adversarial accuracy of students of earlier checkpoints > that of the last checkpoint's",
        _early_teacher_better,
    ),
    Claim(
        "l1-vs-kl",
        "A.3, Figure A.7",
        "Logit (L1) distillation transfers more robustness than softmax (KL).",
        "adversarial accuracy averaged over the swept teacher epochs: L1 > KL",
        _l1_beats_kl,
    ),
    Claim(
        "rank-disagreement",
        "4.1, Figure 3B",
        "AT and ST networks rank a class's images very differently (11.8% far apart), AT networks alike (1.1%).",
        "share of test images ranked more than half a class apart: AT-ST pairs > AT-AT pairs",
        _cross("ranks", _rank_disagreement),
    ),
    Claim(
        "error-ranks",
        "4.1, Figure 3C",
        "Errors go to the classes the average logit vector ranks next.",
        "share of natural errors on the class ranked 2nd in the true class's mean logit vector > chance "
        "(1/(C-1)), for both AT and ST",
        _cross("errors", _error_rank2),
    ),
    Claim(
        "overlap",
        "4.1, Figure 3D / B.6",
        "AT networks overlap more with each other than with ST networks.",
        "average overlap AO@k averaged over k: AT-AT > AT-ST",
        _cross("overlap", _overlap_within),
    ),
    Claim(
        "overlap-permuted",
        "4.1, Figure 3D (dashed)",
        "AT outputs vary more between images of one class.",
        "AO@k of a model against its own outputs permuted within class, averaged over k: AT < ST",
        _cross("overlap", _overlap_permuted),
    ),
    Claim(
        "neighbours",
        "4.3, Figure B.3",
        "Nearest images in ST logit space are mostly of the seed's class; "
        "in AT logit space they are visually similar, across classes.",
        "share of the 5 cosine-nearest test images of the same class: ST > AT",
        _cross("images", _neighbours),
    ),
    Claim(
        "theory-threshold",
        "Appendix C",
        "Misclassified examples need a large max logit (> about 3.5); AT logits stay small.",
        "share of misclassified test examples whose max logit exceeds the admissible threshold: ST > AT",
        _theory,
    ),
]


def judge_all(results: dict) -> list[tuple[Claim, Outcome]]:
    """Every claim's outcome; a rule that met a NaN (e.g. an undefined statistic) measured nothing."""
    out = []
    for claim in CLAIMS:
        outcome = claim.judge(results)
        if any(not np.isfinite(v) for v in outcome.numbers.values() if isinstance(v, float) and v != float("inf")):
            outcome = Outcome(NOT_MEASURED, outcome.numbers, outcome.runs)
        out.append((claim, outcome))
    return out
