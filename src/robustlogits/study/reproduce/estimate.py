"""Time estimates for a reproduce plan, from a short probe of each architecture on this machine.

The probe times what every step is made of, on random CIFAR-sized images at the training batch
size (capped) and as training runs them (channels-last, bf16 where training uses it): an SGD step
(forward, backward, update), one gradient step with respect to the input under the training
precision (what PGD / FGSM-RS training repeats) and in fp32 (what APGD repeats), and an evaluation
forward. Each is timed `REPEATS` times after a warm-up, and the plan is costed at the fastest,
median and slowest repeat: the spread says how steady this machine is right now. Finished runs in
the store are not used: one run on a busy machine would mislead every later estimate.

A stage run by N local workers is probed at each worker's share of the cores (the threads the study
engine gives it), alone: N workers then share memory bandwidth the probe did not, so its time per
step is a floor there.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from robustlogits.config import distill_preset, flatten
from robustlogits.study.reproduce.plan import Step

REPEATS = 5
PROBE_BATCH_CAP = 256  # per-image cost hardly changes above it on a CPU; the probe stays seconds
# AutoAttack runs APGD-CE on the examples the model classifies correctly and APGD-DLR on those CE left
# robust, so an attack costs n_iter gradient steps per (correct + CE-robust) example. Before a model
# exists the shares are taken from the paper's CIFAR-10 tables: AT 41.5% adversarial (Table 1; CE leaves
# a few points more than both attacks), students from the normal one's 75% / 30% to correct-fix-1's
# 92% / 0% (Table 2), every ST net at 0% adversarial. Table 1's natural accuracies are illegible in our
# copy: 90% (ST) and 80% (AT) sit between a ResNet-18's and the laptop teachers' (86% and about 70%).
ATTACKED_SHARE = {  # run.training or "student" -> (share attacked by APGD-CE, share left for APGD-DLR)
    "standard": (0.9, 0.0),
    "adversarial": (0.8, 0.45),
    "student": (0.8, 0.3),
}
ANALYSIS_SECONDS = 5.0  # reading artifacts, figures, logging
SPREAD = ("fastest", "median", "slowest")


@dataclass(frozen=True)
class Probe:
    """Seconds per image of one architecture, each as (fastest, median, slowest) repeat."""

    sgd: tuple[float, float, float]  # forward + backward + update, training precision
    input_grad: tuple[float, float, float]  # one attack step in training precision
    input_grad_fp32: tuple[float, float, float]  # one APGD step (attacks run in fp32)
    forward: tuple[float, float, float]  # evaluation / logits, fp32, no gradient
    batch: int
    precision: str
    load: float  # the machine's 1-minute load average while probing: a busy machine probes slow
    stage_widths: tuple[int, ...] = ()  # features at each analysed stage (input ... logits)
    threads: int = 0  # torch threads it ran on

    def describe(self) -> str:
        return (
            f"{1 / self.sgd[1]:,.0f} img/s per SGD step ({1 / self.sgd[2]:,.0f}-{1 / self.sgd[0]:,.0f} over "
            f"{REPEATS} repeats, batch {self.batch}, {self.precision}; probed at load {self.load:.1f} on "
            f"{self.threads} thread(s) of {os.cpu_count()} cores)"
        )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with `threads` torch threads (None: as they are), as a worker given that share would."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _timed(fn, batch: int) -> tuple[float, float, float]:
    fn()  # warm-up: allocation, kernel choice
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) / batch)
    return min(times), statistics.median(times), max(times)


def probe(
    arch: str, num_classes: int = 10, batch: int = 128, amp_setting: str = "auto", threads: int | None = None
) -> Probe:
    """Time the four operations a study is made of for `arch` on this machine, at the precision
    `amp_setting` (a config's `run.amp`) gives here, on `threads` torch threads (None: as set)."""
    with torch_threads(threads) as used:
        return _probe(arch, num_classes, batch, amp_setting, used)


def _probe(arch: str, num_classes: int, batch: int, amp_setting: str, threads: int) -> Probe:
    from robustlogits.core.device import precision_name, resolve_amp
    from robustlogits.core.models import build_model, extract_stages

    batch = min(batch, PROBE_BATCH_CAP)
    amp = resolve_amp(amp_setting, torch.device("cpu"))
    model = build_model(arch, num_classes, "cifar10").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))

    def loss_of(inputs, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return torch.nn.functional.cross_entropy(model(inputs).float(), y)

    def sgd():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_of(x, amp).backward()
        opt.step()

    def input_grad(bf16):
        def step():
            model.eval()
            delta = x.clone().requires_grad_(True)
            torch.autograd.grad(loss_of(delta, bf16), delta)

        return step

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    return Probe(
        sgd=_timed(sgd, batch),
        input_grad=_timed(input_grad(amp), batch),
        input_grad_fp32=_timed(input_grad(False), batch),
        forward=_timed(forward, batch),
        batch=batch,
        precision=precision_name(amp),
        load=os.getloadavg()[0],
        stage_widths=tuple(f.shape[1] for f in extract_stages(model.eval(), x[:1]).values()),
        threads=threads,
    )


def synthetic_manifolds(n_manifolds: int, n_features: int, n_points: int, seed: int = 0) -> np.ndarray:
    """(P, N, M) clouds shaped like a stage's features of perturbed test images: P images of 10 classes,
    each centre its class's mean plus its own offset, each cloud spread over a few directions with a
    decaying spectrum (PGD moves along a handful). The fit's cost hangs on that structure: centres with
    no shared part or isotropic clouds fit several times faster than real features."""
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((10, n_features))
    centres = classes[np.arange(n_manifolds) % 10] + 0.5 * rng.standard_normal((n_manifolds, n_features))
    rank = min(n_points, n_features, 8)
    spectrum = 0.3 * 0.6 ** np.arange(rank)
    directions = rng.standard_normal((n_manifolds, n_features, rank)) / np.sqrt(n_features)
    coefficients = rng.standard_normal((n_manifolds, rank, n_points)) * spectrum[None, :, None]
    return centres[:, :, None] + np.sqrt(n_features) * directions @ coefficients


def mftma_probe(n_manifolds: int, n_features: int, n_points: int) -> float:
    """Seconds of one MFTMA fit at Figure 5's settings on synthetic clouds of this shape: the manifold
    step's cost beyond its PGD points. Timed once (about 11 s at the laptop's 50 x 500 x 50)."""
    from robustlogits.config import ManifoldConfig
    from robustlogits.core.mftma import manifold_analysis

    settings = ManifoldConfig()
    X = synthetic_manifolds(n_manifolds, n_features, n_points)
    start = time.perf_counter()
    manifold_analysis(
        X,
        kappa=settings.kappa,
        n_t=settings.n_t,
        seed=settings.seed,
        center_method=settings.center_method,
        center_reps=settings.center_reps,
        definitions=settings.definitions,
    )
    return time.perf_counter() - start


def attack_steps(config: dict) -> int:
    """Gradient steps of the training-time attack: FGSM-RS takes one whatever `adversary.steps` says."""
    return 1 if config.get("adversary.method") == "fgsm" else int(config.get("adversary.steps", 0))


class Estimator:
    """Seconds per step at one point of the probe's spread (0 fastest, 1 median, 2 slowest)."""

    def __init__(self):
        self.probes: dict[tuple[str, str, int | None], Probe] = {}  # (arch, run.amp, threads) -> its probe
        self.threads: int | None = None  # of the stage being costed: its workers' share of the cores
        self.targets_costed: set[tuple] = set()  # teacher-logit artifacts already paid for, per spread point
        self.mftma_fits: dict[tuple[int, int, int], float] = {}  # (P, N, M) -> seconds of one fit

    def probe(self, config: dict) -> Probe:
        arch, amp = config["model.arch"], str(config.get("run.amp", "auto"))
        if (arch, amp, self.threads) not in self.probes:
            self.probes[arch, amp, self.threads] = probe(
                arch, batch=int(config["optim.batch_size"]), amp_setting=amp, threads=self.threads
            )
        return self.probes[arch, amp, self.threads]

    def seconds(self, step: Step, at: int, model_configs: dict[str, dict]) -> float:
        if step.task == "reproduce-train":
            return self._train(step.args["config"], at)
        if step.task == "reproduce-attack":
            config = model_configs[step.needs["model"]]
            return self.attack(config, config["run.training"], step.args["n_examples"], step.args["n_iter"], at)
        if step.task == "reproduce-distill":
            config = flatten(distill_preset(step.args["preset"]))
            p = self.probe(config)
            n = _n_train(config)
            return (
                config["optim.epochs"] * n * p.sgd[at]
                + config["optim.epochs"] * _eval_images(config) * p.forward[at]
                + self._targets(step, config, n, at, model_configs)
                + self.attack(config, "student", step.args["n_examples"], step.args["n_iter"], at)
            )
        if step.task == "reproduce-manifold":
            return ANALYSIS_SECONDS + sum(self._manifold(c, step.args, at) for c in _models(step, model_configs))
        if step.task == "reproduce-gap-response":  # PGD-10 from the clean image, then a clean pass
            n = step.args["n_images"]
            return ANALYSIS_SECONDS + sum(
                n * (10 * self.probe(c).input_grad_fp32[at] + self.probe(c).forward[at])
                for c in _models(step, model_configs)
            )
        return ANALYSIS_SECONDS

    def _manifold(self, config: dict, a: dict, at: int) -> float:
        """One network of Figure 5: PGD points in each image's ball, their features at every stage, and an
        MFTMA fit per stage on at most `n_features` of them (random projection)."""
        p = self.probe(config)
        points = a["n_images"] * a["n_perturbations"]
        fits = sum(self.mftma(a["n_images"], min(w, a["n_features"]), a["n_perturbations"]) for w in p.stage_widths)
        steadiness = p.sgd[at] / p.sgd[1]  # one fit is timed: the SGD probe's spread says how steady the machine is
        return points * (a["pgd_steps"] * p.input_grad_fp32[at] + p.forward[at]) + fits * steadiness

    def mftma(self, n_manifolds: int, n_features: int, n_points: int) -> float:
        if (n_manifolds, n_features, n_points) not in self.mftma_fits:
            self.mftma_fits[n_manifolds, n_features, n_points] = mftma_probe(n_manifolds, n_features, n_points)
        return self.mftma_fits[n_manifolds, n_features, n_points]

    def _targets(self, step: Step, config: dict, n: int, at: int, model_configs: dict[str, dict]) -> float:
        """The teachers' averaged logits, paid by the first student of each teacher checkpoint only:
        later students reuse the keyed artifact. Costed with the teacher's network, not the student's."""
        seconds = 0.0
        for role in ("teacher", "st_teacher"):
            teacher = step.needs.get(role)
            if teacher is None:
                continue
            epoch = step.args["teacher_epoch"] if role == "teacher" else step.args.get("st_teacher_epoch")
            key = (teacher, epoch, config["distill.n_augment"], at)
            if key in self.targets_costed:
                continue
            self.targets_costed.add(key)
            teacher_probe = self.probe(model_configs[teacher]) if teacher in model_configs else self.probe(config)
            seconds += config["distill.n_augment"] * n * teacher_probe.forward[at]
        return seconds

    def attack(self, config: dict, kind: str, n: int | None, n_iter: int, at: int) -> float:
        """APGD-CE then APGD-DLR on `n` test images (all 10,000 when None), plus the clean pass."""
        correct, robust = ATTACKED_SHARE[kind]
        p = self.probe(config)
        n = n or 10000
        return n * n_iter * (correct + robust) * p.input_grad_fp32[at] + n * p.forward[at]

    def _train(self, config: dict, at: int) -> float:
        p = self.probe(config)
        epochs = config["optim.epochs"]
        per_image = p.sgd[at]
        if config["run.training"] == "adversarial":
            per_image += attack_steps(config) * p.input_grad[at]
        monitor = 0.0
        if config["monitor.robust_every"]:
            monitor = (
                (epochs // config["monitor.robust_every"])
                * config["monitor.robust_examples"]
                * config["monitor.robust_steps"]
                * p.input_grad_fp32[at]
            )
        checkpoints = len(config["run.checkpoint_epochs"]) * 10000 * p.forward[at]  # full test logits
        return (
            epochs * _n_train(config) * per_image
            + epochs * _eval_images(config) * p.forward[at]
            + monitor
            + checkpoints
        )


def _models(step: Step, model_configs: dict[str, dict]) -> list[dict]:
    """The configs of the networks an analysis reads (a model the plan does not build: its first teacher's)."""
    fallback = next(iter(model_configs.values()), None)
    configs = [model_configs.get(name, fallback) for name in step.needs.get("models", [])]
    return [c for c in configs if c is not None]


def _n_train(config: dict) -> int:
    if config["data.train_subset"]:
        return int(config["data.train_subset"])
    if config["data.dataset"] == "synthetic":
        return int(config["data.synthetic_train_per_class"]) * int(config["data.synthetic_classes"])
    return 45000 if config["data.dataset"] == "cifar10" else 50000


def _eval_images(config: dict) -> int:
    return config["data.stats_subset"] + (config["data.heldout_subset"] or 10000)


def estimate(
    steps: list[Step], plan_steps: list[Step] | None = None, stage_threads: dict[str, int | None] | None = None
) -> dict[str, str]:
    """Fill every step's `estimate_s` (median) and `estimate_spread` (fastest, slowest); returns how
    each architecture's cost was obtained. `plan_steps` (default `steps`) name the networks: an
    `--only analyses` run costs its analyses with the networks of teachers it does not train.
    `stage_threads` gives each stage's workers their threads (default: this process's)."""
    est = Estimator()
    stage_threads = stage_threads or {}
    everything = plan_steps or steps
    model_configs = {s.name: s.args["config"] for s in everything if s.task == "reproduce-train"} | {
        s.name: flatten(distill_preset(s.args["preset"])) for s in everything if s.task == "reproduce-distill"
    }
    for step in sorted(steps, key=lambda s: s.task != "reproduce-train"):  # probe trained nets first
        est.threads = stage_threads.get(step.stage)
        low, mid, high = (est.seconds(step, at, model_configs) for at in range(3))
        step.estimate_s, step.estimate_spread = mid, (low, high)
    return {
        arch
        + ("" if amp == "auto" else f" (run.amp={amp})")
        + ("" if threads is None else f" ({threads} thread(s))"): (p.describe())
        for (arch, amp, threads), p in est.probes.items()
    }
