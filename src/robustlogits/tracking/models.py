"""Models pulled from the registry (or a run) together with what their lineage says about them.

Jobs and analyses all start from "this model, trained on which data, with how many classes";
this module answers that once, beside the registry code in `tracking`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from mlflow.tracking import MlflowClient

from robustlogits import tracking
@dataclass
class ResolvedModel:
    """A loaded model plus what the registry and its source run say about it."""

    uri: str
    model: torch.nn.Module
    name: str | None
    version: str | None
    model_id: str | None
    source_run_id: str | None
    dataset: str | None
    data_dir: str | None
    tags: dict
    data_digest: str | None = None

    def describe(self) -> str:
        return f"{self.name} v{self.version}" if self.name else self.uri


def resolve_and_load(spec: str, *, stage=None, alias=None, version=None, device="cpu") -> ResolvedModel:
    """Registry URI, registered name + stage/alias/version, or runs:/ URI -> loaded model and lineage."""
    uri, mv = tracking.resolve_model(spec, stage=stage, alias=alias, version=version)
    model = tracking.load_model(uri, device)
    source_run = mv.run_id if mv is not None else uri[len("runs:/"):].split("/", 1)[0]
    params, run_tags = {}, {}
    if source_run:
        try:
            run = MlflowClient().get_run(source_run)
            params, run_tags = run.data.params, run.data.tags
        except Exception:  # noqa: BLE001 - a model outliving its run is still attackable
            params, run_tags = {}, {}
    tags = dict(mv.tags) if mv is not None else {}
    data_dir = params.get("data.data_dir")
    return ResolvedModel(
        uri=uri, model=model, name=mv.name if mv else None, version=str(mv.version) if mv else None,
        model_id=tracking.logged_model_id(mv), source_run_id=source_run,
        dataset=tags.get("dataset") or params.get("data.dataset"),
        data_dir=None if data_dir in (None, "None", "") else data_dir, tags=tags,
        data_digest=tags.get("data_digest") or run_tags.get("data_digest"),
    )


def synthetic_params_from_run(run_id: str | None) -> dict | None:
    """Synthetic data is regenerated from the source run's settings (tests and tiny demos)."""
    if not run_id:
        return None
    params = MlflowClient().get_run(run_id).data.params
    keys = {"train_per_class": "data.synthetic_train_per_class", "test_per_class": "data.synthetic_test_per_class",
            "num_classes": "data.synthetic_classes", "size": "data.synthetic_size"}
    return {k: int(params[v]) for k, v in keys.items() if v in params} or None


def model_class_count(model: torch.nn.Module, device: torch.device, image_shape=(3, 32, 32)) -> int:
    count = getattr(model, "num_classes", None)
    if count is None:
        with torch.no_grad():
            count = model.eval()(torch.zeros(2, *image_shape, device=device)).shape[1]
    return int(count)


def run_versions(run_id: str) -> list:
    """Registry versions logged by one run (a train run's checkpoints, a distillation's student)."""
    client = MlflowClient()
    try:
        found = list(client.search_model_versions(f"run_id = '{run_id}'"))
    except Exception:  # noqa: BLE001 - stores without that filter: filter here
        found = [v for v in client.search_model_versions("") if v.run_id == run_id]
    return sorted(found, key=lambda v: int(v.version))


def checkpoint_uri(run_id: str, epoch: int | None = None) -> str:
    """`models:/NAME/VERSION` of a run's checkpoint at `epoch` (None: its last registered one)."""
    from robustlogits.core.errors import UserError

    versions = run_versions(run_id)
    if epoch is not None:
        versions = [v for v in versions if v.tags.get("epoch") == str(epoch)]
    if not versions:
        raise UserError(f"run {run_id} registered no model" + (f" at epoch {epoch}" if epoch is not None else ""))
    version = max(versions, key=lambda v: int(v.tags.get("epoch", 0) or 0))
    return f"models:/{version.name}/{version.version}"
