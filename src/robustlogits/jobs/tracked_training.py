"""A tracked training run: what `train` and `distill` both do around the one training loop.

Per epoch (step = epoch): train loss/accuracy, held-out accuracy, max-logit and gap statistics
on a fixed un-augmented train subset and on the held-out split, a histogram artifact with
fixed bins, periodically a PGD robustness monitor, checkpoints registered with their tags and
test logits, and the full training state last, so a killed run resumes at the first epoch that
was not fully logged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from robustlogits import tracking
from robustlogits.config import TrainConfig, flatten
from robustlogits.core.data import DataBundle, stratified_indices, to_float
from robustlogits.core.device import precision_name
from robustlogits.core.figures import EpochHistograms, evolution_figure
from robustlogits.core.logits import compute_logits, logit_report
from robustlogits.core.models import build_model, fit_to_data
from robustlogits.core.perturb import LinfPGD
from robustlogits.core.training import EpochResult, Objective, TrainState, fit, make_state
from robustlogits.tracking import registry

log = logging.getLogger(__name__)
STATE_ARTIFACT = "training_state/last.pt"
HISTOGRAM_IMAGE_KEY = "logit_histograms"  # one image per epoch, step = epoch: the UI's step slider


def new_state(cfg: TrainConfig, bundle: DataBundle, device: torch.device) -> TrainState:
    """A freshly initialised model (seeded by the caller) with its optimiser and schedule; its
    data-dependent layers, if any, fitted to the training split."""
    model = build_model(cfg.model.arch, bundle.num_classes, cfg.data.dataset).to(device)
    fit_to_data(model, bundle.train.images, eps=cfg.model.whitening_eps)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return make_state(model, cfg.optim, device, cfg.run.seed)


def log_run_inputs(cfg: TrainConfig, bundle: DataBundle, amp: bool) -> None:
    """Params (every config value plus the precision actually used), the data and its split.

    The data folder is recorded as the absolute folder the data was found in: a later job on
    another machine or in another folder uses it as a hint, checked against `data_digest`."""
    if bundle.root:
        cfg.data.data_dir = bundle.root
    tracking.log_params(flatten(cfg) | {"run.precision": precision_name(amp)})
    tracking.set_tags({registry.DATA_DIGEST_TAG: bundle.digest})
    tracking.log_dataset_input(cfg.data.dataset, bundle.digest, bundle.source, "training", len(bundle.train))
    tracking.log_json(bundle.split_record, "data/split.json")


def train_tracked(
    cfg: TrainConfig,
    bundle: DataBundle,
    state: TrainState,
    objective: Objective,
    run_id: str,
    amp: bool,
    version_tags: dict | None = None,
    progress: bool | None = None,
) -> TrainState:
    """The one loop, logging every epoch into the active run, then the run's closing artifacts."""
    logger = EpochLogger(cfg, bundle, state, run_id, version_tags, amp)
    try:
        if state.epoch == 0:  # the initial network: epoch 0 of the image slider and of the evolution figures
            logger.log_histograms(0)
        fit(
            state,
            bundle.train,
            objective,
            cfg.optim,
            amp=amp,
            channels_last=cfg.run.channels_last,
            compile=cfg.run.compile,
            sync_every=cfg.run.sync_every,
            crop_pad=cfg.data.crop_pad,
            on_epoch_end=logger,
            progress=progress,
        )
    finally:
        logger.close()
    finish(cfg, state, run_id)
    return state


class EpochLogger:
    """What happens after each epoch: evaluation, metrics, artifacts, checkpoints, state."""

    def __init__(
        self,
        cfg: TrainConfig,
        bundle: DataBundle,
        state: TrainState,
        run_id: str,
        version_tags: dict | None = None,
        amp: bool = False,
    ):
        self.cfg, self.bundle, self.state, self.run_id = cfg, bundle, state, run_id
        self.version_tags = version_tags or {}  # e.g. a student's lineage
        m = cfg.monitor
        n_monitor = min(m.robust_examples, len(bundle.test))
        self.monitor_split = bundle.test.subset(
            stratified_indices(bundle.test.labels.cpu().numpy(), n_monitor, cfg.data.split_seed + 4)
        )
        eps = cfg.adversary.eps
        self.monitor_attack = LinfPGD(eps, 2.5 * eps / m.robust_steps, m.robust_steps, True, "eval", amp=amp)
        self.figure: EpochHistograms | None = None

    def histogram_image(self, epoch: int, histograms: dict) -> np.ndarray:
        if self.figure is None:
            title = f"{self.cfg.run.training} {self.cfg.model.arch} on {self.cfg.data.dataset}"
            self.figure = EpochHistograms(title, list(histograms))
        return self.figure.render(epoch, histograms)

    def log_histograms(self, epoch: int) -> dict[str, float]:
        """The logit statistics of the fixed train subset and the held-out split as they are now,
        their histograms (`histograms/epoch_NNNN.json`) and the slider's image at step `epoch`;
        returns the statistics as metrics. Epoch 0 is the initial network, before any step."""
        cfg, model = self.cfg, self.state.model
        metrics, histograms = {}, {}
        for split, prefix in ((self.bundle.stats, "train"), (self.bundle.heldout, self.bundle.heldout.name)):
            logits = compute_logits(model, split.images, cfg.run.eval_batch_size, cfg.run.channels_last)  # eval mode
            split_metrics, histograms[prefix] = logit_report(
                logits, split.labels, prefix, cfg.monitor.max_logit_range, cfg.monitor.gap_range, cfg.monitor.bins
            )
            if prefix == "train":
                split_metrics["train_clean_accuracy"] = split_metrics.pop("train_accuracy")
            metrics.update(split_metrics)
        tracking.log_json({"epoch": epoch, "splits": histograms}, f"histograms/epoch_{epoch:04d}.json")
        tracking.log_epoch_image(self.histogram_image(epoch, histograms), HISTOGRAM_IMAGE_KEY, epoch)
        return metrics

    def __call__(self, result: EpochResult) -> None:
        cfg, e = self.cfg, result.epoch
        metrics = {
            "train_loss": result.loss,
            "train_accuracy": result.accuracy,
            "lr": result.lr,
            "epoch_seconds": result.seconds,
            "train_images_per_second": result.images_per_second,
        }
        metrics.update(self.log_histograms(e))
        every = cfg.monitor.robust_every
        if every and (e % every == 0 or e == cfg.optim.epochs):
            metrics.update(self.robustness_monitor())
        model_id = None
        if e in cfg.run.checkpoint_epochs:
            metrics["checkpoint_test_accuracy"], model_id = self.checkpoint(e)
        # A checkpoint's epoch metrics are also its logged model's metrics: the models table ranks them.
        tracking.log_results(metrics, step=e, model_id=model_id)
        # The state goes last: after a kill, resume restarts at the first epoch not fully logged.
        tracking.log_bytes(self.state.to_bytes(), STATE_ARTIFACT)
        log.info(
            "epoch %d: loss %.4f acc %.4f %s",
            e,
            result.loss,
            result.accuracy,
            f"{self.bundle.heldout.name}_accuracy {metrics.get(self.bundle.heldout.name + '_accuracy', 0):.4f}",
        )

    def close(self) -> None:
        if self.figure is not None:
            self.figure.close()

    def robustness_monitor(self) -> dict[str, float]:
        model, split = self.state.model, self.monitor_split
        was_training = model.training
        model.eval()
        correct_clean = correct_adv = 0
        gen = torch.Generator(device=split.labels.device).manual_seed(self.cfg.run.seed)
        try:
            for start in range(0, len(split), self.cfg.run.eval_batch_size):
                x = to_float(split.images[start : start + self.cfg.run.eval_batch_size])
                y = split.labels[start : start + self.cfg.run.eval_batch_size]
                with torch.no_grad():
                    correct_clean += int((model(x).argmax(1) == y).sum())
                x_adv = self.monitor_attack(model, x, y, gen)
                with torch.no_grad():
                    correct_adv += int((model(x_adv).argmax(1) == y).sum())
        finally:
            model.train(was_training)
        return {"monitor_clean_accuracy": correct_clean / len(split), "monitor_pgd_accuracy": correct_adv / len(split)}

    def checkpoint(self, epoch: int) -> tuple[float, str]:
        """Log the model, register it with its tags, save the full test-set logits.

        Returns the full test split's accuracy and the logged model's id."""
        cfg, model, test = self.cfg, self.state.model, self.bundle.test
        logits = compute_logits(model, test.images, cfg.run.eval_batch_size, cfg.run.channels_last)
        accuracy = float((logits.argmax(1) == test.labels).float().mean())
        tracking.log_arrays(
            f"test_logits/epoch_{epoch:04d}.npz",
            logits=logits.cpu().numpy(),
            labels=test.labels.cpu().numpy(),
            indices=test.indices,
        )
        model.to(memory_format=torch.contiguous_format)
        tags = {
            registry.EPOCH_TAG: epoch,
            registry.TRAINING_TAG: cfg.run.training,
            "seed": cfg.run.seed,
            registry.DATASET_TAG: cfg.data.dataset,
            "arch": cfg.model.arch,
            "preset": cfg.preset,
            "test_accuracy": f"{accuracy:.4f}",
            "test_examples": len(test),
            registry.NUM_CLASSES_TAG: self.bundle.num_classes,
            registry.SOURCE_RUN_TAG: self.run_id,
            registry.TEST_LOGITS_TAG: f"test_logits/epoch_{epoch:04d}.npz",
        } | self.version_tags
        # Idempotent: an epoch re-run after a kill finds the version it registered before.
        same = {registry.SOURCE_RUN_TAG: self.run_id, registry.EPOCH_TAG: epoch}
        found = tracking.register_model(model, f"epoch-{epoch:04d}", cfg.registered_model_name(), tags, same)
        if cfg.run.channels_last:
            model.to(memory_format=torch.channels_last)
        self.state.extra.setdefault("versions", {})[epoch] = found.version.version
        self.state.extra.setdefault("model_ids", {})[epoch] = found.model_id
        return accuracy, found.model_id


def finish(cfg: TrainConfig, state: TrainState, run_id: str) -> None:
    teacher = cfg.resolved_teacher_epoch()
    versions = state.extra.get("versions", {})
    if versions:  # what the run registered, for the closing message and the run page
        tracking.set_tags(
            {
                "registered_model": cfg.registered_model_name(),
                "registered_versions": ",".join(str(versions[e]) for e in sorted(versions)),
            }
        )
    if teacher is not None and teacher in versions and (cfg.run.teacher_stage or cfg.run.teacher_alias):
        name, stage, alias = cfg.registered_model_name(), cfg.run.teacher_stage, cfg.run.teacher_alias
        if hasattr(cfg, "distill"):  # a student: its run's `teacher_version` names the teacher it learned from
            tracking.promote(name, versions[teacher], stage, alias)
        else:
            registry.promote_teacher(name, versions[teacher], stage, alias, run_id)
    histograms = load_histograms(run_id)
    for quantity in ("max_logit", "gap"):
        fig = evolution_figure(
            histograms,
            quantity,
            f"{cfg.run.training} {cfg.model.arch} on {cfg.data.dataset}: {quantity.replace('_', ' ')} per epoch",
        )
        tracking.log_figure(fig, f"figures/{quantity}_evolution.png")


def load_histograms(run_id: str) -> dict[int, dict]:
    """Every epoch's histograms of a run, read back from its artifacts (works across resumes)."""
    out = {}
    with tracking.downloaded(run_id, "histograms") as folder:
        for path in sorted(Path(folder).glob("epoch_*.json")):
            payload = json.loads(path.read_text())
            out[int(payload["epoch"])] = payload["splits"]
    return out


def checkpoint_test_logits(run_id: str, epoch: int) -> dict[str, np.ndarray]:
    with tracking.downloaded(run_id, f"test_logits/epoch_{epoch:04d}.npz") as path, np.load(path) as z:
        return {k: z[k] for k in z.files}
