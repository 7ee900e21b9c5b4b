"""Appendix B.2: CIFAR-100's statements, judged on the CIFAR-100 study (and, where they compare
the datasets, on both). CIFAR-10's rules are never run on CIFAR-100 results."""

from __future__ import annotations

import numpy as np

from robustlogits.study.reproduce import evidence as ev
from robustlogits.study.reproduce.claims import words as w
from robustlogits.study.reproduce.claims.base import Claim, Evidence, Measured, within
from robustlogits.study.reproduce.claims.logits import _gap_predicts_robustness, _peak_at_zero, _test_d

C100 = "cifar100"


def _early_skew(e: Evidence) -> Measured:
    last = e.last_epoch("at", C100)
    early = max(1, round(last / 4))
    at = e.skew_at("at", "train", "max_logit", early, C100)
    st = e.skew_at("st", "train", "max_logit", early, C100)
    return Measured(
        [(f"training-set max-logit skew at epoch {early}, AT minus ST", ev.difference(at, st))],
        e.teacher_runs("at", "st", dataset=C100),
    )


def _last_abs_skew(kind: str, dataset: str):
    def measure(e: Evidence) -> Measured:
        last = e.last_epoch(kind, dataset)
        return Measured(
            [
                (
                    f"|skew| of {kind.upper()} training-set max logits, epoch {last}",
                    e.skew_at(kind, "train", "max_logit", last, dataset, absolute=True),
                )
            ],
            e.teacher_runs(kind, dataset=dataset),
        )

    return measure


def _st_less_symmetric(e: Evidence) -> Measured:
    c100 = _last_abs_skew("st", C100)(e).estimates[0][1]
    c10 = _last_abs_skew("st", "cifar10")(e).estimates[0][1]
    return Measured(
        [("ST |skew| of training-set max logits, CIFAR-100 minus CIFAR-10", ev.difference(c100, c10))],
        e.teacher_runs("st", dataset=C100) + e.teacher_runs("st"),
    )


def _across(kind: str, quantity: str, larger: str):
    """Cohen's d of one dataset's test `quantity` over the other's, for `kind` teachers."""

    def measure(e: Evidence) -> Measured:
        c100, c10 = e.summaries(kind, quantity, C100), e.summaries(kind, quantity, "cifar10")
        pairs = list(zip(c100, c10)) if larger == C100 else list(zip(c10, c100))
        return Measured(
            [
                (
                    f"Cohen's d of {kind.upper()} test {quantity.replace('_', ' ')}, {'CIFAR-100 over CIFAR-10' if larger == C100 else 'CIFAR-10 over CIFAR-100'}",
                    ev.effect_d(pairs),
                )
            ],
            e.teacher_runs(kind, dataset=C100) + e.teacher_runs(kind),
            {
                "CIFAR-100 mean": float(np.mean([m for m, _, _ in c100])),
                "CIFAR-10 mean": float(np.mean([m for m, _, _ in c10])),
            },
        )

    return measure


def _both_larger(e: Evidence) -> Measured:
    st, at = _across("st", "max_logit", C100)(e), _across("at", "max_logit", C100)(e)
    return Measured(st.estimates + at.estimates, st.runs + at.runs)


def _table1(kind: str):
    def measure(e: Evidence) -> Measured:
        return Measured(
            [(f"{kind.upper()} natural accuracy, CIFAR-100", e.teacher_accuracy(kind, "natural", C100))],
            e.teacher_runs(kind, dataset=C100),
        )

    return measure


CLAIMS = [
    Claim(
        "c100-at-skewed-early",
        "B.2",
        "Figure B.4",
        "Similar to Figure 1, AT networks are more positively skewed with a long positive tail early in training.",
        "training-set max-logit skew a quarter into training, AT minus ST (CIFAR-100)",
        (w.above_zero("more positively skewed"),),
        _early_skew,
        dataset=C100,
    ),
    Claim(
        "c100-at-eventually-symmetric",
        "B.2",
        "Figure B.4",
        "Eventually, AT networks converge to an almost symmetric distribution.",
        "|skew| of the AT training-set max logits at the last epoch (CIFAR-100)",
        (w.symmetric("almost symmetric"),),
        _last_abs_skew("at", C100),
        dataset=C100,
        regimes=("long",),
    ),
    Claim(
        "c100-st-less-symmetric",
        "B.2",
        "Figure B.4",
        "In contrast to the CIFAR-10 results, the ST network is less symmetric and exhibits a slightly longer positive tail.",
        "ST |skew| of training-set max logits at the last epoch, CIFAR-100 minus CIFAR-10",
        (w.above_zero("less symmetric"),),
        _st_less_symmetric,
        dataset="both",
    ),
    Claim(
        "c100-larger-max-logits",
        "B.2",
        "Figure B.4",
        "Additionally, both ST and AT models have larger average maximum logits.",
        "Cohen's d of CIFAR-100 over CIFAR-10 test max logits: ST, then AT",
        (w.above_zero("larger average maximum logits", "Cohen's d"),),
        _both_larger,
        dataset="both",
    ),
    Claim(
        "c100-gap-peak-at-zero",
        "B.2",
        "Figure B.5",
        "Similar to the CIFAR-10 results in Figure 2, the CIFAR-100 AT network has a logit gap distribution with a distinct peak at zero and a quick decline for larger values.",
        "share of AT test gaps in [0, 0.5) minus in [0.5, 1) (CIFAR-100)",
        (w.above_zero("a distinct peak at zero", "the first bin's share minus the second's"),),
        _peak_at_zero(C100),
        dataset=C100,
    ),
    Claim(
        "c100-st-gaps-significantly-larger",
        "B.2",
        "Figure B.5",
        "The CIFAR-100 ST network still has significantly larger logit gaps than the AT network",
        "Cohen's d of ST over AT test logit gaps (CIFAR-100)",
        (w.large_effect("significantly larger"),),
        _test_d("gap", "st", "at", C100),
        dataset=C100,
    ),
    Claim(
        "c100-st-gap-below-cifar10",
        "B.2",
        "Figure B.5",
        "but the mean logit gap is noticeably less than the mean logit gap for CIFAR-10 ST networks.",
        "Cohen's d of CIFAR-10 over CIFAR-100 ST test gaps",
        (w.large_effect("noticeably less"),),
        _across("st", "gap", "cifar10"),
        dataset="both",
    ),
    Claim(
        "c100-large-gap-robust",
        "B.2",
        "Figure B.5",
        "In contrast to ST networks (with zero adversarial accuracy), AT network's large logit gaps are a strong indicator of adversarial accuracy.",
        "AUROC of the AT clean gap for robustness on correctly classified CIFAR-100 test images",
        (ev.Threshold(">", 0.7, "strong indicator", "'strong': AUROC above 0.7 (Hosmer and Lemeshow)"),),
        _gap_predicts_robustness(C100),
        dataset=C100,
    ),
    Claim(
        "table1-cifar100-st-natural",
        "4.1",
        "Table 1",
        "ResNet18 ... 76.1% ± 0.58%",
        "ST teachers' natural accuracy, CIFAR-100",
        (w.paper_number("76.1% ± 0.58%", *within(0.761, 0.0058)),),
        _table1("st"),
        dataset=C100,
        regimes=("paper-setup",),
        paper_values="76.1% ± 0.58% (our reading of Table 1's garbled CIFAR-100 column)",
    ),
    Claim(
        "table1-cifar100-at-natural",
        "4.1",
        "Table 1",
        "AT ResNet18 (Epoch 40) ... 49.1% ± 0.85%",
        "AT teachers' natural accuracy, CIFAR-100",
        (w.paper_number("49.1% ± 0.85%", *within(0.491, 0.0085)),),
        _table1("at"),
        dataset=C100,
        regimes=("paper-setup",),
        paper_values="49.1% ± 0.85% (our reading of Table 1's garbled CIFAR-100 column)",
    ),
]
