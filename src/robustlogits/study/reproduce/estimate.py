"""Time estimates for a reproduce plan, from this machine's measured throughput.

Throughput comes from the tracking store when it holds a finished standard training run of the
same architecture (its `train_images_per_second`), else from a short probe (a few forward/backward
passes of the architecture on random images, as training runs them). Adversarial training uses a
finished AT run's throughput, rescaled to the PGD step count, where one exists; else a PGD-n step
counts as n+1 forward/backward passes. Evaluation forwards cost about a third of a pass.
"""

from __future__ import annotations

import time

import torch

from robustlogits import tracking
from robustlogits.config import flatten
from robustlogits.study.reproduce.plan import Step

FORWARD_SHARE = 1 / 3  # a forward pass against a forward + backward pass
APGD_SURVIVORS = 0.5  # share of examples APGD-DLR still attacks after APGD-CE
ANALYSIS_SECONDS = 5.0  # reading artifacts, figures, logging


def probe_images_per_second(arch: str, num_classes: int = 10, batch: int = 64, repeats: int = 3) -> float:
    """Forward + backward images per second of `arch` on random images, on this machine."""
    from robustlogits.core.device import resolve_amp
    from robustlogits.core.models import build_model

    amp = resolve_amp("auto", torch.device("cpu"))  # as training runs it: bf16 where native
    model = build_model(arch, num_classes, "cifar10").to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.rand(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch / min(times[1:])


def stored_images_per_second(arch: str, training: str = "standard") -> tuple[float, int] | None:
    """(best `train_images_per_second`, PGD steps) of finished training runs of `arch` in the store."""
    try:
        runs = tracking.finished_runs(params={"model.arch": arch, "run.training": training}, limit=5)
    except Exception:  # noqa: BLE001 - an estimate never fails the plan
        return None
    found = [
        (r.metrics["train_images_per_second"], attack_steps(r.params))
        for r in runs
        if "train_images_per_second" in r.metrics
    ]
    return max(found) if found else None


def attack_steps(config: dict) -> int:
    """Gradient steps of the training-time attack: FGSM-RS takes one whatever `adversary.steps` says."""
    return 1 if config.get("adversary.method") == "fgsm" else int(config.get("adversary.steps", 0))


class Estimator:
    """Seconds per step, from one clean forward+backward rate per architecture."""

    def __init__(self):
        self.rates: dict[str, tuple[float, str]] = {}

    def rate(self, arch: str) -> tuple[float, str]:
        if arch not in self.rates:
            stored = stored_images_per_second(arch)
            self.rates[arch] = (stored[0], "store") if stored else (probe_images_per_second(arch), "probe")
        return self.rates[arch]

    def train_seconds_per_image(self, config: dict) -> float:
        """A measured AT run of the architecture (rescaled to this step count) where one exists;
        else the clean rate times the n+1 passes of PGD-n."""
        arch, rate = config["model.arch"], self.rate(config["model.arch"])[0]
        if config["run.training"] != "adversarial":
            return 1 / rate
        steps = attack_steps(config)
        stored = stored_images_per_second(arch, "adversarial")
        if stored:
            return (steps + 1) / (stored[1] + 1) / stored[0]
        return (steps + 1) / rate

    def seconds(self, step: Step) -> float:
        if step.task == "reproduce-train":
            config = step.args["config"]
            return self._train(config, self.rate(config["model.arch"])[0], self.train_seconds_per_image(config))
        if step.task == "reproduce-distill":
            from robustlogits.config import distill_preset

            config = flatten(distill_preset(step.args["preset"]))
            rate = self.rate(config["model.arch"])[0]
            n = _n_train(config)
            teacher_logits = config["distill.n_augment"] * n * FORWARD_SHARE / rate
            return (
                config["optim.epochs"] * (n + _eval_images(config)) / rate
                + teacher_logits
                + self.attack(step.args["n_examples"], step.args["n_iter"], rate)
            )
        if step.task == "reproduce-manifold":
            a = step.args
            rate = min((r for r, _ in self.rates.values()), default=1000.0)
            return ANALYSIS_SECONDS + len(a["labels"]) * (
                a["n_images"] * a["n_perturbations"] * (a["pgd_steps"] + 1) / rate + 2.0
            )
        if step.task == "reproduce-gap-response":
            rate = min((r for r, _ in self.rates.values()), default=1000.0)
            return ANALYSIS_SECONDS + len(step.args["labels"]) * step.args["n_images"] * 11 / rate  # PGD-10
        return ANALYSIS_SECONDS

    @staticmethod
    def attack(n: int | None, n_iter: int, rate: float) -> float:
        return (n or 10000) * n_iter * (1 + APGD_SURVIVORS) / rate

    @staticmethod
    def _train(config: dict, rate: float, per_image: float) -> float:
        epochs = config["optim.epochs"]
        monitor = 0.0
        if config["monitor.robust_every"]:
            monitor = (
                (epochs // config["monitor.robust_every"])
                * config["monitor.robust_examples"]
                * (config["monitor.robust_steps"] + 1)
            )
        checkpoints = len(config["run.checkpoint_epochs"]) * 10000 * FORWARD_SHARE
        return epochs * _n_train(config) * per_image + (epochs * _eval_images(config) + monitor + checkpoints) / rate


def _n_train(config: dict) -> int:
    if config["data.train_subset"]:
        return int(config["data.train_subset"])
    if config["data.dataset"] == "synthetic":
        return int(config["data.synthetic_train_per_class"]) * int(config["data.synthetic_classes"])
    return 45000 if config["data.dataset"] == "cifar10" else 50000


def _eval_images(config: dict) -> float:
    return (config["data.stats_subset"] + (config["data.heldout_subset"] or 10000)) * FORWARD_SHARE


def estimate(steps: list[Step]) -> dict[str, str]:
    """Fill `estimate_s` of every step; returns where each architecture's throughput came from."""
    est = Estimator()
    by_name = {s.name: s for s in steps}
    for step in steps:
        step.estimate_s = est.seconds(step)
    for step in steps:
        if step.task == "reproduce-attack":
            train = by_name[step.needs["model"]]
            rate = est.rate(train.args["config"]["model.arch"])[0]
            step.estimate_s = est.attack(step.args["n_examples"], step.args["n_iter"], rate)
    return {arch: f"{rate:,.0f} img/s ({source})" for arch, (rate, source) in est.rates.items()}
