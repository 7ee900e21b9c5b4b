"""How the paper's words become numbers: one convention per kind of word, used by every claim.

- Plain comparisons ("smaller", "lower", "more"): the effect is above 0.
- Intensified comparisons ("much", "far", "significantly", "dramatically", "strongly"): the effect
  is more than Cohen's "small" effect, d (continuous) or h (accuracies) > 0.2. The paper uses these
  words for differences of h = 0.42 (fix-1 below normal, correct-fix-1's natural accuracy) to 0.74
  (fix-1 above ST), all well above 0.2.
- "Similar", "very similar": |effect| < 0.2, Cohen's "negligible".
- Skewness (Bulmer, 1979): "symmetric" |skew| < 0.5, "highly skewed" skew > 1.
- "0%", "0 robust images", "not robust to any": see each claim; a reported "0%" rounds values below
  0.5%, "not ... any" means no example at all.
- "About x", "close to x": within 15% of x. "Almost 80%": 70-85%.
"""

from __future__ import annotations

from robustlogits.study.reproduce.evidence import Threshold

SMALL_EFFECT = 0.2
SYMMETRIC = 0.5
HIGHLY_SKEWED = 1.0
ROUNDS_TO_ZERO = 0.005


def above_zero(words: str, what: str = "the difference") -> Threshold:
    return Threshold(">", 0.0, words, f"a plain comparison: {what} is above 0")


def below_zero(words: str, what: str = "the difference") -> Threshold:
    return Threshold("<", 0.0, words, f"a plain comparison: {what} is below 0")


def large_effect(words: str, measure: str = "d") -> Threshold:
    return Threshold(
        ">",
        SMALL_EFFECT,
        words,
        f"an intensified comparison: Cohen's {measure} beyond a 'small' effect (0.2); "
        "the paper's own instances are h = 0.42-0.74",
    )


def negligible(words: str, measure: str = "d") -> Threshold:
    return Threshold(
        "in", (-SMALL_EFFECT, SMALL_EFFECT), words, f"'similar': |Cohen's {measure}| below 0.2, negligible"
    )


def symmetric(words: str) -> Threshold:
    return Threshold("<", SYMMETRIC, words, "Bulmer's convention: a distribution with |skew| < 0.5 is symmetric")


def highly_skewed(words: str) -> Threshold:
    return Threshold(">", HIGHLY_SKEWED, words, "Bulmer's convention: skew above 1 is highly skewed")


def positive_skew(words: str) -> Threshold:
    return Threshold(">", 0.0, words, "a positive skew: the sample skewness is above 0")


def rounds_to_zero(words: str) -> Threshold:
    return Threshold("<", ROUNDS_TO_ZERO, words, "a reported '0%' is a value that rounds to 0, below 0.5%")


def no_example(words: str) -> Threshold:
    return Threshold("zero", 0.0, words, "'not ... any' / '0 robust images': no attacked test image is robust")


def most(words: str) -> Threshold:
    return Threshold(">", 0.5, words, "'most' / 'primarily': more than half")


def paper_number(words: str, low: float, high: float) -> Threshold:
    return Threshold(
        "in", (low, high), words, "the reported mean ± 2 reported standard deviations (at least ± 1 point)"
    )
