"""What each kind of reproduce step does: call the existing job, keyed, nested under the study.

Every function takes a work item (`reproduce_plan.Step.item`) and returns the producing run's
metrics. A step whose key already has a FINISHED run returns that run's metrics and does nothing;
a training step whose keyed run was killed continues that run (`train --resume`), so its
checkpoints are not registered twice.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Callable

from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.errors import UserError

log = logging.getLogger(__name__)
STEP_TAG = "robustlogits.step"
STUDY_TAG = "robustlogits.study"
TASKS: dict[str, Callable[[dict], dict[str, float]]] = {}


def task(name: str):
    def register(fn):
        TASKS[name] = fn
        return fn
    return register


def run_item(item: dict) -> dict[str, float]:
    """Run one work item through its task (or find it done) and return its run's metrics."""
    return TASKS[item["task"]](item)


def run_of(key: str) -> str:
    """The FINISHED run of an upstream step; a step never runs before its inputs are done."""
    run_id = tracking.find_finished_run(key)
    if run_id is None:
        raise UserError(f"an input step (key {key}) has no FINISHED run yet; run its stage first")
    return run_id


def metrics(run_id: str) -> dict[str, float]:
    return dict(MlflowClient().get_run(run_id).data.metrics)


def keyed(item: dict, job: Callable[[], str]) -> dict[str, float]:
    """Find the FINISHED run with the item's key, or run the job under the key and the study."""
    done = tracking.find_finished_run(item["key"])
    if done:
        log.info("%s: done (run %s)", item["step"], done)
        return metrics(done)
    log.info("%s: running", item["step"])
    with tracking.step_runs(item["key"], item.get("parent"), {STEP_TAG: item["step"], STUDY_TAG: item.get("parent") or ""}):
        run_id = job()
    return metrics(run_id)


@task("reproduce-train")
def train_step(item: dict) -> dict[str, float]:
    from robustlogits.reproduce_plan import teacher_config
    from robustlogits.train_job import run_training

    args = item["args"]

    def job() -> str:
        cfg = teacher_config(args["preset"], args["dataset"], args["training"], args["seed"], args["overrides"],
                             args.get("data_dir"))
        killed = [r.info.run_id for r in tracking.find_runs_with_key(item["key"], ("FAILED", "KILLED"))
                  if any(f.path == "training_state" for f in MlflowClient().list_artifacts(r.info.run_id))]
        if killed:
            log.info("%s: continuing killed run %s", item["step"], killed[0])
        return run_training(cfg, resume=killed[0] if killed else None, progress=False)
    return keyed(item, job)


@task("reproduce-attack")
def attack_step(item: dict) -> dict[str, float]:
    from robustlogits.attack_job import AttackConfig, run_attack
    from robustlogits.model_store import checkpoint_uri

    args = item["args"]

    def job() -> str:
        model = checkpoint_uri(run_of(item["inputs"]["model"]), args["epoch"])
        cfg = AttackConfig(model=model, n_examples=args["n_examples"], n_iter=args["n_iter"], seed=args["seed"],
                           data_dir=args.get("data_dir"))
        return run_attack(cfg, progress=False)[0]
    return keyed(item, job)


@task("reproduce-distill")
def distill_step(item: dict) -> dict[str, float]:
    from robustlogits.distill_job import distill_preset, run_distill
    from robustlogits.model_store import checkpoint_uri

    args, inputs = item["args"], item["inputs"]

    def job() -> str:
        cfg = distill_preset(args["preset"])
        d = cfg.distill
        d.teacher = checkpoint_uri(run_of(inputs["teacher"]), args["teacher_epoch"])
        if "st_teacher" in inputs:
            d.st_teacher = checkpoint_uri(run_of(inputs["st_teacher"]), args["teacher_epoch"])
        d.manipulation, d.k, d.loss = args["manipulation"], args["k"], args["loss"]
        d.manipulation_seed = cfg.run.seed = args["seed"]
        d.attack_n_examples, d.attack_n_iter = args["n_examples"], args["n_iter"]
        cfg.data.data_dir = args.get("data_dir")
        return run_distill(cfg, progress=False)
    return keyed(item, job)


@task("reproduce-gap")
def gap_step(item: dict) -> dict[str, float]:
    from robustlogits.analyze_job import run_gap_job

    def job() -> str:
        runs = [run_of(key) for key in item["inputs"]["attacks"]]
        with tempfile.TemporaryDirectory() as out:
            return run_gap_job(runs, Path(out), bins=item["args"]["bins"])["run_id"]
    return keyed(item, job)


@task("reproduce-theory")
def theory_step(item: dict) -> dict[str, float]:
    from robustlogits.analyze_job import run_theory_job

    args = item["args"]

    def job() -> str:
        specs = [f"{run_of(key)}:{args['epoch']}" for key in item["inputs"]["runs"]]
        with tempfile.TemporaryDirectory() as out:
            return run_theory_job(Path(out), (args["classes"],), logits_runs=specs)["run_id"]
    return keyed(item, job)


@task("reproduce-manifold")
def manifold_step(item: dict) -> dict[str, float]:
    from robustlogits.analyze_job import run_manifold_job
    from robustlogits.manifold_pipeline import ManifoldSettings
    from robustlogits.model_store import checkpoint_uri

    args = item["args"]

    def job() -> str:
        runs = [run_of(key) for key in item["inputs"]["models"]]
        # teachers at the teacher epoch; a student's only registered version is its last epoch
        uris = [checkpoint_uri(r, args["epoch"] if "teacher" in label else None)
                for r, label in zip(runs, args["labels"])]
        settings = ManifoldSettings(n_images=args["n_images"], n_perturbations=args["n_perturbations"],
                                    n_features=args["n_features"], pgd_steps=args["pgd_steps"])
        with tempfile.TemporaryDirectory() as out:
            return run_manifold_job(uris, settings, Path(out), data_dir=args.get("data_dir"), progress=False)["run_id"]
    return keyed(item, job)
