"""Models in MLflow: logged as weights plus architecture spec, loaded without running stored code,
and pulled from the registry together with what their lineage says about them.

Jobs and analyses all start from "this model, trained on which data, with how many classes";
`resolve_and_load` answers that once.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from robustlogits.core import model_format
from robustlogits.core.errors import UserError
from robustlogits.tracking import registry

PIP_REQUIREMENTS = ["torch", "torchvision", "robustlogits"]


def log_torch_model(model: torch.nn.Module, name: str, image_shape=(3, 32, 32)):
    """Log a model as weights plus architecture spec (see `core.model_format`), with MLflow's
    pickle-free `pt2` graph beside them so `mlflow.pytorch.load_model` also works (a network kept as
    TorchScript: MLflow's copy is that TorchScript archive). Returns MLflow's model info (`model_uri`,
    `model_id`)."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import Schema, TensorSpec

    was_training = model.training
    model.eval()
    example = np.random.default_rng(0).random((2, *image_shape), dtype=np.float32)
    classes = int(getattr(model, "num_classes", 0) or model(torch.from_numpy(example)).shape[1])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *image_shape))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    level = pytorch_logger.level
    try:
        pytorch_logger.setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec, files = model_format.write_files(model, Path(tmp))
            digest = spec.weights_sha256 or model_format.weights_digest(model)
            scripted = spec.builder == model_format.TORCHSCRIPT
            info = mlflow.pytorch.log_model(
                model.net if scripted else model,  # MLflow's flavour saves a ScriptModule with torch.jit.save
                name=name,
                serialization_format="pickle" if scripted else "pt2",
                input_example=example,
                signature=signature,
                extra_files=[str(f) for f in files],
                pip_requirements=PIP_REQUIREMENTS,
                validate_serving_input=False,  # our own load is tested; this one re-exports the graph
                params={registry.WEIGHTS_SHA_TAG: digest},  # where the artifact store cannot rewrite it
            )
    finally:
        pytorch_logger.setLevel(level)
        model.train(was_training)
    return info


@dataclass
class Registered:
    """A registered version and its logged model; `reused`: found by its weights, nothing new written."""

    version: object
    model_id: str | None
    digest: str
    reused: bool


def _run_logged_model(run_id: str, digest: str) -> str | None:
    """A model this run already logged with these weights (a killed attempt's, not yet registered)."""
    client = MlflowClient()
    try:
        experiment = client.get_run(run_id).info.experiment_id
        found = client.search_logged_models(
            experiment_ids=[experiment], filter_string=f"params.{registry.WEIGHTS_SHA_TAG} = '{digest}'"
        )
    except Exception:  # noqa: BLE001 - a store without logged-model search: log it again
        return None
    ready = [m for m in found if m.source_run_id == run_id and str(m.status).endswith("READY")]
    return ready[0].model_id if ready else None


def register_model(
    model: torch.nn.Module, artifact_name: str, name: str, tags: dict, same: dict | None = None
) -> Registered:
    """Log and register a model, idempotent by content: a READY version of `name` with the same
    weights digest (and the `same` tags) is returned as it is; a model the active run logged with
    these weights before it was killed is registered instead of logged again. The digest goes
    into the version's tags and the logged model's params, which `load_model` checks."""
    digest = model_format.stored_digest(model)
    found = registry.find_version(name, digest, same)
    if found is not None:
        return Registered(found, registry.logged_model_id(found), digest, True)
    run_id = mlflow.active_run().info.run_id
    model_id = _run_logged_model(run_id, digest)
    if model_id is None:
        model_id = log_torch_model(model, artifact_name).model_id
    version = registry.register_version(f"models:/{model_id}", name, tags | {registry.WEIGHTS_SHA_TAG: digest})
    return Registered(version, model_id, digest, False)


def _load_graph(model_dir: Path) -> torch.nn.Module:
    """MLflow's exported (pt2) graph of a model with no factory, read with pickle refused."""
    with model_format.pickle_free():
        return mlflow.pytorch.load_model(str(model_dir), map_location=torch.device("cpu"))


def load_model(
    model_uri: str, device: torch.device | str = "cpu", expected_sha256: str | None = None, what: str | None = None
) -> torch.nn.Module:
    """Download a logged model and rebuild it from its spec and weights (legacy pickles through an
    allowlist): nothing stored in the tracking server is executed. The weights must match
    `expected_sha256` (the registry's record, see `resolve_and_load`), else the spec's own digest."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    what = what or model_uri
    if expected_sha256 is None and model_uri.startswith("models:/m-"):
        expected_sha256 = registry.logged_model_digest(model_uri[len("models:/") :].split("/", 1)[0])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = get_artifact_repository(model_uri)
            names = {Path(f.path).name for f in repo.list_artifacts("")}
            if "extra_files" in names:  # spec format: spec and weights suffice, not the pt2 copy
                folder = Path(repo.download_artifacts("extra_files", dst_path=tmp)).parent
                spec = model_format.ArchitectureSpec.from_json(
                    (folder / "extra_files" / model_format.SPEC_FILE).read_text()
                )
                if spec.builder == model_format.GRAPH:  # an exported graph: MLflow's own folder
                    repo.download_artifacts("data", dst_path=tmp)
                    repo.download_artifacts("MLmodel", dst_path=tmp)
                return model_format.load_model_dir(
                    folder, device, load_graph=_load_graph, expected_sha256=expected_sha256, what=what
                )
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            return model_format.load_model_dir(
                Path(local), device, load_graph=_load_graph, expected_sha256=expected_sha256, what=what
            )
    except UserError as exc:
        raise UserError(str(exc) if str(exc).startswith(what) else f"cannot load model {what}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load model {what}: {str(exc).splitlines()[0]}") from None


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
    uri, mv = registry.resolve_model(spec, stage=stage, alias=alias, version=version)
    what = f"{mv.name} version {mv.version}" if mv is not None else uri
    model = load_model(uri, device, expected_sha256=registry.expected_digest(mv), what=what)
    source_run = mv.run_id if mv is not None else uri[len("runs:/") :].split("/", 1)[0]
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
        uri=uri,
        model=model,
        name=mv.name if mv else None,
        version=str(mv.version) if mv else None,
        model_id=registry.logged_model_id(mv),
        source_run_id=source_run,
        dataset=tags.get(registry.DATASET_TAG) or params.get("data.dataset"),
        data_dir=None if data_dir in (None, "None", "") else data_dir,
        tags=tags,
        data_digest=tags.get(registry.DATA_DIGEST_TAG) or run_tags.get(registry.DATA_DIGEST_TAG),
    )


def synthetic_params_from_run(run_id: str | None) -> dict | None:
    """Synthetic data is regenerated from the source run's settings (tests and tiny demos)."""
    if not run_id:
        return None
    params = MlflowClient().get_run(run_id).data.params
    keys = {
        "train_per_class": "data.synthetic_train_per_class",
        "test_per_class": "data.synthetic_test_per_class",
        "num_classes": "data.synthetic_classes",
        "size": "data.synthetic_size",
    }
    return {k: int(params[v]) for k, v in keys.items() if v in params} or None
