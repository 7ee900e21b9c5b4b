"""The paper's study as a plan of keyed steps, at three scales (and `test`, for the test-suite).

A step is one unit of work done by an existing job (train, attack, distill, an analysis). Its key
hashes its resolved config and the keys of the steps it reads from (which in turn hash theirs,
down to the training data's digest), so the whole plan's keys are known before anything runs and
"done" means "a FINISHED run carries this key".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from robustlogits import tracking
from robustlogits.config import STUDY_STAGES, ScaleConfig, apply_overrides, keyed_view, preset
from robustlogits.core.errors import UserError

STAGES = STUDY_STAGES


def teacher_config(preset_name: str, dataset: str, training: str, seed: int, overrides=(), data_dir=None):
    """A teacher's resolved training config, as logged (resolved defaults, not "None")."""
    cfg = preset(preset_name, training)
    cfg.data.dataset = dataset
    cfg.run.seed = seed
    cfg.data.data_dir = data_dir
    apply_overrides(cfg, overrides)
    cfg.validate()
    cfg.data.val_per_class = cfg.resolved_val_per_class()
    cfg.run.teacher_epoch = cfg.resolved_teacher_epoch()
    return cfg


# Figure 5's networks besides the two teachers (section 4.2 studies the "fix-1 (avg)" student).
MANIFOLD_STUDENTS = {
    "normal student": "normal",
    "fix-1 (avg) student": "average-k1",
    "correct-fix-1 student": "correct-fix-1",
    "hybrid student": "hybrid",
}

# Step groups for --only / --skip, in the order the study runs them.
CROSS_MODEL = ("ranks", "errors", "overlap", "images")  # Figures 3A-B, 3C, 3D / B.6, B.2-B.3
GROUPS = ("train", "attack", "distill", "sweeps", "gap", "theory", "manifold", *CROSS_MODEL)


@dataclass
class Step:
    name: str  # e.g. "distill/cifar10/s0/permute-k3"
    group: str  # one of GROUPS
    stage: str  # one of STAGES: a stage runs only when the stages before it are done
    task: str  # the registered task that runs it
    args: dict  # JSON-able, everything a worker on another machine needs
    needs: dict = field(default_factory=dict)  # role -> upstream step name (or list of names)
    key: str = ""
    estimate_s: float = 0.0  # seconds at the probe's median repeat
    estimate_spread: tuple[float, float] = (0.0, 0.0)  # at its fastest and slowest repeat

    def item(self, keys: dict[str, str]) -> dict:
        """The work item a worker receives: the step with its upstream steps' keys resolved."""

        def resolve(ref):
            return [keys[r] for r in ref] if isinstance(ref, list) else keys[ref]

        return {
            "step": self.name,
            "task": self.task,
            "key": self.key,
            "args": self.args,
            "inputs": {role: resolve(ref) for role, ref in self.needs.items()},
        }


def select_groups(only: list[str] | None, skip: list[str] | None) -> tuple[str, ...]:
    for given in (*(only or ()), *(skip or ())):
        if given not in GROUPS:
            raise UserError(f"unknown step {given!r}; choose from: {', '.join(GROUPS)}")
    chosen = [g for g in GROUPS if (not only or g in only) and g not in (skip or ())]
    if not chosen:
        raise UserError("--only/--skip leave no step to run")
    return tuple(chosen)


# where data and runs live, not what is computed: outside the keys
UNKEYED = ("data.data_dir", "run.device", "run.experiment")
# a student step replaces its preset's teacher names with its input steps' checkpoints, which key it
# as inputs; keying the names too would move every student's key when only the ST teacher's network does
STEP_SUPPLIED = ("distill.teacher", "distill.st_teacher")


def class_count(dataset: str, scale_: ScaleConfig) -> int:
    if dataset == "synthetic":
        return preset(scale_.preset).data.synthetic_classes
    return 100 if dataset == "cifar100" else 10


def build_plan(scale_: ScaleConfig, seeds: int, datasets: dict[str, str], data_dir: str | None) -> list[Step]:
    """Every step of the study (sections 4.1-4.3, appendices A-C) for the datasets present.

    `datasets` maps each dataset to its content digest (the identity of the training data).
    """
    if seeds < 1:
        raise UserError(f"seeds must be >= 1, got {seeds}")
    steps: list[Step] = []
    for dataset, digest in datasets.items():
        steps += _dataset_steps(scale_, seeds, dataset, digest, data_dir)
    by_name = {s.name: s for s in steps}
    for step in steps:  # upstream first: steps are listed in dependency order
        upstream = {
            role: ([by_name[r].key for r in ref] if isinstance(ref, list) else by_name[ref].key)
            for role, ref in step.needs.items()
        }
        payload = {k: v for k, v in step.args.items() if k != "data_dir"}
        step.key = tracking.job_key({"task": step.task, "args": payload, "inputs": upstream})
    return steps


def _dataset_steps(sc: ScaleConfig, seeds: int, dataset: str, digest: str, data_dir: str | None) -> list[Step]:
    steps: list[Step] = []
    # each teacher is read at its own teacher epoch: a preset may train ST longer than AT
    epoch_of = {
        kind: teacher_config(sc.preset, dataset, training, 0, sc.train_overrides).run.teacher_epoch
        for kind, training in (("st", "standard"), ("at", "adversarial"))
    }
    checkpoints = teacher_config(sc.preset, dataset, "adversarial", 0, sc.train_overrides).run.checkpoint_epochs
    attack = {"n_examples": sc.attack_n_examples, "n_iter": sc.attack_n_iter}
    for seed in range(seeds):
        for kind, training in (("st", "standard"), ("at", "adversarial")):
            cfg = teacher_config(sc.preset, dataset, training, seed, sc.train_overrides)
            config = {k: v for k, v in keyed_view(cfg).items() if k not in UNKEYED}
            steps.append(
                Step(
                    f"train/{dataset}/{kind}/s{seed}",
                    "train",
                    "train",
                    "reproduce-train",
                    {
                        "preset": sc.preset,
                        "training": training,
                        "dataset": dataset,
                        "seed": seed,
                        "overrides": list(sc.train_overrides),
                        "data_dir": data_dir,
                        "config": config,
                        "data_digest": digest,
                    },
                )
            )
            steps.append(
                Step(
                    f"attack/{dataset}/{kind}/s{seed}",
                    "attack",
                    "attack",
                    "reproduce-attack",
                    {"epoch": epoch_of[kind], "seed": 0, **attack, "data_dir": data_dir},
                    {"model": f"train/{dataset}/{kind}/s{seed}"},
                )
            )
    classes = class_count(dataset, sc)
    distilled = dataset != "cifar100"  # the paper distils on CIFAR-10 only (section 4.2)
    ks = [k for k in (sc.ks or range(1, classes)) if 1 <= k < classes]
    students = [("normal", "none", None)]
    students += [
        (f"{mode}-k{k}", mode, k)
        for mode in sc.fix_modes
        for k in (ks if mode != "average" or sc.average_ks is None else [k for k in sc.average_ks if 1 <= k < classes])
    ]
    students += [("correct-fix-1", "correct-fix", 1), ("hybrid", "hybrid", None)]
    if distilled:
        for seed in range(seeds):
            for label, manipulation, k in students:
                steps.append(_student(sc, dataset, seed, label, manipulation, k, epoch_of, "l1", "distill", data_dir))
        for seed in range(min(seeds, sc.sweep_seeds or seeds)):
            for epoch in sc.sweep_epochs or checkpoints:
                for loss in sc.sweep_losses:
                    steps.append(
                        _student(
                            sc, dataset, seed, f"e{epoch}-{loss}", "none", None, {"at": epoch}, loss, "sweeps", data_dir
                        )
                    )
    teachers = {"at": f"train/{dataset}/at/s0", "st": f"train/{dataset}/st/s0"}
    steps.append(
        Step(
            f"analyze/{dataset}/gap",
            "gap",
            "analyze",
            "reproduce-gap",
            {"bins": 10},
            {"attacks": [f"attack/{dataset}/{kind}/s{seed}" for kind in ("st", "at") for seed in range(seeds)]},
        )
    )
    steps.append(
        Step(
            f"analyze/{dataset}/theory",
            "theory",
            "analyze",
            "reproduce-theory",
            {"classes": classes, "epochs": [epoch_of["st"], epoch_of["at"]]},
            {"runs": [teachers["st"], teachers["at"]]},
        )
    )
    steps.append(
        Step(
            f"analyze/{dataset}/gap-response",
            "theory",
            "analyze",
            "reproduce-gap-response",
            {
                "labels": ["ST teacher", "AT teacher"],
                "epochs": [epoch_of["st"], epoch_of["at"]],
                "n_images": sc.response_images,
                "data_dir": data_dir,
            },
            {"models": [teachers["st"], teachers["at"]]},
        )
    )
    student_labels = [label for label, _, _ in students] if distilled else []
    for seed in range(min(seeds, sc.manifold_seeds or seeds)):
        models = {"ST teacher": f"train/{dataset}/st/s{seed}", "AT teacher": f"train/{dataset}/at/s{seed}"}
        teacher_epochs = {"ST teacher": epoch_of["st"], "AT teacher": epoch_of["at"]}
        for role, label in MANIFOLD_STUDENTS.items():  # section 4.2: Figure 5 studies these students
            if label in student_labels:
                models[role] = f"distill/{dataset}/s{seed}/{label}"
        steps.append(
            Step(
                f"analyze/{dataset}/manifold/s{seed}",
                "manifold",
                "analyze",
                "reproduce-manifold",
                {
                    "seed": seed,
                    "labels": list(models),
                    "epochs": [teacher_epochs.get(label) for label in models],
                    "n_images": sc.manifold_images,
                    "n_perturbations": sc.manifold_perturbations,
                    "n_features": sc.manifold_features,
                    "pgd_steps": sc.manifold_pgd_steps,
                    "simulated": sc.manifold_simulated,
                    "data_dir": data_dir,
                },
                {"models": list(models.values())},
            )
        )
    teachers_all = [
        (f"{kind.upper()} s{seed}", f"train/{dataset}/{kind}/s{seed}", epoch_of[kind])
        for kind in ("at", "st")
        for seed in range(seeds)
    ]
    for analysis in CROSS_MODEL:
        needs = {"models": [name for _, name, _ in teachers_all]}
        if analysis == "errors":
            needs["attacks"] = [name.replace("train/", "attack/", 1) for _, name, _ in teachers_all]
        steps.append(
            Step(
                f"analyze/{dataset}/{analysis}",
                analysis,
                "analyze",
                "reproduce-cross-model",
                {
                    "analysis": analysis,
                    "labels": [label for label, _, _ in teachers_all],
                    "epochs": [epoch for _, _, epoch in teachers_all],
                    "data_dir": data_dir,
                },
                needs,
            )
        )
    return steps


def _student(
    sc: ScaleConfig,
    dataset: str,
    seed: int,
    label: str,
    manipulation: str,
    k: int | None,
    epochs: dict[str, int],
    loss: str,
    group: str,
    data_dir: str | None,
) -> Step:
    """`epochs`: the teacher checkpoint per kind ("at"; "st" too for the hybrid student)."""
    args = {
        "preset": sc.preset,
        "config": student_config(sc.preset),  # the key follows the preset's values, not only its name
        "manipulation": manipulation,
        "k": k,
        "seed": seed,
        "loss": loss,
        "teacher_epoch": epochs["at"],
        "n_examples": sc.attack_n_examples,
        "n_iter": sc.attack_n_iter,
        "data_dir": data_dir,
    }
    needs = {"teacher": f"train/{dataset}/at/s{seed}"}
    if manipulation == "hybrid":
        needs["st_teacher"] = f"train/{dataset}/st/s{seed}"
        if epochs["st"] != epochs["at"]:  # only then: the other students' keys stay as they were
            args["st_teacher_epoch"] = epochs["st"]
    prefix = "distill" if group == "distill" else "sweep"
    return Step(f"{prefix}/{dataset}/s{seed}/{label}", group, "distill", "reproduce-distill", args, needs)


def student_config(preset_name: str) -> dict:
    """A distillation preset's values as a step plans them (the step fills in teacher, k and seeds)."""
    from robustlogits.config import distill_preset

    return {k: v for k, v in keyed_view(distill_preset(preset_name)).items() if k not in UNKEYED + STEP_SUPPLIED}


def select(steps: list[Step], groups: tuple[str, ...]) -> list[Step]:
    return [s for s in steps if s.group in groups]


def scale_params(sc: ScaleConfig, seeds: int) -> dict:
    return {f"scale.{k}": v for k, v in dataclasses.asdict(sc).items()} | {"seeds": seeds}
