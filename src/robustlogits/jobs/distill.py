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
import hashlib
import json

import numpy as np
import torch

from robustlogits import tracking
from robustlogits.config import DistillationConfig, DistillConfig, keyed_view
from robustlogits.core.attacks import attack_split, check_n_examples
from robustlogits.core.data import Split, augment, load_bundle, to_float
from robustlogits.core.device import resolve_amp, resolve_device
from robustlogits.core.errors import UserError
from robustlogits.core.logits import compute_logits
from robustlogits.core.manipulations import manipulate, manipulation_report
from robustlogits.core.models import model_class_count
from robustlogits.core.training import distillation_objective
from robustlogits.jobs.tracked_training import STATE_ARTIFACT, log_run_inputs, new_state, train_tracked
from robustlogits.tracking import ResolvedModel, registry

TEACHER_LOGITS_JOB = "teacher-logits"
TEACHER_LOGITS_EXPERIMENT_SUFFIX = "-teacher-logits"
TEACHER_LOGITS_ARTIFACT = "teacher_logits/teacher_logits.npz"


# --- teacher logits -------------------------------------------------------------------------


@torch.no_grad()
def averaged_teacher_logits(
    teacher: torch.nn.Module,
    split: Split,
    n_augment: int,
    bn_mode: str,
    seed: int,
    batch_size: int = 500,
    channels_last: bool = False,
) -> torch.Tensor:
    """One fixed target per image: mean logits over `n_augment` random crop/flip passes, in fp32.

    bn_mode "eval" uses running statistics (targets independent of batch composition);
    "train" uses batch statistics of shuffled batches on a copy, so the teacher is untouched.
    channels_last changes the memory layout only (1.3x faster fp32 forward on a 2-core EPYC).
    """
    model = teacher if bn_mode == "eval" else copy.deepcopy(teacher)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train(bn_mode == "train")
    device = split.labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    total = torch.zeros(len(split), model_class_count(teacher, device), device=device)
    for _ in range(n_augment):
        order = torch.randperm(len(split), generator=generator, device=device)
        for start in range(0, len(split), batch_size):
            idx = order[start : start + batch_size]
            total[idx] += model(to_float(augment(split.images[idx], generator), channels_last)).float()
    teacher.eval()
    return total / n_augment


def teacher_logits_key(teacher: ResolvedModel, digest: str, split: Split, d: DistillationConfig) -> str:
    return tracking.job_key(
        {
            "job": TEACHER_LOGITS_JOB,
            "teacher": teacher.model_id or teacher.uri,
            "name": teacher.name,
            "version": teacher.version,
            "data": digest,
            "indices": hashlib.sha256(split.indices.astype(np.int64).tobytes()).hexdigest(),
            "n_augment": d.n_augment,
            "bn": d.teacher_bn,
            "seed": d.teacher_logits_seed,
        }
    )


def load_teacher_logits(run_id: str, split: Split, num_classes: int, dataset: str) -> torch.Tensor:
    """Read an artifact back, refusing one made for other data, another split or class count."""
    with tracking.downloaded(run_id, TEACHER_LOGITS_ARTIFACT) as path, np.load(path) as z:
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


def obtain_teacher_logits(
    teacher: ResolvedModel,
    cfg: DistillConfig,
    split: Split,
    digest: str,
    num_classes: int,
    explicit_run: str | None = None,
) -> tuple[str, torch.Tensor, bool]:
    """(run id, [N, C] targets, reused?): an explicit or matching finished run, else a new one."""
    dataset = cfg.data.dataset
    if explicit_run:
        return explicit_run, load_teacher_logits(explicit_run, split, num_classes, dataset), True
    key = teacher_logits_key(teacher, digest, split, cfg.distill)
    computed: list[torch.Tensor] = []

    def compute() -> str:
        d = cfg.distill
        logits = averaged_teacher_logits(
            teacher.model,
            split,
            d.n_augment,
            d.teacher_bn,
            d.teacher_logits_seed,
            cfg.run.eval_batch_size,
            cfg.run.channels_last,
        )
        computed.append(logits)
        meta = {
            "teacher_name": teacher.name,
            "teacher_version": teacher.version,
            "teacher_uri": teacher.uri,
            "teacher_run_id": teacher.source_run_id,
            "dataset": dataset,
            "data_digest": digest,
            "n_augment": d.n_augment,
            "teacher_bn": d.teacher_bn,
            "seed": d.teacher_logits_seed,
            "num_classes": num_classes,
            "n_images": len(split),
            "key": key,
        }
        tags = {
            "robustlogits.job": TEACHER_LOGITS_JOB,
            "teacher_name": str(teacher.name),
            "teacher_version": str(teacher.version),
        }
        # Reusable artifacts, not trainings: they get an experiment of their own.
        with tracking.artifact_run(
            cfg.run.experiment + TEACHER_LOGITS_EXPERIMENT_SUFFIX,
            f"teacher-logits-{teacher.name}-v{teacher.version}",
            tags,
        ) as run_id:
            tracking.log_params({f"teacher_logits.{k}": v for k, v in meta.items()})
            tracking.log_model_inputs([teacher.model_id])
            array = logits.cpu().numpy().astype(np.float32)
            tracking.log_arrays(
                TEACHER_LOGITS_ARTIFACT,
                logits=array,
                indices=split.indices,
                labels=split.labels.cpu().numpy(),
                meta=np.asarray(json.dumps(meta)),
            )
            tracking.log_json(
                meta | {"digest": hashlib.sha256(array.tobytes()).hexdigest()}, "teacher_logits/teacher_logits.json"
            )
            tracking.log_results({"teacher_train_error_rate": float((logits.argmax(1) != split.labels).float().mean())})
        return run_id

    found = tracking.find_or_run(key, compute)
    if found.reused:
        return found.run_id, load_teacher_logits(found.run_id, split, num_classes, dataset), True
    return found.run_id, computed[0], False


# --- the job -------------------------------------------------------------------------------------


def run_distill(cfg: DistillConfig, progress: bool | None = None) -> str:
    """Distil, register the student (idempotent by weights and run), attack it. The same
    distillation again after its process was killed continues the killed run."""
    if not cfg.run.checkpoint_epochs:
        cfg.run.checkpoint_epochs = (cfg.optim.epochs,)
    cfg.validate()
    tracking.check_registration(cfg.registered_model_name())
    tracking.check_store(cfg.run.experiment)
    device = resolve_device(cfg.run.device)
    d = cfg.distill
    teacher = tracking.resolve_and_load(
        cfg.teacher_spec(), stage=d.teacher_stage, alias=d.teacher_alias, version=d.teacher_version, device=device
    )
    st_teacher = tracking.resolve_and_load(cfg.st_teacher_spec(), device=device) if d.manipulation == "hybrid" else None
    adopt_teacher_data(cfg, teacher)
    cfg.validate()
    cfg.data.val_per_class = cfg.resolved_val_per_class()  # logged as what it is, not "None"
    torch.manual_seed(cfg.run.seed)
    bundle = load_bundle(cfg, device, hint=teacher.data_dir, digest=teacher.data_digest)
    for who in filter(None, (teacher, st_teacher)):
        classes = model_class_count(who.model, device)
        if classes != bundle.num_classes:
            raise UserError(
                f"teacher {who.describe()} outputs {classes} classes but {cfg.data.dataset} has {bundle.num_classes}"
            )
    cfg.check_k(bundle.num_classes)
    if d.attack:
        check_n_examples(d.attack_n_examples, bundle.test)

    logits_run, targets, reused = obtain_teacher_logits(
        teacher, cfg, bundle.train, bundle.digest, bundle.num_classes, d.teacher_logits_run
    )
    st_targets = None
    if st_teacher is not None:
        _, st_targets, _ = obtain_teacher_logits(st_teacher, cfg, bundle.train, bundle.digest, bundle.num_classes)
    manipulated = manipulate(
        targets,
        bundle.train.labels,
        d.manipulation,
        k=cfg.resolved_k(),
        fix_mode=d.fix_mode,
        st_targets=st_targets,
        seed=d.manipulation_seed,
    )
    report = manipulation_report(targets, manipulated, bundle.train.labels)

    amp = resolve_amp(cfg.run.amp, device)
    state = new_state(cfg, bundle, device)
    objective = distillation_objective(manipulated, d.loss, d.temperature)
    lineage = {
        registry.TEACHER_NAME_TAG: teacher.name,
        registry.TEACHER_VERSION_TAG: teacher.version,
        "teacher_run_id": teacher.source_run_id,
        "teacher_uri": teacher.uri,
        registry.MANIPULATION_TAG: d.manipulation,
        "k": cfg.resolved_k(),
        "fix_mode": d.fix_mode,
        "loss": d.loss,
        "temperature": d.temperature,
        "teacher_logits_run": logits_run,
        "teacher_logits_artifact": TEACHER_LOGITS_ARTIFACT,
    }
    if st_teacher is not None:
        lineage |= {"st_teacher_name": st_teacher.name, "st_teacher_version": st_teacher.version}
    lineage = {k: str(v) for k, v in lineage.items() if v is not None}
    name = f"distill-{d.manipulation}" + (f"-k{cfg.resolved_k()}" if cfg.resolved_k() else "") + f"-{d.loss}"
    tags = {
        "robustlogits.job": "distill",
        "dataset": cfg.data.dataset,
        "arch": cfg.model.arch,
        "preset": cfg.preset,
    } | lineage
    identity = tracking.job_key(
        {"job": "distill", **keyed_view(cfg), "teacher": teacher.model_id or teacher.uri, "data": bundle.digest}
    )
    reclaimed = tracking.reclaim(identity)
    if reclaimed and STATE_ARTIFACT in tracking.list_artifacts(reclaimed, "training_state"):
        state.load_bytes(tracking.read_artifact(reclaimed, STATE_ARTIFACT))
    opened = (
        tracking.resume_run(reclaimed, cfg.run.experiment)
        if reclaimed
        else tracking.job_run(cfg.run.experiment, name, tags, identity=identity)
    )
    with opened as run_id:
        log_run_inputs(cfg, bundle, amp)
        tracking.log_params({"teacher_logits_reused": reused})
        tracking.log_model_inputs([m.model_id for m in (teacher, st_teacher) if m is not None])
        tracking.log_results({f"targets_{k}": float(v) for k, v in report.items()})
        train_tracked(cfg, bundle, state, objective, run_id, amp, version_tags=lineage, progress=progress)
        tracking.log_results(distance_to_teacher(state.model, bundle.train.images, targets))
        result = None
        if d.attack:
            result = attack_split(
                state.model,
                bundle.test,
                bundle.num_classes,
                n_examples=d.attack_n_examples,
                n_iter=d.attack_n_iter,
                seed=cfg.run.seed,
                eps=cfg.adversary.eps,
                device=device,
                progress=progress,
            )
            model_ids = state.extra.get("model_ids", {})  # the student's logged model: the attack's metrics are its own
            tracking.log_attack_result(result, model_id=model_ids[max(model_ids)] if model_ids else None)
    versions = state.extra.get("versions", {})
    if result is not None and versions:
        tracking.set_version_tags(
            cfg.registered_model_name(),
            versions[max(versions)],
            {
                "adversarial_accuracy": f"{result.adversarial_accuracy:.4f}",
                "attacked_natural_accuracy": f"{result.natural_accuracy:.4f}",
                "adversarial_accuracy_run": run_id,
                "adversarial_accuracy_setting": f"apgd-ce-dlr eps={cfg.adversary.eps:.5f} n={result.n_examples} "
                f"n_iter={d.attack_n_iter}",
            },
        )
    tracking.update_students_tag(teacher.name, teacher.version)
    return run_id


def distance_to_teacher(model: torch.nn.Module, images: torch.Tensor, teacher: torch.Tensor, n: int = 5000) -> dict:
    """How closely the student matches the *unmanipulated* teacher on its training images (A.3 compares
    L1 and KL students by both distances), on the first `n` images."""
    student = compute_logits(model, images[:n]).float()
    target = teacher[:n].to(student.device).float()
    kl = torch.nn.functional.kl_div(
        student.log_softmax(1), target.log_softmax(1), log_target=True, reduction="batchmean"
    )
    return {"final_l1_to_teacher": float((student - target).abs().mean()), "final_kl_to_teacher": float(kl)}


def adopt_teacher_data(cfg: DistillConfig, teacher: ResolvedModel) -> None:
    """The student trains on the teacher's dataset; its data is found again by the teacher's
    recorded folder (a hint) and content digest, wherever this job runs (see `load_bundle`)."""
    if teacher.dataset:
        cfg.data.dataset = teacher.dataset
    if cfg.data.dataset == "synthetic":
        synthetic = tracking.synthetic_params_from_run(teacher.source_run_id) or {}
        for key, value in synthetic.items():
            setattr(cfg.data, f"synthetic_{key}" if key != "num_classes" else "synthetic_classes", value)
