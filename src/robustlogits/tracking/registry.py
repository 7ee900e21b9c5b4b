"""The model registry: versions with their lineage tags, stages and aliases, and the questions
jobs ask of it (which version is the teacher, which students came from it).

Tag names are constants here so the code that writes a tag and the code that reads it agree.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from robustlogits.core.errors import UserError

# On a checkpoint's version (train): what it is and where it came from.
EPOCH_TAG = "epoch"
TRAINING_TAG = "training"
DATASET_TAG = "dataset"
SOURCE_RUN_TAG = "source_run_id"
TEST_LOGITS_TAG = "test_logits_artifact"
DATA_DIGEST_TAG = "data_digest"  # also on the run that trained it
NUM_CLASSES_TAG = "num_classes"
# On a student's version (distill): its teacher and what was done to the teacher's logits.
TEACHER_NAME_TAG = "teacher_name"
TEACHER_VERSION_TAG = "teacher_version"
MANIPULATION_TAG = "manipulation"
# On a teacher's version: its registered students, rebuilt from the registry as each registers.
STUDENTS_TAG = "students"
# On any attacked version: the last attack's outcome and the run that measured it.
ADVERSARIAL_ACCURACY_TAG = "adversarial_accuracy"
# On every version (and as its logged model's param): the SHA-256 of its weights, checked on every load.
WEIGHTS_SHA_TAG = "weights_sha256"
STAGES = ("None", "Staging", "Production", "Archived")


# MLflow's documented naming rules, checked here rather than through its private validators (MLflow
# 3.18 renamed them). Registered model names: MLflow refuses empty names, `/`, `:` and names that are
# not their own normalised path (`.`, `..x`); ours are the conservative subset that is also safe in a
# `models:/NAME/VERSION` URI and as a file store's folder name (255 bytes at most). Aliases: MLflow's
# alphanumerics, `_` and `-` (ASCII here), at most 255 characters, neither `latest` nor `v<digits>`.
# tests/test_registry_guards.py checks both against what MLflow itself accepts and refuses.
MODEL_NAME_RULE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
ALIAS_RULE = re.compile(r"[A-Za-z0-9_-]{1,255}")
RESERVED_ALIAS = re.compile(r"latest|v\d+", re.IGNORECASE)


def model_name_problem(name: str) -> str | None:
    """Why the registry would refuse (or could not safely hold) `name`, or None."""
    if not MODEL_NAME_RULE.fullmatch(name or ""):
        return "names are 1 to 255 letters, digits, '_', '-' and '.', not starting with '.' or '-'"
    return None


def alias_problem(alias: str) -> str | None:
    """Why the registry would refuse `alias`, or None."""
    if not ALIAS_RULE.fullmatch(alias or ""):
        return "aliases are 1 to 255 letters, digits, '_' and '-'"
    if RESERVED_ALIAS.fullmatch(alias):
        return "'latest' and 'v<digits>' are reserved for versions"
    return None


def check_registration(name: str, stage: str | None = None, alias: str | None = None) -> None:
    """What registering `name` and promoting to `stage`/`alias` will ask of the registry, checked
    before anything is written: a refused name, a reserved alias or an unknown stage is one clear
    error, never a half-done registration."""
    if problem := model_name_problem(name):
        raise UserError(f"the registry refuses the registered model name {name!r}: {problem}")
    if stage is not None and stage.lower() not in {s.lower() for s in STAGES}:
        raise UserError(f"unknown stage {stage!r}; MLflow's stages are {', '.join(STAGES)}")
    if alias is not None and (problem := alias_problem(alias)):
        raise UserError(f"the registry refuses the alias {alias!r}: {problem}")


def find_version(name: str, digest: str, same: dict[str, Any] | None = None):
    """The READY version of `name` holding these weights (and these tags), or None: registering is
    idempotent by content."""
    for mv in reversed(model_versions(name)):
        if mv.tags.get(WEIGHTS_SHA_TAG) != digest or str(getattr(mv, "status", "READY")) not in ("READY", "None"):
            continue
        if all(mv.tags.get(k) == str(v) for k, v in (same or {}).items()):
            return mv
    return None


def expected_digest(mv) -> str | None:
    """The weights digest the registry recorded for a version (tag, else its logged model's param)."""
    if mv is None:
        return None
    if mv.tags.get(WEIGHTS_SHA_TAG):
        return mv.tags[WEIGHTS_SHA_TAG]
    model_id = logged_model_id(mv)
    return logged_model_digest(model_id) if model_id else None


def logged_model_digest(model_id: str) -> str | None:
    try:
        return MlflowClient().get_logged_model(model_id).params.get(WEIGHTS_SHA_TAG)
    except Exception:  # noqa: BLE001 - a store without logged models: the version tag is all there is
        return None


def register_version(model_uri: str, name: str, tags: dict[str, Any]):
    """Create a registered-model version with its tags, or nothing at all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})


def promote(name: str, version: str | int, stage: str | None, alias: str | None) -> None:
    """Stage (deprecated in MLflow but still how many teams pull models) and alias, both supported."""
    client = MlflowClient()
    if stage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, str(version), stage, archive_existing_versions=True)
    if alias:
        client.set_registered_model_alias(name, alias, str(version))


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def set_version_tags(name: str, version: str | int, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def resolve_model(spec: str, *, stage: str | None = None, alias: str | None = None, version: str | int | None = None):
    """Turn a user's model reference into (model URI, registry version or None).

    Accepts `models:/NAME@ALIAS`, `models:/NAME/STAGE`, `models:/NAME/VERSION`, `runs:/ID/PATH`,
    or a registered NAME plus one of stage/alias/version.
    """
    client = MlflowClient()
    if spec.startswith("runs:/"):
        return spec, None
    if spec.startswith("models:/"):
        body = spec[len("models:/") :]
        if "@" in body:
            name, alias = body.split("@", 1)
        elif "/" in body:
            name, ref = body.split("/", 1)
            if ref.isdigit():
                version = ref
            else:
                stage = ref
        else:
            name = body
    else:
        name = spec
    if sum(x is not None for x in (stage, alias, version)) > 1:
        raise UserError("give only one of stage, alias or version")
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise UserError(f"no registered model named {name!r}") from None
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version is not None:
            mv = client.get_model_version(name, str(version))
        else:
            stage = stage or "Production"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                found = client.get_latest_versions(name, stages=[stage])
            if not found:
                raise UserError(f"registered model {name!r} has no version in stage {stage!r}")
            mv = found[0]
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise UserError(f"registered model {name!r} has no {what}: {str(exc).splitlines()[0]}") from None
    return f"models:/{name}/{mv.version}", mv


def logged_model_id(mv) -> str | None:
    """The MLflow 3 logged-model id behind a registry version. Some stores (sqlite) leave the
    version's `model_id` empty; its source `models:/m-...` still names the logged model."""
    if mv is None:
        return None
    if getattr(mv, "model_id", None):
        return mv.model_id
    source = getattr(mv, "source", "") or ""
    if source.startswith("models:/m-"):
        return source[len("models:/") :].split("/", 1)[0]
    return None


def _search_versions(query: str, keep) -> list:
    client = MlflowClient()
    try:
        return list(client.search_model_versions(query))
    except Exception:  # noqa: BLE001 - stores without that filter: filter here
        return [v for v in client.search_model_versions("") if keep(v)]


def model_versions(name: str) -> list:
    """Every version of a registered model, oldest first."""
    found = _search_versions(f"name='{name}'", lambda v: v.name == name)
    return sorted(found, key=lambda v: int(v.version))


def run_versions(run_id: str) -> list:
    """Registry versions logged by one run (a train run's checkpoints, a distillation's student)."""
    found = _search_versions(f"run_id = '{run_id}'", lambda v: v.run_id == run_id)
    return sorted(found, key=lambda v: int(v.version))


def checkpoint_uri(run_id: str, epoch: int | None = None) -> str:
    """`models:/NAME/VERSION` of a run's checkpoint at `epoch` (None: its last registered one)."""
    versions = run_versions(run_id)
    if epoch is not None:
        versions = [v for v in versions if v.tags.get(EPOCH_TAG) == str(epoch)]
    if not versions:
        raise UserError(f"run {run_id} registered no model" + (f" at epoch {epoch}" if epoch is not None else ""))
    version = max(versions, key=lambda v: int(v.tags.get(EPOCH_TAG, 0) or 0))
    return f"models:/{version.name}/{version.version}"


def students_of(teacher_name: str, teacher_version: str | int | None = None) -> list:
    """Every registered student version distilled from a teacher (optionally one version of it)."""
    query = f"tags.{TEACHER_NAME_TAG} = '{teacher_name}'"
    if teacher_version is not None:
        query += f" and tags.{TEACHER_VERSION_TAG} = '{teacher_version}'"
    return _search_versions(
        query,
        lambda v: (
            v.tags.get(TEACHER_NAME_TAG) == teacher_name
            and (teacher_version is None or v.tags.get(TEACHER_VERSION_TAG) == str(teacher_version))
        ),
    )


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
    label = tags.get(MANIPULATION_TAG, "?") + (f" k={tags['k']}" if tags.get("k") else "")
    return label + (f", adv {tags[ADVERSARIAL_ACCURACY_TAG]}" if tags.get(ADVERSARIAL_ACCURACY_TAG) else "")


TEACHER_RUN_TAG = "teacher_version"  # on a training run: the version of it that is the teacher now
SUPERSEDED_TAG = "teacher_version_superseded"  # ... and once another run's version took over


def promote_teacher(name: str, version: str | int, stage: str | None, alias: str | None, run_id: str) -> None:
    """Make a run's version the teacher, then bring every training run's `teacher_version` tag in
    line with the registry: only the run whose version holds the alias (else the stage) keeps the
    tag; the others say which version superseded theirs. Each promoting process reconciles after
    its own promotion, so the last one to finish leaves the tags as the registry is."""
    client = MlflowClient()
    client.set_tag(run_id, TEACHER_RUN_TAG, str(version))
    promote(name, version, stage, alias)
    try:
        if alias:
            holder = client.get_model_version_by_alias(name, alias)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                holder = (client.get_latest_versions(name, stages=[stage]) or [None])[0]
    except MlflowException:
        return
    if holder is None:
        return
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.registered_model = '{name}'")
    for run in runs:
        mine = run.data.tags.get(TEACHER_RUN_TAG)
        if run.info.run_id == holder.run_id:
            if mine != str(holder.version):
                client.set_tag(run.info.run_id, TEACHER_RUN_TAG, str(holder.version))
            continue
        if mine is not None:
            client.set_tag(
                run.info.run_id,
                SUPERSEDED_TAG,
                f"version {mine} was the teacher until version {holder.version} (run {holder.run_id}) took over",
            )
            client.delete_tag(run.info.run_id, TEACHER_RUN_TAG)
