"""A claim of the paper, the evidence it is judged on, and the regimes some claims depend on.

A claim is the paper's sentence (verbatim), where it stands, what we measure for it, and the
threshold(s) its words imply; `measure` reads the study's results and returns estimates with
intervals (one per threshold, or many against a single threshold, e.g. "at every epoch"). A claim
whose precondition the study's scale misses (a named regime) is reported `out of regime`, with
its numbers still shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import stats

from robustlogits.study.reproduce import evidence as ev
from robustlogits.study.reproduce.evidence import Estimate, Finding, Missing, Part, Threshold

PAPER_EPOCHS = 200  # A.2: every network trains for 200 epochs
TEACHER_ERROR = (0.196, 0.006)  # section 4.2: the AT teacher errs on 19.6% ± 0.6% of its training images
TEACHER_ERROR_WINDOW = (0.096, 0.296)  # "near" the paper's: within 10 points either way


@dataclass
class Measured:
    """Estimates (label, estimate) in the order of the claim's thresholds, and the runs behind them."""

    estimates: list[tuple[str, Estimate]]
    runs: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Claim:
    id: str
    section: str  # e.g. "4.1"
    where: str  # figure or table, e.g. "Figure 1"
    quote: str  # the paper's sentence, verbatim
    measured: str  # what the rule measures, in words
    thresholds: tuple[Threshold, ...]  # one per estimate, or one for all of them
    measure: Callable[[Evidence], Measured | Missing]
    dataset: str = "cifar10"  # "cifar10" (the study's main dataset), "cifar100" or "both"
    regimes: tuple[str, ...] = ()
    paper_values: str = ""  # the paper's own numbers for this claim, contradictions included

    def judge(self, evidence: Evidence) -> dict:
        """The claim's entry in report.json."""
        entry = {
            "id": self.id,
            "section": self.section,
            "where": self.where,
            "quote": self.quote,
            "measured": self.measured,
            "threshold": "; ".join(f"{t.describe()} (from “{t.words}”: {t.why})" for t in self.thresholds),
            "paper_values": self.paper_values,
            "parts": [],
            "runs": [],
            "numbers": {},
            "note": "",
        }
        try:
            found = self.measure(evidence)
        except MissingData as exc:
            found = Missing(str(exc))
        if not isinstance(found, Missing) and any(est is None for _, est in found.estimates):
            found = Missing("a quantity could not be estimated (no test-image count or no values)")
        if isinstance(found, Missing):
            return entry | {"verdict": ev.NOT_MEASURED, "note": found.reason, "interval": None, "se": None}
        thresholds = (
            self.thresholds
            if len(self.thresholds) == len(found.estimates)
            else self.thresholds[:1] * len(found.estimates)
        )
        finding = Finding([Part(label, e, t) for (label, e), t in zip(found.estimates, thresholds)], found.runs)
        verdict = finding.verdict
        unmet = [evidence.regime(name) for name in self.regimes]
        unmet = [r for r in unmet if r["met"] is False]
        if unmet and verdict != ev.NOT_MEASURED:
            verdict = ev.OUT_OF_REGIME
        first = found.estimates[0][1] if found.estimates else None
        return entry | {
            "verdict": verdict,
            "parts": [
                {"label": p.label, **p.estimate.as_dict(), "threshold": p.threshold.describe(), "verdict": p.verdict}
                for p in finding.parts
            ],
            "interval": [first.lo, first.hi] if first else None,
            "se": first.se if first else None,
            "runs": list(dict.fromkeys(found.runs)),
            "numbers": found.numbers,
            "note": found.note,
            "regimes_unmet": [r["name"] for r in unmet],
        }


class MissingData(Exception):
    """Raised by an evidence accessor when the study has no numbers for it."""


def need(value, what: str):
    if value is None or (isinstance(value, (list, dict, tuple)) and not value):
        raise MissingData(f"the study has no {what}")
    return value


class Evidence:
    """The study's results per dataset, with accessors that return estimates with intervals."""

    def __init__(self, studies: dict[str, dict], scale: str = ""):
        self.studies = studies
        self.scale = scale
        self.main = next((d for d in studies if d != "cifar100"), None)

    def study(self, dataset: str | None = None) -> dict:
        name = self.main if dataset in (None, "cifar10") else dataset
        return need(self.studies.get(name), f"results for {dataset or 'the main dataset'}")

    # --- teachers -------------------------------------------------------------------------------

    def teachers(self, kind: str, dataset: str | None = None) -> list[dict]:
        return need(self.study(dataset)["teachers"].get(kind), f"{kind.upper()} teachers")

    def teacher_runs(self, *kinds: str, dataset: str | None = None) -> list[str]:
        return [r[k] for kind in kinds for r in self.teachers(kind, dataset) for k in ("train_run", "run") if r.get(k)]

    def teacher_accuracy(self, kind: str, metric: str = "adversarial", dataset: str | None = None) -> Estimate:
        rows = [r for r in self.teachers(kind, dataset) if r.get(metric) is not None]
        need(rows, f"{kind.upper()} teacher attacks")
        return ev.accuracy([r[metric] for r in rows], rows[0]["n"])

    def robust_counts(self, rows: list[dict]) -> list[int]:
        return [round(r["adversarial"] * r["n"]) for r in rows]

    def tests(self, kind: str, dataset: str | None = None) -> list[dict[str, np.ndarray]]:
        """Per seed, the attacked test images' clean max logits, gaps, correctness and robustness."""
        return need([r["test"] for r in self.teachers(kind, dataset) if "test" in r], f"{kind.upper()} test logits")

    def summaries(self, kind: str, quantity: str, dataset: str | None = None) -> list[tuple[float, float, int]]:
        return [
            (float(t[quantity].mean()), float(t[quantity].std(ddof=1)), len(t[quantity]))
            for t in self.tests(kind, dataset)
        ]

    def test_mean(self, kind: str, quantity: str, dataset: str | None = None) -> Estimate:
        s = self.summaries(kind, quantity, dataset)
        return ev.sample_mean([m for m, _, _ in s], [sd for _, sd, _ in s], s[0][2])

    def test_skew(self, kind: str, quantity: str, dataset: str | None = None, absolute: bool = False) -> Estimate:
        tests = self.tests(kind, dataset)
        skews = [float(stats.skew(t[quantity])) for t in tests]
        return ev.sample_skew(skews, len(tests[0][quantity]), absolute)

    def d(self, quantity: str, a: str, b: str, dataset: str | None = None) -> Estimate:
        """Cohen's d of a's test-image `quantity` over b's, seed by seed."""
        return ev.effect_d(list(zip(self.summaries(a, quantity, dataset), self.summaries(b, quantity, dataset))))

    # --- training histories ----------------------------------------------------------------------

    def epochs(self, dataset: str | None = None) -> int:
        rows = self.teachers("at", dataset)
        return need(rows[0].get("epochs"), "teacher training length")

    def history(self, kind: str, split: str, quantity: str, stat: str, dataset: str | None = None) -> list[dict]:
        """Per seed, {epoch: value} of a training run's per-epoch statistic on 'train' or 'heldout'."""
        found = [r["history"].get(f"{split}_{quantity}_{stat}") for r in self.teachers(kind, dataset) if "history" in r]
        return need([h for h in found if h], f"per-epoch {split} {quantity} {stat} of the {kind.upper()} teachers")

    def split_size(self, kind: str, split: str, dataset: str | None = None) -> int:
        sizes = [r.get("sizes", {}).get(split) for r in self.teachers(kind, dataset)]
        return need(next((s for s in sizes if s), None), f"the size of the {split} statistics split")

    def skew_at(self, kind: str, split: str, quantity: str, epoch: int, dataset=None, absolute=False) -> Estimate:
        values = [h.get(epoch, h[max(h)]) for h in self.history(kind, split, quantity, "skew", dataset)]
        return ev.sample_skew(values, self.split_size(kind, split, dataset), absolute)

    def mean_at(self, kind: str, split: str, quantity: str, epoch: int, dataset=None) -> tuple[float, float, int]:
        means = self.history(kind, split, quantity, "mean", dataset)
        stds = self.history(kind, split, quantity, "std", dataset)
        n = self.split_size(kind, split, dataset)
        return (
            float(np.mean([h.get(epoch, h[max(h)]) for h in means])),
            float(np.mean([h.get(epoch, h[max(h)]) for h in stds])),
            n,
        )

    def d_at(self, quantity: str, split: str, a: str, b: str, epoch: int, dataset=None) -> Estimate:
        return ev.effect_d(
            [(self.mean_at(a, split, quantity, epoch, dataset), self.mean_at(b, split, quantity, epoch, dataset))]
        )

    def last_epoch(self, kind: str, dataset: str | None = None) -> int:
        return max(self.history(kind, "train", "max_logit", "mean", dataset)[0])

    def share_of_epochs(self, kind: str, split: str, quantity: str, threshold: float, epochs: list[int]) -> Estimate:
        """Share of `epochs` whose skew is above `threshold`: the point counts estimates, the interval
        counts epochs whose whole interval is above (low end) or any of it is (high end)."""
        n = self.split_size(kind, split)
        histories = self.history(kind, split, quantity, "skew")
        lo = point = hi = 0
        for e in epochs:
            est = ev.sample_skew([h[e] for h in histories if e in h], n)
            if est is None:
                continue
            point += est.value > threshold
            lo += est.lo > threshold
            hi += est.hi > threshold
        k = len(epochs)
        return Estimate(point / k, lo / k, hi / k, None, f"{k} epochs, each skew with its interval")

    # --- students ----------------------------------------------------------------------------------

    def students(self, label: str) -> list[dict]:
        rows = self.study()["students"].get(label, [])
        return need([r for r in rows if r.get("adversarial") is not None], f"{label} students")

    def student_accuracy(self, label: str, metric: str = "adversarial") -> Estimate:
        rows = self.students(label)
        return ev.accuracy([r[metric] for r in rows], rows[0]["n"])

    def student_runs(self, *labels: str) -> list[str]:
        return [r["run"] for label in labels for r in self.study()["students"].get(label, [])]

    def fix_ks(self, mode: str) -> list[int]:
        return sorted(int(label.split("-k")[1]) for label in self.study()["students"] if label.startswith(f"{mode}-k"))

    def sweep(self) -> dict:
        return need(self.study()["sweeps"], "A.6/A.7 sweep students")

    def sweep_accuracy(self, epoch: int, loss: str, metric: str = "adversarial") -> Estimate:
        rows = [r for (s, e, lo), r in self.sweep().items() if e == epoch and lo == loss and r.get(metric) is not None]
        need(rows, f"sweep students of the epoch-{epoch} teacher ({loss})")
        return ev.accuracy([r[metric] for r in rows], rows[0]["n"])

    def sweep_epochs(self, loss: str = "l1") -> list[int]:
        return sorted({e for (_, e, lo) in self.sweep() if lo == loss})

    def sweep_runs(self) -> list[str]:
        return [r["run"] for r in self.sweep().values()]

    def nearest_epoch(self, paper_epoch: int, loss: str = "l1") -> int:
        """The swept checkpoint at the paper epoch's place in training (epoch 100 of 200 = halfway)."""
        target = paper_epoch / PAPER_EPOCHS * self.epochs()
        return min(self.sweep_epochs(loss), key=lambda e: (abs(e - target), e))

    # --- analyses -----------------------------------------------------------------------------------

    def cross(self, analysis: str, dataset: str | None = None) -> dict:
        return need(self.study(dataset)["cross"].get(analysis), f"{analysis} analysis")

    def manifolds(self) -> dict[int, dict]:
        return need(self.study().get("manifold"), "manifold analysis")

    def manifold_runs(self) -> list[str]:
        return [m["run"] for m in self.manifolds().values()]

    def manifold_values(self, role: str, measure: str) -> list[list[float]]:
        """Per seed, the per-stage values of `measure` for the network in `role`."""
        found = [m["models"][role][measure] for m in self.manifolds().values() if role in m["models"]]
        return need(found, f"manifold {measure} of the {role}")

    # --- regimes --------------------------------------------------------------------------------------

    def regime(self, name: str) -> dict:
        """Whether the study meets a precondition: {"name", "met" (True/False/None), "what", "measured"}."""
        return REGIMES[name](self)


def _teacher_regime(e: Evidence) -> dict:
    what = (
        "the AT teacher errs on its training images about as often as the paper's (19.6% ± 0.6%, section 4.2; "
        f"we accept {100 * TEACHER_ERROR_WINDOW[0]:.1f}-{100 * TEACHER_ERROR_WINDOW[1]:.1f}%): the distillation "
        "claims rest on what those errors carry"
    )
    try:
        study = e.study()
    except MissingData:
        return {"name": "teacher", "met": None, "what": what, "measured": "no study"}
    errors = [
        r["teacher_error"] for rows in study["students"].values() for r in rows if r.get("teacher_error") is not None
    ]
    if not errors:
        errors = [r["train_error"] for r in study["teachers"].get("at", []) if r.get("train_error") is not None]
    if not errors:
        return {"name": "teacher", "met": None, "what": what, "measured": "not measured"}
    error = float(np.mean(errors))
    low, high = TEACHER_ERROR_WINDOW
    return {"name": "teacher", "met": low <= error <= high, "what": what, "measured": f"{100 * error:.1f}%"}


def _long_regime(e: Evidence) -> dict:
    what = "the teachers train past epoch 100 of a 200-epoch schedule (the paper's 'late in training', after its first learning-rate decay)"
    try:
        epochs = e.epochs()
    except MissingData:
        return {"name": "long", "met": None, "what": what, "measured": "not measured"}
    return {"name": "long", "met": epochs >= PAPER_EPOCHS, "what": what, "measured": f"{epochs} epochs"}


def _paper_setup_regime(e: Evidence) -> dict:
    what = "the paper's setup (A.2: ResNet-18 trained 200 epochs, the whole test set attacked): only there can our numbers be compared with the paper's"
    try:
        rows = e.teachers("at")
    except MissingData:
        return {"name": "paper-setup", "met": None, "what": what, "measured": "not measured"}
    arch, epochs, n = rows[0].get("arch"), rows[0].get("epochs"), rows[0].get("n")
    met = arch == "resnet18" and epochs == PAPER_EPOCHS and (n or 0) >= 10000
    return {
        "name": "paper-setup",
        "met": met,
        "what": what,
        "measured": f"{arch}, {epochs} epochs, {n} test images attacked",
    }


# Appendix A.2's setup, aspect by aspect, as the report names where a study departs from it.
PAPER_SETUP = {
    "network": "ResNet-18",
    "training": "200 epochs, learning rate divided by 10 at epochs 100 and 150",
    "adversary": "PGD-10 (8/255, step 2/255)",
    "teacher epoch": "epoch 40 of 200",
    "students": "ResNet-18, 200 epochs",
    "attacked images": "the whole test split (10,000)",
    "ST teacher": "the AT teacher's recipe without the adversary",
}
STUDENT_ASPECTS = ("teacher epoch", "students")  # only claims about distillation depend on these


def setup_differences(e: Evidence) -> dict[str, str]:
    """{aspect: what this study did} for every aspect of A.2's setup it departs from."""
    try:
        teacher = e.teachers("at")[0]
    except MissingData:
        return {}
    found: dict[str, str] = {}
    arch, epochs = teacher.get("arch"), teacher.get("epochs")
    if arch and arch != "resnet18":
        found["network"] = str(arch)
    schedule = teacher.get("schedule") or "step"
    if epochs and (epochs != PAPER_EPOCHS or schedule != "step"):
        found["training"] = f"{epochs} epochs, {'one-cycle' if schedule == 'onecycle' else schedule} schedule"
    method, steps = teacher.get("adversary"), teacher.get("adversary_steps")
    if method == "fgsm":
        found["adversary"] = "FGSM with random start (one step of 1.25 eps)"
    elif method and steps and steps != 10:
        found["adversary"] = f"PGD-{steps}"
    epoch = teacher.get("epoch")
    if epoch and epochs and (epoch, epochs) != (40, PAPER_EPOCHS):
        found["teacher epoch"] = f"epoch {epoch} of {epochs}"
    students = [r for rows in e.study()["students"].values() for r in rows]
    student_epochs = {r["epochs"] for r in students if r.get("epochs")}
    student_archs = {r["arch"] for r in students if r.get("arch")}
    if (student_epochs and student_epochs != {PAPER_EPOCHS}) or (student_archs and student_archs != {"resnet18"}):
        found["students"] = ", ".join(sorted(student_archs) + [f"{n} epochs" for n in sorted(student_epochs)])
    if teacher.get("n") and teacher["n"] < 10000:
        found["attacked images"] = f"{teacher['n']:,} stratified test images"
    recipe = _recipe_difference(e, teacher)
    if recipe:
        found["ST teacher"] = recipe
    return found


def _recipe_difference(e: Evidence, at: dict) -> str:
    """How the ST teacher's training differs from the AT teacher's, beyond the adversary ('' if not)."""
    try:
        st = e.teachers("st")[0]
    except MissingData:
        return ""
    a, s = at.get("recipe") or {}, st.get("recipe") or {}
    changed = [k for k in s if k in a and s[k] != a[k]]
    if not changed:
        return ""
    return ", ".join(f"{k.split('.', 1)[1]} {s[k]} (AT {a[k]})" for k in changed)


REGIMES: dict[str, Callable[[Evidence], dict]] = {
    "teacher": _teacher_regime,
    "long": _long_regime,
    "paper-setup": _paper_setup_regime,
}


def within(paper_mean: float, paper_sd: float) -> tuple[float, float]:
    """The range a reproduced mean must fall in to match a reported mean ± sd (fractions):
    two reported standard deviations, and never narrower than 1 point either side."""
    half = max(2 * paper_sd, 0.01)
    return paper_mean - half, paper_mean + half


def slope(ks: list[int], estimates: list[Estimate]) -> Estimate:
    """Weighted least-squares slope of estimates against k, with its standard error."""
    x = np.asarray(ks, dtype=float)
    y = np.asarray([e.value for e in estimates])
    w = np.asarray([1 / max(((e.hi - e.lo) / (2 * ev.Z)) ** 2, 1e-12) for e in estimates])
    xm = (w * x).sum() / w.sum()
    sxx = (w * (x - xm) ** 2).sum()
    b = (w * (x - xm) * (y - (w * y).sum() / w.sum())).sum() / sxx
    return ev.normal(float(b), math.sqrt(1 / sxx), f"weighted least-squares slope over k = {ks}")
