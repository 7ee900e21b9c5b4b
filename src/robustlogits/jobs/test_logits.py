"""Test-split logits of registered models: computed once per model version and data digest, then reused.

Every cross-model analysis starts from "these models' fp32 logits on the test split". The
sources, in order: the checkpoint's own `test_logits/epoch_NNNN.npz` (saved at training time)
when its data digest, labels and indices match the split we load; a FINISHED `test-logits` run
carrying the same key (`tracking.job_key` of model version, data digest and precision); else the
logits are computed in eval mode, fp32, and stored on such a run for the next analysis.

Opening is separate from computing so callers can check their own arguments (class names,
attack runs) against the models and the data before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from robustlogits import tracking
from robustlogits.core.data import RawDataset, Split, load_test_split
from robustlogits.core.device import resolve_device
from robustlogits.core.errors import UserError
from robustlogits.core.logits import compute_logits
from robustlogits.core.models import model_class_count
from robustlogits.tracking import ResolvedModel, registry

log = logging.getLogger(__name__)
ARTIFACT = "test_logits/test_logits.npz"
JOB_TAG = "test-logits"


@dataclass
class ModelLogits:
    """One model's fp32 test-split logits, aligned with `TestModels.test` (same example order)."""

    label: str  # unique, human-readable ("cifar10-cnn-small-at v3")
    model: ResolvedModel
    logits: np.ndarray  # float32 [N, C]
    source: str  # "checkpoint" | "cache" | "computed"
    run_id: str | None = None  # the run whose artifact holds them

    @property
    def identity(self) -> dict:
        return identity(self.model)


def identity(model: ResolvedModel) -> dict:
    """What names a model across runs: its registry version, else its (immutable) runs:/ URI."""
    if model.name and model.version:
        return {"name": model.name, "version": model.version}
    return {"uri": model.uri}


@dataclass
class TestModels:
    """Resolved models sharing one dataset and class count, and that dataset's test split."""

    specs: list[str]
    models: list[ResolvedModel]
    labels: list[str]
    test: Split
    raw: RawDataset
    dataset: str
    device: object
    experiment: str = "robustlogits"
    _logits: list[ModelLogits] | None = field(default=None, repr=False)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.raw.classes

    @property
    def y(self) -> np.ndarray:
        return self.test.labels.cpu().numpy().astype(np.int64)

    @property
    def indices(self) -> np.ndarray:
        return np.asarray(self.test.indices, dtype=np.int64)

    def class_index(self, name: str) -> int:
        """A class given by name (`frog`) or index; anything else is a clear error."""
        if name in self.classes:
            return self.classes.index(name)
        if str(name).isdigit() and int(name) < len(self.classes):
            return int(name)
        raise UserError(f"no class {name!r} in {self.dataset}; classes: {', '.join(self.classes)}")

    def logits(self, progress: bool | None = None) -> list[ModelLogits]:
        if self._logits is None:
            self._logits = [_logits_for(m, label, self) for m, label in zip(self.models, self.labels)]
        return self._logits


def open_models(
    specs: list[str],
    *,
    data_dir: str | None = None,
    dataset: str | None = None,
    device: str = "auto",
    experiment: str = "robustlogits",
    minimum: int = 1,
    purpose: str = "this analysis",
) -> TestModels:
    """Resolve and load every model, load the shared test split, and check they fit together."""
    specs = [s for s in specs if s]
    if len(specs) < minimum:
        raise UserError(
            f"{purpose} needs at least {minimum} model{'s' if minimum > 1 else ''}, got {len(specs)} "
            "(registered names, models:/ or runs:/ URIs)"
        )
    dev = resolve_device(device)
    models = [tracking.resolve_and_load(spec, device=dev) for spec in specs]
    names = {dataset or m.dataset for m in models}
    if None in names or len(names) != 1:
        raise UserError(f"models must share one known dataset (found {sorted(map(str, names))}); pass --dataset")
    name = names.pop()
    synthetic = tracking.synthetic_params_from_run(models[0].source_run_id) if name == "synthetic" else None
    digests = {m.data_digest for m in models if m.data_digest}
    # The recorded folder is a hint; data are accepted only with the digest the models were trained on.
    test, raw = load_test_split(
        name, data_dir, dev, synthetic, hint=models[0].data_dir, digest=digests.pop() if len(digests) == 1 else None
    )
    counts = {m.describe(): model_class_count(m.model, dev) for m in models}
    if len(set(counts.values())) != 1:
        raise UserError("models have different class counts: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    if next(iter(counts.values())) != raw.num_classes:
        raise UserError(f"the models output {next(iter(counts.values()))} classes but {name} has {raw.num_classes}")
    return TestModels(specs, models, unique_labels([m.describe() for m in models]), test, raw, name, dev, experiment)


def unique_labels(labels: list[str]) -> list[str]:
    """The same model given twice stays two entries (a model against itself is a valid check)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    return out


def cache_key(model: ResolvedModel, data_digest: str) -> str:
    return tracking.job_key(
        {"job": JOB_TAG, "model": identity(model), "data_digest": data_digest, "precision": "fp32", "mode": "eval"}
    )


def _logits_for(model: ResolvedModel, label: str, ctx: TestModels) -> ModelLogits:
    stored = _checkpoint_logits(model, ctx)
    if stored is not None:
        return ModelLogits(label, model, stored, "checkpoint", model.source_run_id)
    computed: list[np.ndarray] = []

    def compute() -> str:
        log.info("computing test logits of %s (%d images, fp32)", label, len(ctx.test))
        logits = compute_logits(model.model, ctx.test.images).cpu().numpy().astype(np.float32)
        computed.append(logits)
        tags = {
            "robustlogits.job": JOB_TAG,
            "data_digest": ctx.raw.digest,
            "model_uri": model.uri,
            **{f"model_{k}": v for k, v in identity(model).items() if k != "uri"},
        }
        with tracking.artifact_run(ctx.experiment, f"test-logits {label}", tags) as run_id:
            tracking.log_params(
                {"model_uri": model.uri, "dataset": ctx.dataset, "n_examples": len(ctx.test), "precision": "fp32"}
            )
            tracking.log_model_inputs([model.model_id])
            tracking.log_dataset_input(
                ctx.dataset, ctx.raw.digest, f"test/{ctx.raw.source}", "evaluation", len(ctx.test)
            )
            tracking.log_arrays(ARTIFACT, logits=logits, labels=ctx.y, indices=ctx.indices)
        return run_id

    found = tracking.find_or_run(cache_key(model, ctx.raw.digest), compute)
    if not found.reused:
        return ModelLogits(label, model, computed[0], "computed", found.run_id)
    with tracking.downloaded(found.run_id, ARTIFACT) as path, np.load(path) as z:
        if not (np.array_equal(z["indices"], ctx.indices) and np.array_equal(z["labels"], ctx.y)):
            raise UserError(
                f"the cached test logits of {label} (run {found.run_id}) are for another split "
                "of the same data; delete that run to compute them again"
            )
        return ModelLogits(label, model, z["logits"].astype(np.float32), "cache", found.run_id)


def _checkpoint_logits(model: ResolvedModel, ctx: TestModels) -> np.ndarray | None:
    """The logits saved with the checkpoint, if they were computed on exactly this test split."""
    artifact = model.tags.get(registry.TEST_LOGITS_TAG)
    if not artifact or not model.source_run_id or model.data_digest != ctx.raw.digest:
        return None
    try:
        with tracking.downloaded(model.source_run_id, artifact) as path, np.load(path) as z:
            if not (np.array_equal(z["indices"], ctx.indices) and np.array_equal(z["labels"], ctx.y)):
                return None
            return z["logits"].astype(np.float32)
    except UserError:
        return None


def logits_of_run(spec: str) -> tuple[np.ndarray, np.ndarray, str]:
    """`RUN_ID` or `RUN_ID:EPOCH`: a train run's checkpoint test logits (latest checkpoint by default),
    or an attack run's clean logits."""
    run_id, _, epoch = spec.partition(":")
    run = tracking.run_record(run_id)
    label = run.tags.get("mlflow.runName", run_id[:8])
    if run.tags.get("robustlogits.job") == "attack":
        result = tracking.load_attack_result(run_id)
        return result.clean_logits, result.label, label
    files = tracking.list_artifacts(run_id, "test_logits")
    epochs = sorted(int(Path(f).stem.split("_")[-1]) for f in files if Path(f).stem.split("_")[-1].isdigit())
    if not epochs:
        raise UserError(f"run {run_id} has no checkpoint test logits (train with --checkpoint-epochs)")
    chosen = int(epoch) if epoch else epochs[-1]
    if chosen not in epochs:
        raise UserError(f"run {run_id} has test logits for epochs {epochs}, not {chosen}")
    with tracking.downloaded(run_id, f"test_logits/epoch_{chosen:04d}.npz") as path, np.load(path) as z:
        return z["logits"], z["labels"], f"{label} (epoch {chosen})"


def log_inputs(ctx: TestModels) -> None:
    """The analysed models and the test data as inputs of the active run."""
    tracking.log_model_inputs(list(dict.fromkeys(m.model_id for m in ctx.models if m.model_id)))
    tracking.log_dataset_input(ctx.dataset, ctx.raw.digest, f"test/{ctx.raw.source}", "evaluation", len(ctx.test))
    tracking.set_tags({"data_digest": ctx.raw.digest})
