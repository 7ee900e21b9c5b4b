"""`robustlogits import`: register a model trained elsewhere so every job treats it like our own.

The checkpoint's format is read from the file, not from its name: a TorchScript archive, a state
dict (`.pt`, `.pth`, `.safetensors`; rebuilt with `--arch`: ours, the community's CIFAR networks or
`torchvision:NAME`), or a pickled module (only with `trust_pickle`, since unpickling runs code from
the file); or a RobustBench model already on disk. Before anything is written the model is run on
stratified test images: the output must be [N, classes] and finite, and its natural accuracy is
reported (with a warning when it is within a few points of chance, the mark of a wrong
normalisation). The import run then logs the model in our stored format (weights plus spec; an
exported graph or TorchScript when no architecture is known) and registers it with the tags the
other jobs read (`dataset`, `num_classes`, `arch` when known) plus its provenance (source path,
SHA-256, format, normalisation) and its check accuracy.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from robustlogits import tracking
from robustlogits.config import DataConfig, ImportConfig
from robustlogits.core import model_format
from robustlogits.core.checkpoints import build_imported, check_model, near_chance, storable
from robustlogits.core.data import load_test_split, stratified_indices
from robustlogits.core.device import resolve_device
from robustlogits.core.model_format import stored_digest
from robustlogits.core.models import EXTERNAL_ARCH
from robustlogits.tracking import registry


def run_import(cfg: ImportConfig, log=print) -> dict:
    """Check, then log and register; returns the run id, version and natural accuracy.

    Everything that can be refused is checked before anything is written: the options, what the
    registry will accept (name, stage, alias), the checkpoint (read and fitted to its architecture
    before any test image is decoded), then the model on test images. The same weights already
    registered under the name are that version, not a second one."""
    cfg.validate()
    tracking.check_registration(cfg.name, cfg.stage, cfg.alias)
    tracking.check_store(cfg.experiment)
    device = resolve_device(cfg.device)
    data = DataConfig(dataset=cfg.dataset, data_dir=cfg.data_dir)
    synthetic = {
        "train_per_class": data.synthetic_train_per_class,
        "test_per_class": data.synthetic_test_per_class,
        "num_classes": data.synthetic_classes,
        "size": data.synthetic_size,
    }
    classes = {"cifar10": 10, "cifar100": 100}.get(cfg.dataset, data.synthetic_classes)
    model, source = build_imported(cfg, classes)
    test, raw = load_test_split(
        cfg.dataset, cfg.data_dir, torch.device("cpu"), synthetic if cfg.dataset == "synthetic" else None
    )
    n = min(cfg.check_images, len(test))
    check = test.subset(stratified_indices(test.labels.numpy(), n, 0))
    what = cfg.robustbench or cfg.checkpoint
    accuracy = check_model(model, check.images, check.labels, raw.num_classes, what)
    model = storable(model, check.images, what)
    stored_as = model_format.spec_of(model).builder
    log(f"{what}: natural accuracy {accuracy:.4f} on {n} {cfg.dataset} test images")
    warning = near_chance(accuracy, raw.num_classes, source["normalization"])
    if warning:
        log(f"warning: {warning}")
    result = {"name": cfg.name, "natural_accuracy": accuracy, "n_images": n, "stored_as": stored_as, **source}
    result["warning"] = warning

    digest = stored_digest(model)
    existing = registry.find_version(cfg.name, digest)
    if existing is not None and tracking.run_record(existing.run_id).status == "FINISHED":
        tracking.promote(cfg.name, existing.version, cfg.stage, cfg.alias)
        log(f"{cfg.name} version {existing.version} already holds these weights (sha256 {digest[:16]}): reused")
        return result | {"run_id": existing.run_id, "version": str(existing.version), "reused": True}

    tags = {
        "dataset": cfg.dataset,
        "num_classes": raw.num_classes,
        "natural_accuracy": f"{accuracy:.4f}",
        "natural_accuracy_examples": n,
        "source": "import",
        "stored_as": stored_as,
        **source,
    }
    if warning:
        tags["natural_accuracy_warning"] = warning
    if model.arch != EXTERNAL_ARCH:
        tags["arch"] = model.arch
    params = {f"import.{k}": v for k, v in asdict(cfg).items()} | {
        "data.dataset": cfg.dataset,
        "data.data_dir": cfg.data_dir,
    }
    if cfg.dataset == "synthetic":  # lets later jobs regenerate the same synthetic data
        params |= {f"data.synthetic_{k if k != 'num_classes' else 'classes'}": v for k, v in synthetic.items()}
    identity = tracking.job_key({"job": "import", **params, "weights": digest})
    reclaimed = tracking.reclaim(identity)  # a killed import of the same weights: finish that run
    opened = (
        tracking.resume_run(reclaimed, cfg.experiment)
        if reclaimed
        else tracking.job_run(
            cfg.experiment,
            f"import-{cfg.name}",
            {"robustlogits.job": "import", **{k: str(v) for k, v in source.items()}},
            identity=identity,
        )
    )
    with opened as run_id:
        tracking.log_params(params)
        if not reclaimed:
            tracking.log_dataset_input(cfg.dataset, raw.digest, f"test/{raw.source}", "evaluation", n)
        tracking.log_results({"natural_accuracy": accuracy})
        tracking.set_tags(
            {"natural_accuracy": f"{accuracy:.4f}", "stored_as": stored_as}
            | ({"natural_accuracy_warning": warning} if warning else {})
        )
        tags[registry.SOURCE_RUN_TAG] = run_id
        registered = tracking.register_model(
            model.to(device), "model", cfg.name, tags, {registry.SOURCE_RUN_TAG: run_id}
        )
        tracking.promote(cfg.name, registered.version.version, cfg.stage, cfg.alias)
    return result | {"run_id": run_id, "version": str(registered.version.version), "reused": False}
