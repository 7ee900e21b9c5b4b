"""The `analyze` job: the paper's analyses, written to a folder and logged to an MLflow run.

`theory`: Appendix C's surrogate-logit model (figures C.1-C.3, key numbers as JSON and metrics),
optionally with logged runs' logits placed on the model's admissible-beta axes.
`manifold`: MFTMA of adversarial perturbation manifolds, stage by stage (Figure 5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from robustlogits import tracking
from robustlogits.errors import UserError


def _flat_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        name = re.sub(r"[^0-9A-Za-z_\-./ ]", "_", f"{prefix}{key}")
        if isinstance(value, dict):
            out |= _flat_numbers(value, f"{name}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            out[name] = float(value)
    return out


def logits_of_run(spec: str) -> tuple[np.ndarray, np.ndarray, str]:
    """`RUN_ID` or `RUN_ID:EPOCH`: a train run's checkpoint test logits (latest checkpoint by default),
    or an attack run's clean logits."""
    run_id, _, epoch = spec.partition(":")
    try:
        run = MlflowClient().get_run(run_id)
    except Exception:  # noqa: BLE001
        raise UserError(f"no run {run_id!r} in the tracking store") from None
    label = run.data.tags.get("mlflow.runName", run_id[:8])
    if run.data.tags.get("robustlogits.job") == "attack":
        from robustlogits.attack_records import load_attack_result

        result = load_attack_result(run_id)
        return result.clean_logits, result.label, label
    files = tracking.list_artifacts(run_id, "test_logits")
    epochs = sorted(int(Path(f).stem.split("_")[-1]) for f in files)
    if not epochs:
        raise UserError(f"run {run_id} has no checkpoint test logits (train with --checkpoint-epochs)")
    chosen = int(epoch) if epoch else epochs[-1]
    if chosen not in epochs:
        raise UserError(f"run {run_id} has test logits for epochs {epochs}, not {chosen}")
    path = tracking.download_artifact(run_id, f"test_logits/epoch_{chosen:04d}.npz")
    with np.load(path) as z:
        return z["logits"], z["labels"], f"{label} (epoch {chosen})"


def run_theory_job(out_dir: Path, class_counts=(10, 100), error_rate: float = 0.196, omega_correct: float = 1.0,
                   omega_wrong: float = 1.0, logits_runs: list[str] = (), track: bool = True,
                   experiment: str = "robustlogits") -> dict:
    from analysis.theory import place_empirical, run_theory

    out_dir = Path(out_dir)
    if track:
        tracking.check_store(experiment)
    models = [logits_of_run(spec) for spec in logits_runs]  # resolve runs before writing anything
    if models and len({z.shape[1] for z, _, _ in models}) != 1:
        raise UserError("the runs given have different class counts; compare runs of one dataset")
    summary = run_theory(out_dir, class_counts=tuple(class_counts), error_rate=error_rate,
                         omega_correct=omega_correct, omega_wrong=omega_wrong)
    if models:
        summary["empirical"] = place_empirical([(z, y, name) for z, y, name in models], None,
                                               out_dir / "fig_empirical_admissible.png")
        (out_dir / "theory.json").write_text(json.dumps(summary, indent=1, default=str))
    if track:
        with tracking.managed_run(experiment, run_name="analyze-theory", tags={"robustlogits.job": "analyze-theory"}):
            tracking.log_params({"class_counts": list(class_counts), "error_rate": error_rate,
                                 "omega_correct": omega_correct, "omega_wrong": omega_wrong,
                                 "logits_runs": list(logits_runs)})
            metrics = {k: v for k, v in _flat_numbers(summary).items() if not k.startswith("files")}
            mlflow.log_metrics(dict(list(metrics.items())[:900]))
            mlflow.log_artifacts(str(out_dir), "theory")
            summary["run_id"] = mlflow.active_run().info.run_id
    return summary


def run_manifold_job(model_specs: list[str], settings, out_dir: Path, data_dir: str | None = None,
                     dataset: str | None = None, track: bool = True, experiment: str = "robustlogits",
                     device: str = "auto", progress: bool | None = None) -> dict:
    """MFTMA per stage for each model; a parent run with the Figure 5 plot, a nested run per model
    whose metrics use the stage index as step (so the MLflow UI draws them against depth)."""
    from robustlogits.data import load_test_split
    from robustlogits.model_store import resolve_and_load, synthetic_params_from_run
    from robustlogits.manifold_pipeline import analyse_model, choose_images, figure5, figure_a8
    from robustlogits.device import resolve_device

    if not model_specs:
        raise UserError("give at least one model (registry URI, registered name, or runs:/ID/PATH)")
    if track:
        tracking.check_store(experiment)
    dev = resolve_device(device)
    models = [resolve_and_load(spec, device=dev) for spec in model_specs]
    datasets = {dataset or m.dataset for m in models}
    if None in datasets or len(datasets) != 1:
        raise UserError(f"models must share one known dataset (found {sorted(map(str, datasets))}); pass --dataset")
    name = datasets.pop()
    synthetic = synthetic_params_from_run(models[0].source_run_id) if name == "synthetic" else None
    test, _ = load_test_split(name, data_dir or models[0].data_dir, dev, synthetic)
    settings.validate(len(test))
    images = choose_images(test, settings)
    results = [analyse_model(m.model, m.describe(), images, settings, progress) for m in models]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"settings": vars(settings), "dataset": name, "image_indices": images.indices.tolist(),
               "models": {r.label: {"uri": m.uri, **r.table(), "details": [s.result.to_dict() for s in r.stages]}
                          for r, m in zip(results, models)}}
    (out_dir / "manifold.json").write_text(json.dumps(summary, indent=1, default=str))
    figures = {"figure5_manifold.png": figure5(results)}
    if settings.simulated:
        figures["figure_a8_mean_field_vs_simulated.png"] = figure_a8(results)
    for filename, fig in figures.items():
        fig.savefig(out_dir / filename, dpi=120)
    if track:
        with tracking.managed_run(experiment, run_name="analyze-manifold",
                                  tags={"robustlogits.job": "analyze-manifold", "dataset": name}) as parent:
            tracking.log_params({f"manifold.{k}": v for k, v in vars(settings).items()} | {"models": model_specs})
            tracking.log_model_inputs([m.model_id for m in models])
            for result, model in zip(results, models):
                with tracking.managed_run(experiment, run_name=f"manifold {result.label}", nested=True,
                                          tags={"robustlogits.job": "analyze-manifold-model", "model_uri": model.uri,
                                                "stages": ",".join(s.stage for s in result.stages)}):
                    for step, stage in enumerate(result.stages):
                        mlflow.log_metrics(stage.metrics(), step=step)
                for stage in result.stages:
                    mlflow.log_metrics({re.sub(r"[^0-9A-Za-z_\-./ ]", "_", f"{result.label}.{stage.stage}.{k}"): v
                                        for k, v in stage.metrics().items()}, run_id=parent.info.run_id)
            for filename, fig in figures.items():
                tracking.log_figure(fig, f"manifold/{filename}")
            mlflow.log_artifact(str(out_dir / "manifold.json"), "manifold")
            summary["run_id"] = parent.info.run_id
    return summary


def gap_robustness_table(gap: np.ndarray, robust: np.ndarray, correct: np.ndarray, edges: np.ndarray) -> dict:
    """Per logit-gap bin: examples, natural and adversarial accuracy (Figure 2B's curve)."""
    which = np.clip(np.digitize(gap, edges) - 1, 0, len(edges) - 2)
    rows = {"bin_low": edges[:-1].tolist(), "bin_high": edges[1:].tolist(), "n": [], "natural_accuracy": [],
            "adversarial_accuracy": []}
    for b in range(len(edges) - 1):
        members = which == b
        n = int(members.sum())
        rows["n"].append(n)
        rows["natural_accuracy"].append(float(correct[members].mean()) if n else None)
        rows["adversarial_accuracy"].append(float(robust[members].mean()) if n else None)
    return rows


def run_gap_job(attack_runs: list[str], out_dir: Path, bins: int = 10, max_gap: float | None = None,
                track: bool = True, experiment: str = "robustlogits") -> dict:
    """Figure 2: clean logit-gap distributions (A) and adversarial accuracy per gap bin (B),
    from the per-example artifacts of `attack` runs (or a distillation's final attack)."""
    from robustlogits.attack_records import load_attack_result
    from robustlogits.figures import gap_robustness_figure
    from robustlogits.logits import max_logit_and_gap

    if not attack_runs:
        raise UserError("give at least one attack run id (robustlogits attack ... prints it)")
    if bins < 1:
        raise UserError(f"bins must be >= 1, got {bins}")
    if track:
        tracking.check_store(experiment)
    client = MlflowClient()
    models = []
    for run_id in attack_runs:
        try:
            tags = client.get_run(run_id).data.tags
        except Exception:  # noqa: BLE001
            raise UserError(f"no run {run_id!r} in the tracking store") from None
        result = load_attack_result(run_id)
        label = (f"{tags['model_name']} v{tags.get('model_version', '?')}" if "model_name" in tags
                 else tags.get("mlflow.runName", run_id[:8]))
        _, gap = max_logit_and_gap(result.clean_logits)
        correct = result.clean_logits.argmax(1) == result.label
        models.append((label, run_id, gap, result.robust.astype(bool), correct))
    top = max_gap or float(max(np.percentile(g, 99) for _, _, g, _, _ in models))
    edges = np.linspace(0.0, max(top, 1e-6), bins + 1)
    summary = {"edges": edges.tolist(), "models": {}}
    for label, run_id, gap, robust, correct in models:
        summary["models"][label] = {"attack_run": run_id, "mean_gap": float(gap.mean()),
                                    "adversarial_accuracy": float(robust.mean()),
                                    "bins": gap_robustness_table(gap, robust, correct, edges)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gap_robustness.json").write_text(json.dumps(summary, indent=1))
    fig = gap_robustness_figure({label: (gap, robust) for label, _, gap, robust, _ in models}, edges)
    fig.savefig(out_dir / "figure2_gap_robustness.png", dpi=120)
    if track:
        with tracking.managed_run(experiment, run_name="analyze-gap", tags={"robustlogits.job": "analyze-gap"}) as run:
            tracking.log_params({"attack_runs": attack_runs, "bins": bins, "max_gap": top})
            for label, info in summary["models"].items():
                key = re.sub(r"[^0-9A-Za-z_\-./ ]", "_", label)
                mlflow.log_metrics({f"{key}.mean_gap": info["mean_gap"],
                                    f"{key}.adversarial_accuracy": info["adversarial_accuracy"]})
            tracking.log_figure(fig, "gap/figure2_gap_robustness.png")
            mlflow.log_artifact(str(out_dir / "gap_robustness.json"), "gap")
            summary["run_id"] = run.info.run_id
    return summary
