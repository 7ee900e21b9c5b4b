"""The `distill` job (section 4.2, A.3): a student learns an AT teacher's manipulated logits on
clean images only, through the same training loop as `train`.

1. The teacher comes from the registry (default: the preset's AT model in stage Production).
2. Its logits for every training image, averaged over `n_augment` random crop/flip passes,
   become one fixed target per image. They are stored as an artifact on a run of their own and
   found again by a key (teacher version, data digest, split, settings), never recomputed.
3. The targets are manipulated (none, fix-k permute/average, correct-fix, hybrid).
4. The student trains, is registered with its lineage, and is attacked at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.tracking.attack_records import log_attack_result
from robustlogits.core.attacks import attack_split, check_n_examples
from robustlogits.config import TrainConfig, preset
from robustlogits.core.data import Split, augment, load_bundle, to_float
from robustlogits.core.device import resolve_amp, resolve_device
from robustlogits.core.errors import UserError
from robustlogits.core.manipulations import MANIPULATIONS, manipulate, manipulation_report
from robustlogits.tracking.models import ResolvedModel, model_class_count, resolve_and_load, synthetic_params_from_run
from robustlogits.core.training import DISTILLATION_LOSSES, distillation_objective
from robustlogits.jobs.tracked_training import log_run_inputs, new_state, train_tracked

TEACHER_LOGITS_JOB = "teacher-logits"
TEACHER_LOGITS_EXPERIMENT_SUFFIX = "-teacher-logits"
STUDENTS_TAG = "students"  # on a teacher's version: its registered students, kept up to date


@dataclass
class DistillSettings:
    # Teacher: a registry URI or registered name; None = "<dataset>-<arch>-at" of the preset.
    teacher: str | None = None
    teacher_stage: str | None = None     # default Production when no alias/version is given
    teacher_alias: str | None = None
    teacher_version: str | None = None
    # Second, standard-trained teacher for `hybrid`; None = "models:/<dataset>-<arch>-st/Production".
    st_teacher: str | None = None
    manipulation: str = "none"
    k: int | None = None                 # correct-fix defaults to the paper's k = 1
    fix_mode: str = "permute"            # how correct-fix fixes the rest: permute | average
    manipulation_seed: int = 0
    loss: str = "l1"
    temperature: float = 1.0
    # Teacher targets: mean logits over this many random crop/flip passes (A.3, point 3).
    n_augment: int = 8
    teacher_bn: str = "eval"             # eval: running statistics; train: batch statistics
    teacher_logits_seed: int = 0
    teacher_logits_run: str | None = None  # reuse this run's artifact explicitly
    attack: bool = True
    attack_n_examples: int | None = None
    attack_n_iter: int = 100


@dataclass
class DistillConfig(TrainConfig):
    distill: DistillSettings = field(default_factory=DistillSettings)

    def allowed_trainings(self) -> tuple[str, ...]:
        return ("distillation",)

    def registered_model_name(self) -> str:
        return self.run.registered_name or f"{self.data.dataset}-{self.model.arch}-student"

    def teacher_spec(self) -> str:
        return self.distill.teacher or f"{self.data.dataset}-{self.model.arch}-at"

    def st_teacher_spec(self) -> str:
        return self.distill.st_teacher or f"models:/{self.data.dataset}-{self.model.arch}-st/Production"

    def resolved_k(self) -> int | None:
        d = self.distill
        return 1 if d.k is None and d.manipulation == "correct-fix" else d.k

    def validate(self) -> None:
        super().validate()
        d = self.distill
        if d.manipulation not in MANIPULATIONS:
            raise UserError(f"unknown manipulation {d.manipulation!r}; choose one of: {', '.join(MANIPULATIONS)}")
        if d.loss not in DISTILLATION_LOSSES:
            raise UserError(f"unknown loss {d.loss!r}; choose one of: {', '.join(DISTILLATION_LOSSES)}")
        if not d.temperature > 0:
            raise UserError(f"temperature must be > 0, got {d.temperature}")
        if d.manipulation in ("permute", "average") and d.k is None:
            raise UserError(f"manipulation {d.manipulation!r} needs k (1..number of classes)")
        if d.fix_mode not in ("permute", "average"):
            raise UserError(f"unknown fix_mode {d.fix_mode!r}; choose permute or average")
        if d.n_augment < 1:
            raise UserError(f"n_augment must be >= 1, got {d.n_augment}")
        if d.teacher_bn not in ("eval", "train"):
            raise UserError(f"unknown teacher_bn {d.teacher_bn!r}; choose eval or train")
        if d.attack_n_examples is not None and d.attack_n_examples < 1:
            raise UserError(f"attack n-examples must be >= 1, got {d.attack_n_examples}")

    def check_k(self, num_classes: int) -> None:
        k = self.resolved_k()
        if k is not None and self.distill.manipulation not in ("none", "hybrid") and not 1 <= k <= num_classes:
            raise UserError(f"k must be in 1..{num_classes} for {self.data.dataset}, got {k}")


DISTILL_DEFAULTS = {
    "smoke": dict(n_augment=4, attack_n_examples=500, attack_n_iter=50),
    "study": dict(n_augment=8, attack_n_examples=1000),
    "paper": dict(n_augment=8),
    "test": dict(n_augment=2, attack_n_examples=40, attack_n_iter=5),
}


def distill_preset(name: str) -> DistillConfig:
    """A train preset's data/model/optim settings for the student, plus distillation defaults."""
    base = preset(name)
    cfg = DistillConfig(**{f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig)})
    cfg.run.training = "distillation"
    cfg.run.checkpoint_epochs = ()  # empty: the student is registered at its last epoch
    cfg.run.teacher_epoch = None
    cfg.run.teacher_stage = ""
    cfg.run.teacher_alias = ""
    cfg.distill = DistillSettings(**DISTILL_DEFAULTS.get(name, {}))
    return cfg


# --- teacher logits -------------------------------------------------------------------------

@torch.no_grad()
def averaged_teacher_logits(teacher: torch.nn.Module, split: Split, n_augment: int, bn_mode: str, seed: int,
                            batch_size: int = 500) -> torch.Tensor:
    """One fixed target per image: mean logits over `n_augment` random crop/flip passes.

    bn_mode "eval" uses running statistics (targets independent of batch composition);
    "train" uses batch statistics of shuffled batches on a copy, so the teacher is untouched.
    """
    model = teacher if bn_mode == "eval" else copy.deepcopy(teacher)
    model.train(bn_mode == "train")
    device = split.labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros(len(split), model_class_count(teacher, device), device=device)
    for _ in range(n_augment):
        order = torch.randperm(len(split), generator=generator, device=device)
        for start in range(0, len(split), batch_size):
            idx = order[start:start + batch_size]
            total[idx] += model(to_float(augment(split.images[idx], generator))).float()
    teacher.eval()
    return total / n_augment


def teacher_logits_key(teacher: ResolvedModel, digest: str, split: Split, d: DistillSettings) -> str:
    return tracking.job_key({
        "teacher": teacher.model_id or teacher.uri, "name": teacher.name, "version": teacher.version, "data": digest,
        "indices": hashlib.sha256(split.indices.astype(np.int64).tobytes()).hexdigest(),
        "n_augment": d.n_augment, "bn": d.teacher_bn, "seed": d.teacher_logits_seed})


def load_teacher_logits(run_id: str, split: Split, num_classes: int, dataset: str) -> torch.Tensor:
    """Read an artifact back, refusing one made for other data, another split or class count."""
    path = tracking.download_artifact(run_id, "teacher_logits/teacher_logits.npz")
    with np.load(path) as z:
        logits, indices, labels = z["logits"], z["indices"], z["labels"]
        meta = json.loads(str(z["meta"]))
    problems = []
    if meta.get("dataset") != dataset:
        problems.append(f"dataset {meta.get('dataset')} != {dataset}")
    if logits.shape != (len(split), num_classes):
        problems.append(f"shape {tuple(logits.shape)} != ({len(split)}, {num_classes})")
    elif not (np.array_equal(indices, split.indices) and np.array_equal(labels, split.labels.cpu().numpy())):
        problems.append("image indices or labels differ from this training split")
    if problems:
        raise UserError(f"teacher-logit artifact of run {run_id} does not match: {'; '.join(problems)}")
    return torch.from_numpy(logits).to(split.labels.device)


def obtain_teacher_logits(teacher: ResolvedModel, cfg: DistillConfig, split: Split, digest: str,
                          num_classes: int, explicit_run: str | None = None) -> tuple[str, torch.Tensor, bool]:
    """(run id, [N, C] targets, reused?): an explicit or matching finished run, else a new one."""
    dataset = cfg.data.dataset
    if explicit_run:
        return explicit_run, load_teacher_logits(explicit_run, split, num_classes, dataset), True
    key = teacher_logits_key(teacher, digest, split, cfg.distill)
    run_id = tracking.find_finished_run(key, tag="teacher_logits_key")
    if run_id:
        return run_id, load_teacher_logits(run_id, split, num_classes, dataset), True
    d = cfg.distill
    logits = averaged_teacher_logits(teacher.model, split, d.n_augment, d.teacher_bn, d.teacher_logits_seed,
                                     cfg.run.eval_batch_size)
    meta = {"teacher_name": teacher.name, "teacher_version": teacher.version, "teacher_uri": teacher.uri,
            "teacher_run_id": teacher.source_run_id, "dataset": dataset, "data_digest": digest,
            "n_augment": d.n_augment, "teacher_bn": d.teacher_bn, "seed": d.teacher_logits_seed,
            "num_classes": num_classes, "n_images": len(split), "key": key}
    tags = {"robustlogits.job": TEACHER_LOGITS_JOB, "teacher_logits_key": key,
            "teacher_name": str(teacher.name), "teacher_version": str(teacher.version)}
    # Reusable artifacts, not trainings: they get an experiment of their own.
    with tracking.managed_run(cfg.run.experiment + TEACHER_LOGITS_EXPERIMENT_SUFFIX,
                              run_name=f"teacher-logits-{teacher.name}-v{teacher.version}",
                              tags=tags, nested=mlflow.active_run() is not None, fresh=True) as run:
        tracking.log_params({f"teacher_logits.{k}": v for k, v in meta.items()})
        tracking.log_model_inputs([teacher.model_id])
        array = logits.cpu().numpy().astype(np.float32)
        tracking.log_arrays("teacher_logits/teacher_logits.npz", logits=array, indices=split.indices,
                            labels=split.labels.cpu().numpy(), meta=np.asarray(json.dumps(meta)))
        tracking.log_json(meta | {"digest": hashlib.sha256(array.tobytes()).hexdigest()},
                          "teacher_logits/teacher_logits.json")
        error = float((logits.argmax(1) != split.labels).float().mean())
        mlflow.log_metric("teacher_train_error_rate", error)
        run_id = run.info.run_id
    return run_id, logits, False


# --- the job -------------------------------------------------------------------------------------

def run_distill(cfg: DistillConfig, progress: bool | None = None) -> str:
    if not cfg.run.checkpoint_epochs:
        cfg.run.checkpoint_epochs = (cfg.optim.epochs,)
    cfg.validate()
    tracking.check_store(cfg.run.experiment)
    device = resolve_device(cfg.run.device)
    d = cfg.distill
    teacher = resolve_and_load(cfg.teacher_spec(), stage=d.teacher_stage, alias=d.teacher_alias,
                               version=d.teacher_version, device=device)
    st_teacher = resolve_and_load(cfg.st_teacher_spec(), device=device) if d.manipulation == "hybrid" else None
    adopt_teacher_data(cfg, teacher)
    cfg.validate()
    cfg.data.val_per_class = cfg.resolved_val_per_class()  # logged as what it is, not "None"
    torch.manual_seed(cfg.run.seed)
    bundle = load_bundle(cfg, device, hint=teacher.data_dir, digest=teacher.data_digest)
    for who in filter(None, (teacher, st_teacher)):
        classes = model_class_count(who.model, device)
        if classes != bundle.num_classes:
            raise UserError(f"teacher {who.describe()} outputs {classes} classes but {cfg.data.dataset} has {bundle.num_classes}")
    cfg.check_k(bundle.num_classes)
    if d.attack:
        check_n_examples(d.attack_n_examples, bundle.test)

    logits_run, targets, reused = obtain_teacher_logits(teacher, cfg, bundle.train, bundle.digest, bundle.num_classes,
                                                        d.teacher_logits_run)
    st_targets = None
    if st_teacher is not None:
        _, st_targets, _ = obtain_teacher_logits(st_teacher, cfg, bundle.train, bundle.digest, bundle.num_classes)
    manipulated = manipulate(targets, bundle.train.labels, d.manipulation, k=cfg.resolved_k(), fix_mode=d.fix_mode,
                             st_targets=st_targets, seed=d.manipulation_seed)
    report = manipulation_report(targets, manipulated, bundle.train.labels)

    amp = resolve_amp(cfg.run.amp, device)
    state = new_state(cfg, bundle.num_classes, device)
    objective = distillation_objective(manipulated, d.loss, d.temperature)
    lineage = {"teacher_name": teacher.name, "teacher_version": teacher.version,
               "teacher_run_id": teacher.source_run_id, "teacher_uri": teacher.uri, "manipulation": d.manipulation,
               "k": cfg.resolved_k(), "fix_mode": d.fix_mode, "loss": d.loss, "temperature": d.temperature,
               "teacher_logits_run": logits_run, "teacher_logits_artifact": "teacher_logits/teacher_logits.npz"}
    if st_teacher is not None:
        lineage |= {"st_teacher_name": st_teacher.name, "st_teacher_version": st_teacher.version}
    lineage = {k: str(v) for k, v in lineage.items() if v is not None}
    name = f"distill-{d.manipulation}" + (f"-k{cfg.resolved_k()}" if cfg.resolved_k() else "") + f"-{d.loss}"
    with tracking.managed_run(cfg.run.experiment, run_name=name,
                              tags={"robustlogits.job": "distill", "dataset": cfg.data.dataset,
                                    "arch": cfg.model.arch, "preset": cfg.preset} | lineage) as run:
        run_id = run.info.run_id
        log_run_inputs(cfg, bundle, amp)
        mlflow.log_param("teacher_logits_reused", reused)
        tracking.log_model_inputs([m.model_id for m in (teacher, st_teacher) if m is not None])
        mlflow.log_metrics({f"targets_{k}": float(v) for k, v in report.items()})
        train_tracked(cfg, bundle, state, objective, run_id, amp, version_tags=lineage, progress=progress)
        result = None
        if d.attack:
            result = attack_split(state.model, bundle.test, bundle.num_classes, n_examples=d.attack_n_examples,
                                  n_iter=d.attack_n_iter, seed=cfg.run.seed, eps=cfg.adversary.eps, device=device,
                                  progress=progress)
            model_ids = state.extra.get("model_ids", {})  # the student's logged model: the attack's metrics are its own
            log_attack_result(result, model_id=model_ids[max(model_ids)] if model_ids else None)
    versions = state.extra.get("versions", {})
    if result is not None and versions:
        last, client = versions[max(versions)], MlflowClient()
        for key, value in (("adversarial_accuracy", f"{result.adversarial_accuracy:.4f}"),
                           ("attacked_natural_accuracy", f"{result.natural_accuracy:.4f}"),
                           ("adversarial_accuracy_run", run_id),
                           ("adversarial_accuracy_setting", f"apgd-ce-dlr eps={cfg.adversary.eps:.5f} "
                                                            f"n={result.n_examples} n_iter={d.attack_n_iter}")):
            client.set_model_version_tag(cfg.registered_model_name(), last, key, value)
    update_students_tag(teacher.name, teacher.version)
    return run_id


def adopt_teacher_data(cfg: DistillConfig, teacher: ResolvedModel) -> None:
    """The student trains on the teacher's dataset; its data is found again by the teacher's
    recorded folder (a hint) and content digest, wherever this job runs (see `load_bundle`)."""
    if teacher.dataset:
        cfg.data.dataset = teacher.dataset
    if cfg.data.dataset == "synthetic":
        synthetic = synthetic_params_from_run(teacher.source_run_id) or {}
        for key, value in synthetic.items():
            setattr(cfg.data, f"synthetic_{key}" if key != "num_classes" else "synthetic_classes", value)


def update_students_tag(teacher_name: str | None, teacher_version: str | None) -> None:
    """The link seen from the teacher's side: its version lists every registered student.

    Rebuilt from the registry each time (not appended), so concurrent distillations converge."""
    if not teacher_name or not teacher_version:
        return
    students = sorted(students_of(teacher_name, teacher_version), key=lambda v: (v.name, int(v.version)))
    if not students:
        return
    text = ", ".join(f"{v.name}/{v.version} ({_student_label(v.tags)})" for v in students)
    if len(text) > 4900:
        text = text[:4800].rsplit(", ", 1)[0] + f", ... ({len(students)} in all)"
    MlflowClient().set_model_version_tag(teacher_name, teacher_version, STUDENTS_TAG, text)


def _student_label(tags: dict) -> str:
    label = tags.get("manipulation", "?") + (f" k={tags['k']}" if tags.get("k") else "")
    return label + (f", adv {tags['adversarial_accuracy']}" if tags.get("adversarial_accuracy") else "")


def students_of(teacher_name: str, teacher_version: str | int | None = None) -> list:
    """Every registered student version distilled from a teacher (optionally one version of it)."""
    client = MlflowClient()
    query = f"tags.teacher_name = '{teacher_name}'"
    if teacher_version is not None:
        query += f" and tags.teacher_version = '{teacher_version}'"
    try:
        return list(client.search_model_versions(query))
    except Exception:  # noqa: BLE001 - stores without tag filters: filter here
        return [v for v in client.search_model_versions("") if v.tags.get("teacher_name") == teacher_name
                and (teacher_version is None or v.tags.get("teacher_version") == str(teacher_version))]
