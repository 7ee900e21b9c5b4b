"""The `train` job: ST or PGD-AT with every epoch's logit distribution, checkpoints in the registry.

Per epoch (step = epoch): train loss/accuracy, held-out accuracy, max-logit and gap statistics
on a fixed un-augmented train subset and on the held-out split, a histogram artifact with
fixed bins, periodically a PGD robustness monitor, and the full training state so `--resume`
continues a killed run in the same MLflow run without duplicating metric steps.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.config import TrainConfig, apply_overrides, flatten
from robustlogits.data import DataBundle, build_bundle, load_raw, stratified_indices, to_float
from robustlogits.errors import UserError
from robustlogits.figures import evolution_figure
from robustlogits.logits import compute_logits, logit_report
from robustlogits.models import build_model
from robustlogits.perturb import LinfPGD
from robustlogits.training import (EpochResult, Objective, TrainState, adversarial_objective, fit, make_state,
                                   standard_objective)

log = logging.getLogger(__name__)
STATE_ARTIFACT = "training_state/last.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no GPU is available")
    return device


def load_bundle(cfg: TrainConfig, device: torch.device) -> DataBundle:
    d = cfg.data
    raw = load_raw(d.dataset, d.data_dir, synthetic=dict(
        train_per_class=d.synthetic_train_per_class, test_per_class=d.synthetic_test_per_class,
        num_classes=d.synthetic_classes, size=d.synthetic_size))
    return build_bundle(raw, val_per_class=cfg.resolved_val_per_class(), split_seed=d.split_seed,
                        train_subset=d.train_subset, stats_subset=d.stats_subset,
                        heldout_subset=d.heldout_subset, device=device)


def config_from_run(run_id: str) -> TrainConfig:
    """Rebuild a run's config from its params: the params are the complete description."""
    try:
        params = MlflowClient().get_run(run_id).data.params
    except Exception:  # noqa: BLE001
        raise UserError(f"no run {run_id!r} in the tracking store") from None
    known = flatten(TrainConfig())
    cfg = TrainConfig()
    apply_overrides(cfg, [f"{k}={v}" for k, v in params.items() if k in known])
    return cfg


class EpochLogger:
    """What happens after each epoch: evaluation, metrics, artifacts, checkpoints, state."""

    def __init__(self, cfg: TrainConfig, bundle: DataBundle, state: TrainState, run_id: str,
                 version_tags: dict | None = None):
        self.cfg, self.bundle, self.state, self.run_id = cfg, bundle, state, run_id
        self.version_tags = version_tags or {}  # e.g. a student's lineage
        m = cfg.monitor
        n_monitor = min(m.robust_examples, len(bundle.test))
        self.monitor_split = bundle.test.subset(
            stratified_indices(bundle.test.labels.cpu().numpy(), n_monitor, cfg.data.split_seed + 4))
        eps = cfg.adversary.eps
        self.monitor_attack = LinfPGD(eps, 2.5 * eps / m.robust_steps, m.robust_steps, True, "eval", amp=False)

    def __call__(self, result: EpochResult) -> None:
        cfg, model, e = self.cfg, self.state.model, result.epoch
        ebs, cl = cfg.run.eval_batch_size, cfg.run.channels_last
        metrics = {"train_loss": result.loss, "train_accuracy": result.accuracy, "lr": result.lr,
                   "epoch_seconds": result.seconds, "train_images_per_second": result.images_per_second}
        histograms = {}
        for split, prefix in ((self.bundle.stats, "train"), (self.bundle.heldout, self.bundle.heldout.name)):
            logits = compute_logits(model, split.images, ebs, cl)
            split_metrics, histograms[prefix] = logit_report(
                logits, split.labels, prefix, cfg.monitor.max_logit_range, cfg.monitor.gap_range, cfg.monitor.bins)
            if prefix == "train":
                split_metrics["train_clean_accuracy"] = split_metrics.pop("train_accuracy")
            metrics.update(split_metrics)
        every = cfg.monitor.robust_every
        if every and (e % every == 0 or e == cfg.optim.epochs):
            metrics.update(self.robustness_monitor())
        tracking.log_json({"epoch": e, "splits": histograms}, f"histograms/epoch_{e:04d}.json")
        if e in cfg.run.checkpoint_epochs:
            metrics["checkpoint_test_accuracy"] = self.checkpoint(e)
        mlflow.log_metrics(metrics, step=e)
        # The state goes last: after a kill, resume restarts at the first epoch not fully logged.
        tracking.log_bytes(self.state.to_bytes(), STATE_ARTIFACT)
        log.info("epoch %d: loss %.4f acc %.4f %s", e, result.loss, result.accuracy,
                 f"{self.bundle.heldout.name}_accuracy {metrics.get(self.bundle.heldout.name + '_accuracy', 0):.4f}")

    def robustness_monitor(self) -> dict[str, float]:
        model, split = self.state.model, self.monitor_split
        was_training = model.training
        model.eval()
        correct_clean = correct_adv = 0
        gen = torch.Generator(device=split.labels.device).manual_seed(self.cfg.run.seed)
        try:
            for start in range(0, len(split), self.cfg.run.eval_batch_size):
                x = to_float(split.images[start:start + self.cfg.run.eval_batch_size])
                y = split.labels[start:start + self.cfg.run.eval_batch_size]
                with torch.no_grad():
                    correct_clean += int((model(x).argmax(1) == y).sum())
                x_adv = self.monitor_attack(model, x, y, gen)
                with torch.no_grad():
                    correct_adv += int((model(x_adv).argmax(1) == y).sum())
        finally:
            model.train(was_training)
        return {"monitor_clean_accuracy": correct_clean / len(split), "monitor_pgd_accuracy": correct_adv / len(split)}

    def checkpoint(self, epoch: int) -> float:
        """Log the model, register it with its tags, save the full test-set logits; returns test accuracy."""
        cfg, model, test = self.cfg, self.state.model, self.bundle.test
        logits = compute_logits(model, test.images, cfg.run.eval_batch_size, cfg.run.channels_last)
        accuracy = float((logits.argmax(1) == test.labels).float().mean())
        tracking.log_arrays(f"test_logits/epoch_{epoch:04d}.npz", logits=logits.cpu().numpy(),
                            labels=test.labels.cpu().numpy(), indices=test.indices)
        info = tracking.log_torch_model(model.to(memory_format=torch.contiguous_format), f"epoch-{epoch:04d}")
        if cfg.run.channels_last:
            model.to(memory_format=torch.channels_last)
        tags = {"epoch": epoch, "training": cfg.run.training, "seed": cfg.run.seed, "dataset": cfg.data.dataset,
                "arch": cfg.model.arch, "preset": cfg.preset, "natural_accuracy": f"{accuracy:.4f}",
                "num_classes": self.bundle.num_classes, "source_run_id": self.run_id,
                "test_logits_artifact": f"test_logits/epoch_{epoch:04d}.npz"} | self.version_tags
        version = tracking.register_version(info.model_uri, cfg.registered_model_name(), tags)
        self.state.extra.setdefault("versions", {})[epoch] = version.version
        return accuracy


def run_training(cfg: TrainConfig, resume: str | None = None, progress: bool | None = None) -> str:
    """Train as configured (or continue run `resume`) and return the MLflow run id."""
    if resume:
        tracking.check_store(cfg.run.experiment)
        cfg = config_from_run(resume)
        status = MlflowClient().get_run(resume).info.status
        if status == "FINISHED":
            raise UserError(f"run {resume} already FINISHED; nothing to resume")
    cfg.validate()
    # Log what will actually happen, not "None": defaults that depend on other values are resolved.
    cfg.data.val_per_class = cfg.resolved_val_per_class()
    cfg.run.teacher_epoch = cfg.resolved_teacher_epoch()
    device = resolve_device(cfg.run.device)
    torch.manual_seed(cfg.run.seed)
    bundle = load_bundle(cfg, device)
    model = build_model(cfg.model.arch, bundle.num_classes, cfg.data.dataset).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective: Objective = adversarial_objective(cfg.adversary, cfg.run.amp) if cfg.adversarial else standard_objective()
    state = make_state(model, cfg.optim, device, cfg.run.seed)
    tags = {"robustlogits.job": "train", "training": cfg.run.training, "dataset": cfg.data.dataset,
            "arch": cfg.model.arch, "preset": cfg.preset}
    run_name = f"{cfg.preset}-{cfg.run.training}-{cfg.model.arch}"
    if resume:
        state.load_bytes(tracking.download_artifact(resume, STATE_ARTIFACT).read_bytes())
    with tracking.managed_run(cfg.run.experiment, run_name=run_name, run_id=resume, tags=tags) as run:
        run_id = run.info.run_id
        if not resume:
            tracking.log_params(flatten(cfg))
            tracking.log_dataset_input(cfg.data.dataset, bundle.digest, bundle.source, "training", len(bundle.train))
            tracking.log_json(bundle.split_record, "data/split.json")
        else:
            mlflow.set_tag("resumed_from_epoch", state.epoch)
        fit(state, bundle.train, objective, cfg.optim, amp=cfg.run.amp, channels_last=cfg.run.channels_last,
            on_epoch_end=EpochLogger(cfg, bundle, state, run_id), progress=progress)
        finish(cfg, state, run_id)
    return run_id


def finish(cfg: TrainConfig, state: TrainState, run_id: str) -> None:
    teacher = cfg.resolved_teacher_epoch()
    versions = state.extra.get("versions", {})
    if teacher is not None and teacher in versions and (cfg.run.teacher_stage or cfg.run.teacher_alias):
        tracking.promote(cfg.registered_model_name(), versions[teacher], cfg.run.teacher_stage, cfg.run.teacher_alias)
        mlflow.set_tag("teacher_version", versions[teacher])
    histograms = load_histograms(run_id)
    for quantity in ("max_logit", "gap"):
        fig = evolution_figure(histograms, quantity, f"{cfg.run.training} {cfg.model.arch} on {cfg.data.dataset}: "
                               f"{quantity.replace('_', ' ')} per epoch")
        tracking.log_figure(fig, f"figures/{quantity}_evolution.png")


def load_histograms(run_id: str) -> dict[int, dict]:
    """Every epoch's histograms of a run, read back from its artifacts (works across resumes)."""
    folder = tracking.download_artifact(run_id, "histograms")
    out = {}
    for path in sorted(Path(folder).glob("epoch_*.json")):
        payload = json.loads(path.read_text())
        out[int(payload["epoch"])] = payload["splits"]
    return out


def checkpoint_test_logits(run_id: str, epoch: int) -> dict[str, np.ndarray]:
    path = tracking.download_artifact(run_id, f"test_logits/epoch_{epoch:04d}.npz")
    with np.load(path) as z:
        return {k: z[k] for k in z.files}
