"""What each kind of reproduce step does: call the existing job, keyed, nested under the study.

Every function takes a work item (`reproduce_plan.Step.item`) and returns the producing run's
metrics. A step whose key already has a FINISHED run returns that run's metrics and does nothing;
a training step whose keyed run was killed continues that run (`train --resume`), so its
checkpoints are not registered twice.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Callable

from robustlogits import tracking
from robustlogits.config import keyed_view
from robustlogits.core.errors import UserError
from robustlogits.study import engine

log = logging.getLogger(__name__)
STAGE_TASK = "reproduce-step"
DONE_METRIC = "step_done"
STEP_TAG = "robustlogits.step"
# A plan's analysis names (part of its steps' keys) whose module has another name.
ANALYSIS_MODULES = {"errors": "error_classes"}


@engine.task(STAGE_TASK)
def run_item(item: dict) -> dict[str, float]:
    """A stage study's trial: the item's own task, plus the constant every stage study optimises."""
    return engine.TASKS[item["task"]](item) | {DONE_METRIC: 1.0}


def run_of(key: str) -> str:
    """The FINISHED run of an upstream step; a step never runs before its inputs are done."""
    run_id = tracking.find_finished_run(key)
    if run_id is None:
        raise UserError(f"an input step (key {key}) has no FINISHED run yet; run its stage first")
    return run_id


def planned_as(cfg, args: dict, step: str, supplied: tuple[str, ...] = ()) -> None:
    """Refuse to run a step whose preset no longer resolves to the values it was keyed on
    (`supplied`: values the step sets from its inputs, so not keyed)."""
    from robustlogits.study.reproduce.plan import UNKEYED

    if args.get("config") is None:
        return

    def plain(values: dict) -> dict:  # as the item travelled: JSON, tuples as lists
        return json.loads(json.dumps(values, default=str))

    now = plain({k: v for k, v in keyed_view(cfg).items() if k not in UNKEYED + supplied})
    planned = plain(args["config"])
    changed = sorted(k for k in now.keys() | planned.keys() if now.get(k) != planned.get(k))
    if changed:
        raise UserError(
            f"step {step}: preset {args['preset']!r} changed since it was planned ({', '.join(changed)}); "
            "run reproduce again to plan it anew"
        )


def run_step(item: dict, job: Callable[[], str]) -> dict[str, float]:
    """The engine's keyed run under the plan's key for the step (`plan.build_plan` computed it)."""
    log.info("%s: running, or reusing the finished run with key %s", item["step"], item["key"])
    with tracking.child_runs(tags={STEP_TAG: item["step"]}):
        return engine.keyed(item["task"], item["key"], job)


@engine.task("reproduce-train")
def train_step(item: dict) -> dict[str, float]:
    from robustlogits.jobs.train import run_training
    from robustlogits.study.reproduce.plan import teacher_config

    args = item["args"]

    def job() -> str:
        cfg = teacher_config(
            args["preset"], args["dataset"], args["training"], args["seed"], args["overrides"], args.get("data_dir")
        )
        planned_as(cfg, args, item["step"])
        killed = [
            r.info.run_id
            for r in tracking.find_runs_with_key(item["key"], ("FAILED", "KILLED"))
            if "training_state" in tracking.list_artifacts(r.info.run_id)
        ]
        if killed:
            log.info("%s: continuing killed run %s", item["step"], killed[0])
        return run_training(cfg, resume=killed[0] if killed else None, progress=False)

    return run_step(item, job)


@engine.task("reproduce-attack")
def attack_step(item: dict) -> dict[str, float]:
    from robustlogits.config import AttackConfig
    from robustlogits.jobs.attack import run_attack
    from robustlogits.tracking import checkpoint_uri

    args = item["args"]

    def job() -> str:
        model = checkpoint_uri(run_of(item["inputs"]["model"]), args["epoch"])
        cfg = AttackConfig(
            model=model,
            n_examples=args["n_examples"],
            n_iter=args["n_iter"],
            seed=args["seed"],
            data_dir=args.get("data_dir"),
        )
        return run_attack(cfg, progress=False)[0]

    return run_step(item, job)


@engine.task("reproduce-distill")
def distill_step(item: dict) -> dict[str, float]:
    from robustlogits.config import distill_preset
    from robustlogits.jobs.distill import run_distill
    from robustlogits.study.reproduce.plan import STEP_SUPPLIED
    from robustlogits.tracking import checkpoint_uri

    args, inputs = item["args"], item["inputs"]

    def job() -> str:
        cfg = distill_preset(args["preset"])
        planned_as(cfg, args, item["step"], STEP_SUPPLIED)
        d = cfg.distill
        d.teacher = checkpoint_uri(run_of(inputs["teacher"]), args["teacher_epoch"])
        if "st_teacher" in inputs:
            d.st_teacher = checkpoint_uri(
                run_of(inputs["st_teacher"]), args.get("st_teacher_epoch", args["teacher_epoch"])
            )
        d.manipulation, d.k, d.loss = args["manipulation"], args["k"], args["loss"]
        d.manipulation_seed = cfg.run.seed = args["seed"]
        d.attack_n_examples, d.attack_n_iter = args["n_examples"], args["n_iter"]
        cfg.data.data_dir = args.get("data_dir")
        return run_distill(cfg, progress=False)

    return run_step(item, job)


@engine.task("reproduce-gap")
def gap_step(item: dict) -> dict[str, float]:
    from analysis import gaps

    def job() -> str:
        runs = [run_of(key) for key in item["inputs"]["attacks"]]
        with tempfile.TemporaryDirectory() as out:
            return gaps.run(runs, Path(out), bins=item["args"]["bins"])["run_id"]

    return run_step(item, job)


@engine.task("reproduce-theory")
def theory_step(item: dict) -> dict[str, float]:
    from analysis import theory

    args = item["args"]

    def job() -> str:
        specs = [f"{run_of(key)}:{epoch}" for key, epoch in zip(item["inputs"]["runs"], args["epochs"])]
        with tempfile.TemporaryDirectory() as out:
            return theory.run(Path(out), (args["classes"],), logits_runs=specs)["run_id"]

    return run_step(item, job)


@engine.task("reproduce-gap-response")
def gap_response_step(item: dict) -> dict[str, float]:
    """Appendix C.2.5: how a small attack moves the logit gaps of the teachers' correct predictions."""
    from analysis import gap_response

    args = item["args"]

    def job() -> str:
        with tempfile.TemporaryDirectory() as out:
            found = gap_response.run(
                model_uris(item), args["labels"], Path(out), n_images=args["n_images"], data_dir=args.get("data_dir")
            )
            return found["run_id"]

    return run_step(item, job)


def model_uris(item: dict, role: str = "models") -> list[str]:
    """Registry URIs of the models an analysis reads: teachers at the teacher epoch, students at
    their only registered (last) epoch."""
    from robustlogits.tracking import checkpoint_uri

    return [checkpoint_uri(run_of(key), epoch) for key, epoch in zip(item["inputs"][role], item["args"]["epochs"])]


@engine.task("reproduce-manifold")
def manifold_step(item: dict) -> dict[str, float]:
    from analysis import manifolds

    args = item["args"]

    def job() -> str:
        settings = manifolds.ManifoldConfig(
            n_images=args["n_images"],
            n_perturbations=args["n_perturbations"],
            n_features=args["n_features"],
            pgd_steps=args["pgd_steps"],
            simulated=args.get("simulated", False),
        )
        with tempfile.TemporaryDirectory() as out:
            return manifolds.run(model_uris(item), settings, Path(out), data_dir=args.get("data_dir"), progress=False)[
                "run_id"
            ]

    return run_step(item, job)


@engine.task("reproduce-cross-model")
def cross_model_step(item: dict) -> dict[str, float]:
    """Figures 3A-D, B.2, B.3, B.6: one of the cross-model analyses over every teacher, grouped ST / AT."""
    import importlib

    args = item["args"]
    analysis = importlib.import_module(f"analysis.{ANALYSIS_MODULES.get(args['analysis'], args['analysis'])}")

    def job() -> str:
        uris = model_uris(item)
        groups: dict[str, list[str]] = {}
        for uri, label in zip(uris, args["labels"]):
            groups.setdefault(label.split()[0], []).append(uri)
        extra = {}
        if args["analysis"] == "errors":
            extra["attack_runs"] = [run_of(key) for key in item["inputs"]["attacks"]]
        with tempfile.TemporaryDirectory() as out:
            return analysis.run(None, groups, out_dir=Path(out), data_dir=args.get("data_dir"), **extra)["run_id"]

    return run_step(item, job)
