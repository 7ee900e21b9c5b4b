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
            )
    finally:
        pytorch_logger.setLevel(level)
        model.train(was_training)
    return info


def _load_graph(model_dir: Path) -> torch.nn.Module:
    """MLflow's exported (pt2) graph of a model with no factory, read with pickle refused."""
    with model_format.pickle_free():
        return mlflow.pytorch.load_model(str(model_dir), map_location=torch.device("cpu"))


def load_model(model_uri: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Download a logged model and rebuild it from its spec and weights (legacy pickles through an
    allowlist): nothing stored in the tracking server is executed."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

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
                return model_format.load_model_dir(folder, device, load_graph=_load_graph)
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
            return model_format.load_model_dir(Path(local), device, load_graph=_load_graph)
    except UserError as exc:
        raise UserError(f"cannot load model {model_uri}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot load model {model_uri}: {str(exc).splitlines()[0]}") from None


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
    model = load_model(uri, device)
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
