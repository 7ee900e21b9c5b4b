"""Estimates with their uncertainty, and how a threshold turns one into a verdict.

Two sources of noise sit behind every number the report shows: which test images were drawn
(binomial for an accuracy, the sampling error of a mean or a skewness), and which seed trained
the network (the spread over seeds). Seeds are evaluated on the same test images, so the image
noise does not shrink with more seeds; the two are added in quadrature: se^2 = se_images^2 +
var_seeds / n_seeds. Intervals are 95%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import stats

Z = 1.959964  # two-sided 95%
HELD, NOT_HELD, INCONCLUSIVE, OUT_OF_REGIME, NOT_MEASURED = (
    "held",
    "not held",
    "inconclusive",
    "out of regime",
    "not measured",
)
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE, OUT_OF_REGIME, NOT_MEASURED)


@dataclass(frozen=True)
class Estimate:
    """A measured value with a 95% interval; `se` where the interval is value ± 1.96 se."""

    value: float
    lo: float
    hi: float
    se: float | None = None
    how: str = ""  # what the interval accounts for

    def as_dict(self) -> dict:
        return {"value": self.value, "lo": self.lo, "hi": self.hi, "se": self.se, "how": self.how}


def normal(value: float, se: float, how: str) -> Estimate:
    return Estimate(value, value - Z * se, value + Z * se, se, how)


def seed_se(values: Sequence[float]) -> float:
    """Standard error of the mean over seeds (0 for one seed: nothing to measure it by)."""
    values = [v for v in values if v is not None]
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def _seeds_note(k: int) -> str:
    return f"{k} seeds" if k > 1 else "1 seed: no seed spread"


def wilson(successes: float, n: int) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sound at 0 and 1, unlike p ± 1.96 se)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(values: Sequence[float], n: int) -> Estimate | None:
    """Mean accuracy over seeds, each measured on the same `n` test images."""
    values = [v for v in values if v is not None]
    if not values or not n:
        return None
    p = float(np.mean(values))
    wlo, whi = wilson(p * n, n)
    s = seed_se(values)
    lo = p - math.hypot(p - wlo, Z * s)
    hi = p + math.hypot(whi - p, Z * s)
    return Estimate(p, max(0.0, lo), min(1.0, hi), s or None, f"Wilson over {n} images, {_seeds_note(len(values))}")


def sample_mean(means: Sequence[float], stds: Sequence[float], n: int) -> Estimate | None:
    """Mean over seeds of per-seed sample means of `n` values each."""
    pairs = [(m, s) for m, s in zip(means, stds) if m is not None and s is not None]
    if not pairs or not n:
        return None
    value = float(np.mean([m for m, _ in pairs]))
    se_images = math.sqrt(float(np.mean([s * s for _, s in pairs])) / n)
    se = math.hypot(se_images, seed_se([m for m, _ in pairs]))
    return normal(value, se, f"sampling error over {n} values, {_seeds_note(len(pairs))}")


def skew_se(n: int) -> float:
    """Standard error of the sample skewness (exact under normality; the usual large-n yardstick)."""
    if n < 4:
        return float("inf")
    return math.sqrt(6 * n * (n - 1) / ((n - 2) * (n + 1) * (n + 3)))


def sample_skew(skews: Sequence[float], n: int, absolute: bool = False) -> Estimate | None:
    values = [abs(v) if absolute else v for v in skews if v is not None]
    if not values or not n:
        return None
    se = math.hypot(skew_se(n), seed_se(values))
    return normal(float(np.mean(values)), se, f"skewness SE sqrt(6/n) over {n} values, {_seeds_note(len(values))}")


def cohens_d(a: tuple[float, float, int], b: tuple[float, float, int]) -> tuple[float, float]:
    """(d, se) of mean(a) - mean(b) in pooled standard deviations; a and b are (mean, std, n)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    pooled = math.sqrt(((na - 1) * sa * sa + (nb - 1) * sb * sb) / max(na + nb - 2, 1))
    d = (ma - mb) / pooled if pooled > 0 else (0.0 if ma == mb else math.copysign(math.inf, ma - mb))
    se = math.sqrt((na + nb) / (na * nb) + (d * d if math.isfinite(d) else 0) / (2 * (na + nb)))
    return d, se


def effect_d(pairs: Sequence[tuple[tuple[float, float, int], tuple[float, float, int]]]) -> Estimate | None:
    """Cohen's d averaged over seeds (one (a, b) pair of summaries per seed)."""
    found = [cohens_d(a, b) for a, b in pairs if None not in (*a, *b)]
    if not found:
        return None
    ds = [d for d, _ in found]
    se = math.hypot(math.sqrt(float(np.mean([s * s for _, s in found]))), seed_se(ds))
    return normal(float(np.mean(ds)), se, f"Cohen's d, {_seeds_note(len(found))}")


def effect_h(a: Sequence[float], b: Sequence[float], n_a: int, n_b: int) -> Estimate | None:
    """Cohen's h = 2 asin sqrt(p_a) - 2 asin sqrt(p_b) between two accuracies (mean over seeds)."""
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b or not n_a or not n_b:
        return None
    # seed by seed where both sides have one value per seed (students of seed s against teacher s)
    hs = [2 * math.asin(math.sqrt(x)) - 2 * math.asin(math.sqrt(y)) for x, y in zip(a, b)] if len(a) == len(b) else []
    h = 2 * math.asin(math.sqrt(float(np.mean(a)))) - 2 * math.asin(math.sqrt(float(np.mean(b))))
    se = math.hypot(math.sqrt(1 / n_a + 1 / n_b), seed_se(hs))
    return normal(h, se, f"Cohen's h, {n_a} and {n_b} images, {_seeds_note(min(len(a), len(b)))}")


def difference(a: Estimate, b: Estimate, how: str = "") -> Estimate:
    """a - b; the two intervals' half-widths added in quadrature on each side."""
    value = a.value - b.value
    lo = value - math.hypot(a.value - a.lo, b.hi - b.value)
    hi = value + math.hypot(a.hi - a.value, b.value - b.lo)
    se = math.hypot(a.se, b.se) if a.se is not None and b.se is not None else None
    return Estimate(value, lo, hi, se, how or f"difference; {a.how}")


def ratio(a: Estimate, b: Estimate) -> Estimate | None:
    """a / b, its interval the extreme quotients of the two intervals (conservative)."""
    if b.value <= 0:
        return None
    lo = a.lo / b.hi if b.hi > 0 else 0.0
    hi = a.hi / b.lo if b.lo > 0 else math.inf
    return Estimate(a.value / b.value, lo, hi, None, f"ratio, extreme quotients of the intervals; {a.how}")


def bootstrap(statistic, arrays: Sequence[np.ndarray], how: str, n_boot: int = 1000, seed: int = 0) -> Estimate:
    """Percentile bootstrap over the rows shared by `arrays` (one row per test image)."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    value = float(statistic(*arrays))
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        draws.append(statistic(*(a[idx] for a in arrays)))
    draws = np.asarray([d for d in draws if np.isfinite(d)])
    lo, hi = np.percentile(draws, [2.5, 97.5]) if len(draws) else (value, value)
    return Estimate(value, float(lo), float(hi), float(draws.std()) if len(draws) else None, how)


def pooled(estimates: Sequence[Estimate], how: str) -> Estimate | None:
    """Mean of per-seed estimates, each with its own interval; seed spread added in quadrature."""
    estimates = [e for e in estimates if e is not None]
    if not estimates:
        return None
    value = float(np.mean([e.value for e in estimates]))
    half_lo = math.sqrt(float(np.mean([(e.value - e.lo) ** 2 for e in estimates])))
    half_hi = math.sqrt(float(np.mean([(e.hi - e.value) ** 2 for e in estimates])))
    s = seed_se([e.value for e in estimates])
    return Estimate(
        value,
        value - math.hypot(half_lo, Z * s),
        value + math.hypot(half_hi, Z * s),
        None,
        f"{how}, {_seeds_note(len(estimates))}",
    )


def exact(value: float, how: str) -> Estimate:
    """A quantity with no sampling noise (a count, an epoch): its interval is the point."""
    return Estimate(value, value, value, 0.0, how)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` separating positive from negative rows."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    ranks = stats.rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass(frozen=True)
class Threshold:
    """What the paper's words require of a measured value, and where the number comes from.

    op: ">" (above), "<" (below), "in" (inside [low, high]), "zero" (exactly nothing measured)."""

    op: str
    value: float | tuple[float, float]
    words: str  # the words of the quote the threshold is derived from
    why: str  # the derivation, in a sentence

    def describe(self) -> str:
        if self.op == "in":
            low, high = self.value
            return f"in [{low:.4g}, {high:.4g}]"
        if self.op == "zero":
            return "= 0 (no example)"
        return f"{self.op} {self.value:.4g}"

    def decide(self, e: Estimate) -> str:
        """held when the whole interval meets the threshold, not held when none of it does."""
        if not all(math.isfinite(x) or abs(x) == math.inf for x in (e.value, e.lo, e.hi)) or math.isnan(e.value):
            return NOT_MEASURED
        if self.op == ">":
            return HELD if e.lo > self.value else NOT_HELD if e.hi <= self.value else INCONCLUSIVE
        if self.op == "<":
            return HELD if e.hi < self.value else NOT_HELD if e.lo >= self.value else INCONCLUSIVE
        if self.op == "in":
            low, high = self.value
            if low <= e.lo and e.hi <= high:
                return HELD
            return NOT_HELD if e.hi < low or e.lo > high else INCONCLUSIVE
        if self.op == "zero":
            return HELD if e.value == 0 else NOT_HELD
        raise ValueError(f"unknown threshold op {self.op!r}")


@dataclass
class Part:
    """One measured quantity of a claim against one threshold."""

    label: str
    estimate: Estimate
    threshold: Threshold

    @property
    def verdict(self) -> str:
        return self.threshold.decide(self.estimate)


@dataclass
class Finding:
    """What a claim's rule measured: its parts (all must hold), the runs, and notes."""

    parts: list[Part]
    runs: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)  # context: the raw quantities behind the parts
    note: str = ""

    @property
    def verdict(self) -> str:
        verdicts = [p.verdict for p in self.parts]
        if not verdicts or NOT_MEASURED in verdicts:
            return NOT_MEASURED
        if NOT_HELD in verdicts:
            return NOT_HELD
        return HELD if all(v == HELD for v in verdicts) else INCONCLUSIVE


@dataclass
class Missing:
    """A claim the study produced no numbers for, and why."""

    reason: str
