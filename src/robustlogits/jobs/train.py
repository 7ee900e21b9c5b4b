"""The `train` job: ST or PGD-AT with every epoch's logit distribution, checkpoints in the registry.

What is logged each epoch lives in `training_run`; this job picks the objective, and `--resume`
continues a killed run in the same MLflow run without duplicating metric steps.
"""

from __future__ import annotations

import torch

from robustlogits import tracking
from robustlogits.config import TrainConfig, apply_overrides, flatten, keyed_view
from robustlogits.core.data import load_bundle
from robustlogits.core.device import resolve_amp, resolve_device
from robustlogits.core.errors import UserError
from robustlogits.core.training import Objective, adversarial_objective, standard_objective
from robustlogits.jobs.tracked_training import STATE_ARTIFACT, log_run_inputs, new_state, train_tracked


def config_from_run(run_id: str) -> TrainConfig:
    """Rebuild a run's config from its params: the params are the complete description."""
    params = tracking.run_record(run_id).params
    known = flatten(TrainConfig())
    cfg = TrainConfig()
    apply_overrides(cfg, [f"{k}={v}" for k, v in params.items() if k in known])
    return cfg


def training_identity(cfg: TrainConfig) -> str:
    """The same training (config as given, before data are found): a killed run is found again by it."""
    return tracking.job_key({"job": "train", **keyed_view(cfg)})


def run_training(cfg: TrainConfig, resume: str | None = None, progress: bool | None = None) -> str:
    """Train as configured (or continue run `resume`) and return the MLflow run id. The same
    training again after its process was killed continues the killed run (ended FAILED, with the
    reason, first) instead of starting a second one."""
    identity = None
    if not resume:
        cfg.validate()
        tracking.check_registration(cfg.registered_model_name(), cfg.run.teacher_stage, cfg.run.teacher_alias)
        tracking.check_store(cfg.run.experiment)
        identity = training_identity(cfg)
        resume = tracking.reclaim(identity)
    unlogged = bool(resume) and identity is not None and "run.training" not in tracking.run_record(resume).params
    if resume:
        tracking.check_store(cfg.run.experiment)
        cfg = cfg if unlogged else config_from_run(resume)  # a run killed before its params: the config given
        if tracking.run_record(resume).status == "FINISHED":
            raise UserError(f"run {resume} already FINISHED; nothing to resume")
    cfg.validate()
    # Log what will actually happen, not "None": defaults that depend on other values are resolved.
    cfg.data.val_per_class = cfg.resolved_val_per_class()
    cfg.run.teacher_epoch = cfg.resolved_teacher_epoch()
    device = resolve_device(cfg.run.device)
    amp = resolve_amp(cfg.run.amp, device)
    torch.manual_seed(cfg.run.seed)
    bundle = load_bundle(cfg, device)
    state = new_state(cfg, bundle, device)
    smoothing = cfg.optim.label_smoothing
    objective: Objective = (
        adversarial_objective(cfg.adversary, amp, smoothing) if cfg.adversarial else standard_objective(smoothing)
    )
    tags = {
        "robustlogits.job": "train",
        "training": cfg.run.training,
        "dataset": cfg.data.dataset,
        "arch": cfg.model.arch,
        "preset": cfg.preset,
    }
    run_name = f"{cfg.preset}-{cfg.run.training}-{cfg.model.arch}"
    if resume and STATE_ARTIFACT in tracking.list_artifacts(resume, "training_state"):
        state.load_bytes(tracking.read_artifact(resume, STATE_ARTIFACT))  # else killed before its first epoch
    if resume:
        with tracking.resume_run(resume, cfg.run.experiment) as run_id:
            tracking.set_tags({"resumed_from_epoch": state.epoch})
            if unlogged:
                log_run_inputs(cfg, bundle, amp)
            train_tracked(cfg, bundle, state, objective, run_id, amp, progress=progress)
        return run_id
    with tracking.job_run(cfg.run.experiment, run_name, tags, identity=identity) as run_id:
        log_run_inputs(cfg, bundle, amp)
        train_tracked(cfg, bundle, state, objective, run_id, amp, progress=progress)
    return run_id
