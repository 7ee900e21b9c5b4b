"""Section 4.1 and Table 1: the max-logit and logit-gap distributions of ST and AT networks,
on the test images at the teacher epoch and through training (Figures 1, 2, B.1)."""

from __future__ import annotations

import numpy as np

from robustlogits.study.reproduce import evidence as ev
from robustlogits.study.reproduce.claims import words as w
from robustlogits.study.reproduce.claims.base import Claim, Evidence, Measured, within
from robustlogits.study.reproduce.evidence import Threshold


def _test_d(quantity: str, a: str, b: str, dataset: str | None = None):
    def measure(e: Evidence) -> Measured:
        d = e.d(quantity, a, b, dataset)
        return Measured(
            [(f"Cohen's d, {a.upper()} over {b.upper()} test {quantity.replace('_', ' ')}", d)],
            e.teacher_runs(a, b, dataset=dataset),
            {f"{k.upper()} mean {quantity}": e.test_mean(k, quantity, dataset).value for k in (a, b)},
        )

    return measure


def _test_skew(kind: str, quantity: str, absolute: bool = False, dataset: str | None = None):
    def measure(e: Evidence) -> Measured:
        label = f"{'|skew|' if absolute else 'skew'} of {kind.upper()} test {quantity.replace('_', ' ')}"
        return Measured(
            [(label, e.test_skew(kind, quantity, dataset, absolute))], e.teacher_runs(kind, dataset=dataset)
        )

    return measure


def _more_symmetric(e: Evidence) -> Measured:
    at, st = e.test_skew("at", "max_logit", absolute=True), e.test_skew("st", "max_logit", absolute=True)
    return Measured(
        [("|skew| AT - |skew| ST, test max logits", ev.difference(at, st))],
        e.teacher_runs("at", "st"),
        {"AT |skew|": at.value, "ST |skew|": st.value},
    )


def _peak_at_zero(dataset: str | None = None):
    def measure(e: Evidence) -> Measured:
        tests = e.tests("at", dataset)
        n = len(tests[0]["gap"])
        first = ev.accuracy([float((t["gap"] < 0.5).mean()) for t in tests], n)
        second = ev.accuracy([float(((t["gap"] >= 0.5) & (t["gap"] < 1.0)).mean()) for t in tests], n)
        return Measured(
            [("share of AT test gaps in [0, 0.5) minus share in [0.5, 1)", ev.difference(first, second))],
            e.teacher_runs("at", dataset=dataset),
            {"share in [0, 0.5)": first.value, "share in [0.5, 1)": second.value},
        )

    return measure


def _few_above_five(dataset: str | None = None):
    def measure(e: Evidence) -> Measured:
        tests = e.tests("at", dataset)
        share = ev.accuracy([float((t["gap"] > 5).mean()) for t in tests], len(tests[0]["gap"]))
        return Measured([("share of AT test gaps above 5", share)], e.teacher_runs("at", dataset=dataset))

    return measure


def _gap_predicts_robustness(dataset: str | None = None):
    def measure(e: Evidence) -> Measured:
        tests = [t for t in e.tests("at", dataset) if t["correct"].any()]
        per_seed = [
            ev.bootstrap(
                lambda g, r: ev.auc(g, r), [t["gap"][t["correct"]], t["robust"][t["correct"]]], "bootstrap over images"
            )
            for t in tests
        ]
        return Measured(
            [
                (
                    "AUROC of the clean gap for robustness, AT, correct test images",
                    ev.pooled(per_seed, "bootstrap over images"),
                )
            ],
            e.teacher_runs("at", dataset=dataset),
        )

    return measure


def _small_gaps_not_robust(e: Evidence) -> Measured:
    tests = e.tests("at")
    small = [t["robust"][t["gap"] < np.quantile(t["gap"], 0.25)].mean() for t in tests]
    overall = [t["robust"].mean() for t in tests]
    n = len(tests[0]["gap"])
    s, o = ev.accuracy(small, max(n // 4, 1)), ev.accuracy(overall, n)
    return Measured(
        [("AT adversarial accuracy: smallest-quartile gaps minus all images", ev.difference(s, o))],
        e.teacher_runs("at"),
        {"smallest quarter of gaps": s.value, "all images": o.value},
    )


def _epochs_skewed(kind: str, split: str, quantity: str, threshold: float, share: float):
    """Share of the first `share` of training's epochs whose skew is above `threshold`."""

    def measure(e: Evidence) -> Measured:
        last = e.last_epoch(kind)
        epochs = [ep for ep in sorted(e.history(kind, split, quantity, "skew")[0]) if ep <= share * last]
        return Measured(
            [
                (
                    f"share of epochs with {kind.upper()} {split} {quantity.replace('_', ' ')} skew > {threshold}",
                    e.share_of_epochs(kind, split, quantity, threshold, epochs or [last]),
                )
            ],
            e.teacher_runs(kind),
        )

    return measure


def _last_skew(kind: str, split: str, quantity: str, absolute: bool):
    def measure(e: Evidence) -> Measured:
        last = e.last_epoch(kind)
        est = e.skew_at(kind, split, quantity, last, absolute=absolute)
        return Measured(
            [
                (
                    f"{'|skew|' if absolute else 'skew'} of {kind.upper()} {split} {quantity.replace('_', ' ')}, epoch {last}",
                    est,
                )
            ],
            e.teacher_runs(kind),
        )

    return measure


def _st_first(e: Evidence) -> Measured:
    """Epoch at which each kind's training-set gap mean first reaches half its final value."""

    def half_way(h: dict) -> int:
        final = h[max(h)]
        return min(ep for ep, v in sorted(h.items()) if v >= final / 2)

    st = [half_way(h) for h in e.history("st", "train", "gap", "mean")]
    at = [half_way(h) for h in e.history("at", "train", "gap", "mean")]
    diff = float(np.mean(at) - np.mean(st))
    se = ev.seed_se([a - s for a, s in zip(at, st)])
    est = ev.Estimate(
        diff,
        diff - max(ev.Z * se, 1),
        diff + max(ev.Z * se, 1),
        se or None,
        "epochs, ± 1 epoch resolution and seed spread",
    )
    return Measured(
        [("AT minus ST: epoch the training gap mean reaches half its final value", est)], e.teacher_runs("at", "st")
    )


def _late_similar(e: Evidence) -> Measured:
    last = e.last_epoch("at")
    return Measured(
        [(f"Cohen's d of AT over ST training-set gaps, epoch {last}", e.d_at("gap", "train", "at", "st", last))],
        e.teacher_runs("at", "st"),
    )


def _heldout_skewed_lower(e: Evidence) -> Measured:
    last = e.last_epoch("at")
    return Measured(
        [
            (f"skew of AT held-out gaps, epoch {last}", e.skew_at("at", "heldout", "gap", last)),
            (f"Cohen's d of ST over AT held-out gaps, epoch {last}", e.d_at("gap", "heldout", "st", "at", last)),
        ],
        e.teacher_runs("at", "st"),
    )


def _st_zero(dataset: str | None = None):
    def measure(e: Evidence) -> Measured:
        rows = [r for r in e.teachers("st", dataset) if r.get("adversarial") is not None]
        robust = sum(e.robust_counts(rows))
        est = e.teacher_accuracy("st", dataset=dataset)
        est = ev.Estimate(robust / sum(r["n"] for r in rows), est.lo, est.hi, est.se, est.how)
        return Measured(
            [("ST teachers' robust test images (share)", est)],
            e.teacher_runs("st", dataset=dataset),
            {"robust images": robust},
        )

    return measure


def _at_mitigates(e: Evidence) -> Measured:
    at, st = e.teacher_accuracy("at"), e.teacher_accuracy("st")
    return Measured(
        [
            (
                "Cohen's h, AT over ST adversarial accuracy",
                ev.effect_h([at.value], [st.value], e.teachers("at")[0]["n"], e.teachers("st")[0]["n"]),
            )
        ],
        e.teacher_runs("at", "st"),
        {"AT adversarial": at.value, "ST adversarial": st.value},
    )


def _table1(kind: str, metric: str, dataset: str):
    def measure(e: Evidence) -> Measured:
        return Measured(
            [(f"{kind.upper()} {metric} accuracy", e.teacher_accuracy(kind, metric, dataset))],
            e.teacher_runs(kind, dataset=dataset),
        )

    return measure


CLAIMS = [
    Claim(
        "max-logit-mean-much-lower",
        "4.1",
        "Figure 1",
        "we find that networks trained using adversarial training (AT) yield maximum logit values that are much smaller than those from networks trained with standard training methods (ST)",
        "Cohen's d of ST over AT max logits on the attacked test images at the teacher epoch",
        (w.large_effect("much smaller"),),
        _test_d("max_logit", "st", "at"),
    ),
    Claim(
        "max-logit-at-positive-skew",
        "4.1",
        "Figure 1",
        "The maximum logit values from robust networks are drawn from a distribution with a low mean and positive skew",
        "skewness of the AT teachers' test max logits at the teacher epoch",
        (w.positive_skew("positive skew"),),
        _test_skew("at", "max_logit"),
    ),
    Claim(
        "max-logit-st-more-symmetric",
        "4.1",
        "Figure 1",
        "whereas those from standard networks are drawn from a more symmetric distribution with a much larger mean",
        "|skew| of AT minus |skew| of ST test max logits (ST more symmetric: its |skew| is the smaller)",
        (w.above_zero("more symmetric", "AT's |skew| minus ST's"),),
        _more_symmetric,
    ),
    Claim(
        "gap-smaller",
        "4.1",
        "Figure 2A",
        'The "logit gap" (the difference between the maximum logit value and second largest value) is smaller in robust networks.',
        "Cohen's d of ST over AT logit gaps on the test images",
        (w.above_zero("smaller", "Cohen's d"),),
        _test_d("gap", "st", "at"),
    ),
    Claim(
        "gap-significantly-smaller",
        "4.1",
        "Figure 2A",
        "AT model logit gaps are significantly smaller than ST models with a peak at zero and few gaps larger than five.",
        "Cohen's d of ST over AT test logit gaps",
        (w.large_effect("significantly smaller"),),
        _test_d("gap", "st", "at"),
    ),
    Claim(
        "gap-peak-at-zero",
        "4.1",
        "Figure 2A",
        "AT model logit gaps are significantly smaller than ST models with a peak at zero and few gaps larger than five.",
        "share of AT test gaps in the first bin [0, 0.5) minus the next [0.5, 1): a peak at zero makes it positive",
        (w.above_zero("a peak at zero", "the first bin's share minus the second's"),),
        _peak_at_zero(),
    ),
    Claim(
        "gap-few-above-five",
        "4.1",
        "Figure 2A",
        "AT model logit gaps are significantly smaller than ST models with a peak at zero and few gaps larger than five.",
        "share of AT test gaps above 5",
        (Threshold("<", 0.05, "few gaps larger than five", "'few': under 5% of the gaps"),),
        _few_above_five(),
    ),
    Claim(
        "gap-at-positive-skew",
        "4.1",
        "Figure B.1",
        "AT models retain a small, positively skewed logit gap distribution until near convergence (Figure B.1)",
        "skewness of the AT teachers' test logit gaps at the teacher epoch",
        (w.positive_skew("positively skewed"),),
        _test_skew("at", "gap"),
    ),
    Claim(
        "large-gap-robust",
        "4.1",
        "Figure 2B",
        "In contrast to ST models, AT model's large logit gaps are a strong indicator of adversarial accuracy.",
        "AUROC of an AT teacher's clean gap for telling robust from non-robust correctly classified test images",
        (
            Threshold(
                ">",
                0.7,
                "strong indicator",
                "'strong': AUROC above 0.7, the usual floor of acceptable discrimination (Hosmer and Lemeshow)",
            ),
        ),
        _gap_predicts_robustness(),
    ),
    Claim(
        "small-gaps-not-robust",
        "4.1",
        "Figure 2B",
        "A smaller logit gap is, counter-intuitively, *less likely* to yield a robust response for a given example, but required to yield robust responses overall.",
        "AT adversarial accuracy on the quarter of test images with the smallest gaps minus on all of them",
        (w.below_zero("less likely"),),
        _small_gaps_not_robust,
    ),
    Claim(
        "st-zero-robust",
        "4.2",
        "Table 1",
        "we point out that it is far higher than a standard trained network, where we routinely measure 0 robust images using our suite of adversarial accuracy",
        "robust test images of the ST teachers (all seeds)",
        (w.no_example("0 robust images"),),
        _st_zero(),
        paper_values="Table 1: ST adversarial 0.00% ± 0.00%",
    ),
    Claim(
        "at-mitigates-attacks",
        "1",
        "Table 1",
        "Although adversarial training is successful at mitigating adversarial attacks, it hurts accuracy on the original input data",
        "Cohen's h of AT over ST adversarial accuracy",
        (w.large_effect("successful at mitigating", "h"),),
        _at_mitigates,
        paper_values="Table 1: AT 41.5% ± 0.63%, ST 0.00% ± 0.00% adversarial",
    ),
    Claim(
        "at-hurts-natural",
        "1",
        "Table 1",
        "Although adversarial training is successful at mitigating adversarial attacks, it hurts accuracy on the original input data",
        "ST minus AT natural test accuracy",
        (w.above_zero("hurts accuracy"),),
        lambda e: Measured(
            [
                (
                    "ST minus AT natural accuracy",
                    ev.difference(e.teacher_accuracy("st", "natural"), e.teacher_accuracy("at", "natural")),
                )
            ],
            e.teacher_runs("at", "st"),
        ),
    ),
    Claim(
        "table1-cifar10-at-adversarial",
        "4.1",
        "Table 1",
        "AT ResNet18 (Epoch 40) ... 41.5% ± 0.63%",
        "AT teachers' adversarial accuracy (APGD-CE then APGD-DLR), CIFAR-10",
        (w.paper_number("41.5% ± 0.63%", *within(0.415, 0.0063)),),
        _table1("at", "adversarial", "cifar10"),
        regimes=("paper-setup",),
        paper_values="41.5% ± 0.63%",
    ),
    Claim(
        "st-max-logit-symmetric",
        "4.1",
        "Figure 1",
        "Throughout standard training with the cross entropy loss function, the maximum logit value first increases across all examples, resulting in a nearly symmetric distribution with a high mean value.",
        "|skew| of the ST training-set max logits at the last epoch",
        (w.symmetric("nearly symmetric"),),
        _last_skew("st", "train", "max_logit", absolute=True),
    ),
    Claim(
        "at-max-logit-skewed-most-of-training",
        "4.1",
        "Figure 1",
        "In contrast, adversarial training more selectively increases a network's maximum logit value, producing a highly skewed distribution with a long positive tail throughout most of training.",
        "share of training epochs (each skew with its interval) whose AT training-set max-logit skew is above 1",
        (w.most("throughout most of training"),),
        _epochs_skewed("at", "train", "max_logit", 1.0, 1.0),
    ),
    Claim(
        "at-train-symmetric-late",
        "4.1",
        "Figure 1",
        "Interestingly, AT networks eventually converge to a largely symmetric, high mean distribution late in training while maintaining high robustness.",
        "|skew| of the AT training-set max logits at the last epoch",
        (w.symmetric("largely symmetric"),),
        _last_skew("at", "train", "max_logit", absolute=True),
        regimes=("long",),
    ),
    Claim(
        "at-test-skewed-at-convergence",
        "4.1",
        "Figure 1",
        "However, at convergence AT models continue to produce highly skewed maximum logit distributions on the test dataset.",
        "skew of the AT held-out max logits at the last epoch",
        (w.highly_skewed("highly skewed"),),
        _last_skew("at", "heldout", "max_logit", absolute=False),
        regimes=("long",),
    ),
    Claim(
        "st-gap-develops-faster",
        "4.1",
        "Figure B.1",
        "Throughout training, ST models more quickly develop a large, nearly symmetric logit gap distribution, while AT models retain a small, positively skewed logit gap distribution until near convergence (Figure B.1).",
        "epoch at which the training-set gap mean first reaches half its final value, AT minus ST",
        (w.above_zero("more quickly", "AT's epoch minus ST's"),),
        _st_first,
    ),
    Claim(
        "at-gap-skewed-until-convergence",
        "4.1",
        "Figure B.1",
        "Throughout training, ST models more quickly develop a large, nearly symmetric logit gap distribution, while AT models retain a small, positively skewed logit gap distribution until near convergence (Figure B.1).",
        "share of the first 90% of epochs whose AT training-set gap skew is above 0",
        (w.most("until near convergence"),),
        _epochs_skewed("at", "train", "gap", 0.0, 0.9),
    ),
    Claim(
        "train-gaps-similar-after-100",
        "B.1",
        "Figure B.1",
        "(A, B) ST and AT logit gap distributions on the training set become very similar after epoch 100.",
        "Cohen's d of AT over ST training-set gaps at the last epoch",
        (w.negligible("very similar"),),
        _late_similar,
        regimes=("long",),
    ),
    Claim(
        "test-gaps-stay-skewed-lower",
        "B.1",
        "Figure B.1",
        "(C) AT logit gap distribution on the testing set maintains a highly skewed, lower mean distribution.",
        "AT held-out gap skew at the last epoch; Cohen's d of ST over AT held-out gaps",
        (w.highly_skewed("highly skewed"), w.above_zero("lower mean", "Cohen's d")),
        _heldout_skewed_lower,
        regimes=("long",),
    ),
]
