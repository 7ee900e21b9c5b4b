"""Section 4.1 (Figure 3), 4.3 and B.2: ST and AT networks differ image by image: which images they
are confident on, which classes they rank next, which images they place together."""

from __future__ import annotations

import math

import numpy as np

from robustlogits.study.reproduce import evidence as ev
from robustlogits.study.reproduce.claims import words as w
from robustlogits.study.reproduce.claims.base import Claim, Evidence, Measured, MissingData
from robustlogits.study.reproduce.evidence import Estimate, Missing, Threshold


def pair_estimate(stats: dict, n_images: int | None, values: list[float] | None = None) -> Estimate:
    """A mean over model pairs of a per-image average: the pairs' spread plus the images' noise
    (an average of values in [0, 1] over n images has a standard error of at most 0.5 / sqrt(n))."""
    mean = stats["mean"] if values is None else float(np.mean(values))
    std = stats["std"] if values is None else float(np.std(values))
    k = stats["n_pairs"]
    pairs = std / math.sqrt(k - 1) if k > 1 else 0.0
    images = 0.5 / math.sqrt(n_images) if n_images else 0.0
    return ev.normal(mean, math.hypot(pairs, images), f"{k} model pairs, ≤0.5/sqrt({n_images}) per-image noise")


def _group(summary: dict, name: str) -> dict:
    found = summary.get("group_stats", summary.get("group_curves", {})).get(name)
    if found is None:
        raise MissingData(f"{name} model pairs (need two seeds or more)")
    return found


def _ranks(e: Evidence) -> Measured:
    s = e.cross("ranks")
    cross, within_at = (
        pair_estimate(_group(s, "AT-ST"), s.get("n_images")),
        pair_estimate(_group(s, "AT-AT"), s.get("n_images")),
    )
    return Measured(
        [("far-apart share, AT-ST pairs minus AT-AT pairs", ev.difference(cross, within_at))],
        [s["run"]],
        {"AT-ST": cross.value, "AT-AT": within_at.value},
    )


def _rank_number(group: str):
    def measure(e: Evidence) -> Measured:
        s = e.cross("ranks")
        return Measured(
            [(f"far-apart share, {group} pairs", pair_estimate(_group(s, group), s.get("n_images")))], [s["run"]]
        )

    return measure


def _curve(s: dict, group: str, kind: str, ks: list[int] | None = None) -> Estimate:
    stats = _group(s, group).get(kind)
    if stats is None:
        raise MissingData(f"{group} {kind} overlap curves")
    idx = [k - 1 for k in (ks or range(1, len(stats["mean"]) + 1))]
    by_pair = [float(np.mean([v[i] for i in idx])) for v in _pair_curves(s, group, kind)]
    if by_pair:
        return pair_estimate({"n_pairs": len(by_pair)}, s.get("n_images"), by_pair)
    mean = float(np.mean([stats["mean"][i] for i in idx]))
    return ev.normal(mean, 0.5 / math.sqrt(s.get("n_images") or 1), "per-image noise bound")


def _pair_curves(s: dict, group: str, kind: str) -> list[list[float]]:
    source = s.get("pairs" if kind == "same_example" else "pairs_permuted_within_class", {})
    members = {tuple(p) for p in _group(s, group).get(kind, {}).get("pairs", [])}
    return [
        v
        for name, v in source.items()
        if tuple(name.split(" | ")) in members or tuple(reversed(name.split(" | "))) in members
    ]


def _overlap(a: str, b: str, kind: str, ks=None, dataset=None):
    def measure(e: Evidence) -> Measured:
        s = e.cross("overlap", dataset)
        x, y = _curve(s, a, kind, ks), _curve(s, b, kind, ks)
        span = f"k = {ks[0]}..{ks[-1]}" if ks else "all k"
        return Measured(
            [(f"AO@k ({kind.replace('_', ' ')}, {span}): {a} minus {b}", ev.difference(x, y))],
            [s["run"]],
            {a: x.value, b: y.value},
        )

    return measure


def _goes_away(e: Evidence) -> Measured:
    s = e.cross("overlap")
    solid = ev.difference(_curve(s, "AT-AT", "same_example"), _curve(s, "AT-ST", "same_example"))
    dashed = ev.difference(_curve(s, "AT-AT", "permuted_within_class"), _curve(s, "AT-ST", "permuted_within_class"))
    if solid.value <= 0:
        raise MissingData("an AT-AT over AT-ST overlap difference to go away (the solid lines do not differ that way)")
    r = ev.Estimate(
        dashed.value / solid.value,
        dashed.lo / solid.value,
        dashed.hi / solid.value,
        None,
        "dashed difference over the solid one",
    )
    return Measured(
        [("(AT-AT minus AT-ST) permuted within class, over the same on the same image", r)],
        [s["run"]],
        {"solid": solid.value, "dashed": dashed.value},
    )


def _degrades_more(dataset=None):
    def measure(e: Evidence) -> Measured:
        s = e.cross("overlap", dataset)
        at = ev.difference(_curve(s, "AT-AT", "same_example"), _curve(s, "AT-AT", "permuted_within_class"))
        st = ev.difference(_curve(s, "ST-ST", "same_example"), _curve(s, "ST-ST", "permuted_within_class"))
        return Measured(
            [("AO@k lost to permuting within class: AT-AT minus ST-ST", ev.difference(at, st))],
            [s["run"]],
            {"AT-AT loss": at.value, "ST-ST loss": st.value},
        )

    return measure


def _rank2(group: str, kind: str = "natural", chance_multiple: float = 2.0):
    def measure(e: Evidence) -> Measured:
        s = e.cross("errors")
        members = set(s["groups"].get(group, []))
        rows = [m for label, m in s["models"].items() if label in members and m.get(kind) is not None]
        if not rows:
            raise MissingData(f"{group} {kind} errors")
        n = sum(int(m.get(f"n_{kind}_errors") or 0) for m in rows) // max(len(rows), 1)
        share = ev.accuracy([m[kind][1] for m in rows], max(n, 1))
        chance = 1 / (len(s["classes"]) - 1)
        return Measured(
            [
                (
                    f"{group} share of {kind} errors on the class ranked 2nd, over chance",
                    ev.ratio(share, ev.exact(chance, "")),
                )
            ],
            [s["run"]],
            {"share": share.value, "chance 1/(C-1)": chance},
        )

    return measure


def _st_second_more(e: Evidence) -> Measured:
    s = e.cross("errors")
    out = {}
    for group in ("ST", "AT"):
        rows = [m for label, m in s["models"].items() if label in set(s["groups"].get(group, [])) and m.get("natural")]
        if not rows:
            raise MissingData(f"{group} natural errors")
        out[group] = ev.accuracy(
            [m["natural"][1] for m in rows], max(sum(int(m["n_natural_errors"]) for m in rows) // len(rows), 1)
        )
    return Measured(
        [("share of errors on the 2nd-ranked class: ST minus AT", ev.difference(out["ST"], out["AT"]))],
        [s["run"]],
        {g: v.value for g, v in out.items()},
    )


def _neighbours(group: str, versus: str | None = None):
    def measure(e: Evidence) -> Measured:
        s = e.cross("images")
        nb = s["neighbours"]
        n = int(nb.get("n_random_seeds") or 0) * int(nb.get("n_neighbours") or 1)

        def share(g):
            values = [nb["models"][m].get("same_class_fraction") for m in s["groups"].get(g, []) if m in nb["models"]]
            if not values or None in values:
                raise MissingData(f"{g} logit-space neighbours")
            return ev.accuracy(values, n)

        mine = share(group)
        if versus is None:
            return Measured([(f"{group}: share of the 5 nearest images of the seed's class", mine)], [s["run"]])
        other = share(versus)
        return Measured(
            [(f"same-class share of nearest images, {versus} minus {group}", ev.difference(other, mine))],
            [s["run"]],
            {group: mine.value, versus: other.value},
        )

    return measure


def _backgrounds(e: Evidence) -> Missing:
    return Missing("no measure of 'plain background' exists in the study; Figure B.2 is reproduced for reading by eye")


CLAIMS = [
    Claim(
        "ranks-differ",
        "4.1",
        "Figure 3B",
        "Standard networks and robust networks disagree significantly on which examples they classify confidently.",
        "share of test images ranked more than half a class apart: AT-ST pairs minus AT-AT pairs",
        (
            Threshold(
                ">",
                0.0,
                "disagree significantly",
                "statistically significant: the interval of the difference excludes 0",
            ),
        ),
        _ranks,
    ),
    Claim(
        "ranks-11.8",
        "4.1",
        "Figure 3B",
        "AT networks rank images very similarly to each other but very differently than ST networks, where an average of 11.8% of examples are ranked far apart.",
        "share of test images ranked far apart by AT-ST pairs",
        (w.paper_number("11.8%", 0.118 * 0.85, 0.118 * 1.15),),
        _rank_number("AT-ST"),
        regimes=("paper-setup",),
        paper_values="11.8% (AT-ST), 1.1% (AT-AT)",
    ),
    Claim(
        "ranks-at-consistent-1.1",
        "4.1",
        "Figure 3B",
        "AT networks were very consistent amongst themselves, however, differing greatly on only about 1.1% of images.",
        "share of test images ranked far apart by AT-AT pairs",
        (Threshold("in", (0.0, 0.011 * 1.15), "only about 1.1%", "'only about 1.1%': at most 15% above 1.1%"),),
        _rank_number("AT-AT"),
        regimes=("paper-setup",),
    ),
    Claim(
        "plain-backgrounds",
        "4.1",
        "Figure B.2",
        "Robust networks favor images on plain backgrounds while standard networks favor a more diverse set of examples.",
        "not measured: no background measure",
        (w.above_zero("favor images on plain backgrounds"),),
        _backgrounds,
    ),
    Claim(
        "errors-follow-mean-logits",
        "4.1",
        "Figure 3C",
        "For both ST and AT networks, the average logit vector strongly predicts which classes the network will predict when it is incorrect.",
        "share of natural errors on the class ranked 2nd by the true class's mean logit vector, over chance 1/(C-1): AT, then ST",
        (Threshold(">", 2.0, "strongly predicts", "'strongly': at least twice as often as chance"),),
        lambda e: Measured([_rank2("AT")(e).estimates[0], _rank2("ST")(e).estimates[0]], [e.cross("errors")["run"]]),
    ),
    Claim(
        "errors-adversarial-too",
        "4.1",
        "Figure 3C",
        "For both ST and AT networks, these non-max logit values can be used to predict the errors made on natural and adversarial images alike.",
        "share of adversarial errors on the 2nd-ranked class, over chance: AT, then ST",
        (Threshold(">", 1.0, "can be used to predict", "predictive: above chance"),),
        lambda e: Measured(
            [_rank2("AT", "adversarial")(e).estimates[0], _rank2("ST", "adversarial")(e).estimates[0]],
            [e.cross("errors")["run"]],
        ),
    ),
    Claim(
        "errors-st-second-class",
        "4.1",
        "Figure 3C",
        "ST networks often predict their second most probable class whereas AT slightly favor a broader set of classes.",
        "share of natural errors on the 2nd-ranked class, ST minus AT",
        (w.above_zero("whereas AT slightly favor a broader set of classes"),),
        _st_second_more,
    ),
    Claim(
        "overlap-at-at-above-at-st",
        "4.1",
        "Figure 3D",
        "Different seeds of AT networks have significantly more overlap than AT and ST networks (Figure 3D, solid lines).",
        "average overlap AO@k over all k, same image: AT-AT pairs minus AT-ST pairs",
        (Threshold(">", 0.0, "significantly more overlap", "statistically significant: the interval excludes 0"),),
        _overlap("AT-AT", "AT-ST", "same_example"),
    ),
    Claim(
        "overlap-difference-goes-away",
        "4.1",
        "Figure 3D",
        "This difference goes away if examples are compared with other images from the same class (dashed lines), suggesting that AT networks provide more diverse predictions to images from the same class.",
        "the AT-AT minus AT-ST overlap difference with images permuted within class, as a share of the same-image difference",
        (Threshold("<", 0.25, "goes away", "'goes away': less than a quarter of the difference remains"),),
        _goes_away,
    ),
    Claim(
        "overlap-at-less-consistent-permuted",
        "4.1",
        "Figure 3D",
        "To see this, we permuted the examples from each class and computed the AO@k again and found that AT networks showed less consistency than ST networks (Figure 3D, dashed lines).",
        "AO@k over all k with images permuted within class: ST-ST pairs minus AT-AT pairs",
        (w.above_zero("less consistency"),),
        _overlap("ST-ST", "AT-AT", "permuted_within_class"),
    ),
    Claim(
        "neighbours-st-same-class",
        "4.3",
        "Figure B.3",
        "In contrast, images nearby in the ST network's output space are diverse in appearance and primarily of the same class as the seed image.",
        "ST: share of the 5 cosine-nearest test images (in logit space) of the seed image's class",
        (w.most("primarily of the same class"),),
        _neighbours("ST"),
    ),
    Claim(
        "neighbours-at-across-classes",
        "4.3",
        "Figure B.3",
        "AT networks favor similar colors and shapes, at the expense of keeping images from different classes close together.",
        "share of nearest images of the seed's class: ST minus AT",
        (w.above_zero("images from different classes close together"),),
        _neighbours("AT", versus="ST"),
    ),
]

CIFAR100_CLAIMS = [
    Claim(
        "c100-overlap-st-above-at-below-10",
        "B.2",
        "Figure B.6",
        "In contrast to CIFAR-10, we find ST networks to have more overlap than AT networks for k < 10.",
        "AO@k for k < 10, same image: ST-ST pairs minus AT-AT pairs (CIFAR-100)",
        (w.above_zero("more overlap"),),
        _overlap("ST-ST", "AT-AT", "same_example", ks=list(range(1, 10)), dataset="cifar100"),
        dataset="cifar100",
    ),
    Claim(
        "c100-overlap-at-above-after-10",
        "B.2",
        "Figure B.6",
        "After k > 10, AT networks start to have more overlap than ST networks.",
        "AO@k for k > 10, same image: AT-AT pairs minus ST-ST pairs (CIFAR-100)",
        (w.above_zero("more overlap"),),
        _overlap("AT-AT", "ST-ST", "same_example", ks=list(range(11, 101)), dataset="cifar100"),
        dataset="cifar100",
    ),
    Claim(
        "c100-permuting-degrades-at-more",
        "B.2",
        "Figure B.6",
        "The AT network overlap has a larger degradation than ST network overlap when we permute the samples within each class.",
        "AO@k lost to permuting within class: AT-AT minus ST-ST (CIFAR-100)",
        (w.above_zero("larger degradation"),),
        _degrades_more("cifar100"),
        dataset="cifar100",
    ),
]
