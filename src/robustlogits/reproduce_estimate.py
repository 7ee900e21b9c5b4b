"""Time estimates for a reproduce plan, from this machine's measured throughput.

Throughput comes from the tracking store when it holds a finished training run of the same
architecture (its `train_images_per_second`), else from a short probe (a few forward/backward
passes of the architecture on random images, cached per architecture, device and thread count).
A PGD-n step costs about n+1 forward/backward passes; evaluation forwards about a third of one.
"""

from __future__ import annotations

import json
import time

import torch
from mlflow.tracking import MlflowClient

from robustlogits.config import flatten
from robustlogits.data import cache_root
from robustlogits.reproduce_plan import Step

FORWARD_SHARE = 1 / 3      # a forward pass against a forward + backward pass
APGD_SURVIVORS = 0.5       # share of examples APGD-DLR still attacks after APGD-CE
ANALYSIS_SECONDS = 5.0     # reading artifacts, figures, logging


def probe_images_per_second(arch: str, num_classes: int = 10, batch: int = 64, repeats: int = 3) -> float:
    """Forward + backward images per second of `arch` on random images, on this machine."""
    from robustlogits.device import resolve_amp
    from robustlogits.models import build_model

    amp = resolve_amp("auto", torch.device("cpu"))  # as training runs it: bf16 where native
    path = cache_root() / "throughput.json"
    ident = f"{arch}|{num_classes}|cpu|{torch.get_num_threads()}|{'bf16' if amp else 'fp32'}"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if ident in cached:
        return cached[ident]
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
    rate = batch / min(times[1:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cached | {ident: rate}))
    return rate


def stored_images_per_second(arch: str) -> float | None:
    """Clean forward + backward images/s of a finished standard training run of `arch` in the store."""
    client = MlflowClient()
    try:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"params.`model.arch` = '{arch}' and params.`run.training` = 'standard'"
                                                " and attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=5)
    except Exception:  # noqa: BLE001 - an estimate never fails the plan
        return None
    rates = [r.data.metrics["train_images_per_second"] for r in runs if "train_images_per_second" in r.data.metrics]
    return max(rates) if rates else None


class Estimator:
    """Seconds per step, from one clean forward+backward rate per architecture."""

    def __init__(self):
        self.rates: dict[str, tuple[float, str]] = {}

    def rate(self, arch: str) -> tuple[float, str]:
        if arch not in self.rates:
            stored = stored_images_per_second(arch)
            self.rates[arch] = (stored, "store") if stored else (probe_images_per_second(arch), "probe")
        return self.rates[arch]

    def seconds(self, step: Step) -> float:
        if step.task == "reproduce-train":
            config = step.args["config"]
            return self._train(config, self.rate(config["model.arch"])[0])
        if step.task == "reproduce-distill":
            from robustlogits.distill_job import distill_preset

            config = flatten(distill_preset(step.args["preset"]))
            rate = self.rate(config["model.arch"])[0]
            n = _n_train(config)
            teacher_logits = config["distill.n_augment"] * n * FORWARD_SHARE / rate
            return config["optim.epochs"] * (n + _eval_images(config)) / rate + teacher_logits + \
                self.attack(step.args["n_examples"], step.args["n_iter"], rate)
        if step.task == "reproduce-manifold":
            a = step.args
            rate = min((r for r, _ in self.rates.values()), default=1000.0)
            return ANALYSIS_SECONDS + len(a["labels"]) * (a["n_images"] * a["n_perturbations"] * (a["pgd_steps"] + 1)
                                                           / rate + 2.0)
        return ANALYSIS_SECONDS

    @staticmethod
    def attack(n: int | None, n_iter: int, rate: float) -> float:
        return (n or 10000) * n_iter * (1 + APGD_SURVIVORS) / rate

    @staticmethod
    def _train(config: dict, rate: float) -> float:
        passes = 1 + (config["adversary.steps"] if config["run.training"] == "adversarial" else 0)
        epochs = config["optim.epochs"]
        monitor = 0.0
        if config["monitor.robust_every"]:
            monitor = (epochs // config["monitor.robust_every"]) * config["monitor.robust_examples"] * \
                (config["monitor.robust_steps"] + 1)
        checkpoints = len(config["run.checkpoint_epochs"]) * 10000 * FORWARD_SHARE
        return (epochs * (_n_train(config) * passes + _eval_images(config)) + monitor + checkpoints) / rate


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
