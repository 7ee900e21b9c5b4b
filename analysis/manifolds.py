"""Figure 5: how adversarial perturbation manifolds are represented, stage by stage.

For P stratified test images, M points of each image's Linf ball (eps 8/255): each point starts
at a random point of the ball and takes `pgd_steps` PGD steps against the model under analysis,
so the manifold spans the directions the model is most sensitive to. Activations at every
named stage are randomly projected to N features on the fly (the full early-layer activations
of a ResNet-18 would not fit in memory) and analysed with MFTMA (`robustlogits.core.mftma`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustlogits import tracking
from robustlogits.config import ManifoldConfig
from robustlogits.core.data import Split, stratified_indices
from robustlogits.core.errors import UserError
from robustlogits.core.mftma import ManifoldResult, manifold_analysis, simulated_capacity
from robustlogits.core.models import extract_stages, stage_names
from robustlogits.core.perturb import LinfPGD
from robustlogits.jobs.test_logits import open_models


@dataclass
class StageResult:
    stage: str
    width: int
    result: ManifoldResult
    simulated_capacity: float | None = None

    def metrics(self) -> dict[str, float]:
        out = {
            "capacity": self.result.mean_capacity,
            "radius": self.result.mean_radius,
            "dimension": self.result.mean_dimension,
            "center_correlation": self.result.center_correlation,
        }
        if self.simulated_capacity is not None:
            out["simulated_capacity"] = self.simulated_capacity
        return out


@dataclass
class ModelManifolds:
    label: str
    stages: list[StageResult] = field(default_factory=list)

    def table(self) -> dict[str, list]:
        return {
            "stage": [s.stage for s in self.stages],
            "width": [s.width for s in self.stages],
            **{k: [s.metrics().get(k) for s in self.stages] for k in self.stages[0].metrics()},
        }


def choose_images(test: Split, settings: ManifoldConfig) -> Split:
    return test.subset(stratified_indices(test.labels.cpu().numpy(), settings.n_images, settings.seed))


def perturbation_cloud(model: torch.nn.Module, images: Split, settings: ManifoldConfig) -> torch.Tensor:
    """[P*M, 3, H, W] points in each image's eps ball (image-major), from random starts plus PGD."""
    device = images.labels.device
    x = images.images.float().div(255).repeat_interleave(settings.n_perturbations, 0)
    y = images.labels.repeat_interleave(settings.n_perturbations, 0)
    attack = LinfPGD(
        settings.eps,
        2.5 * settings.eps / max(settings.pgd_steps, 1),
        settings.pgd_steps,
        random_start=True,
        bn_mode="eval",
    )
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    was_training = model.training
    model.eval()
    try:
        points = []
        for start in range(0, len(x), settings.batch_size):
            xb, yb = x[start : start + settings.batch_size], y[start : start + settings.batch_size]
            if settings.pgd_steps == 0:
                noise = torch.rand(xb.shape, generator=generator, device=device) * 2 - 1
                points.append((xb + settings.eps * noise).clamp(0, 1))
            else:
                points.append(attack(model, xb, yb, generator))
        return torch.cat(points)
    finally:
        model.train(was_training)


def projected_stage_features(
    model: torch.nn.Module, points: torch.Tensor, settings: ManifoldConfig, stages: list[str]
) -> dict[str, tuple[np.ndarray, int]]:
    """Per stage: ([P*M, min(width, N)] features, original width), projecting batch by batch."""
    projections: dict[str, torch.Tensor | None] = {}
    collected: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    widths: dict[str, int] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(points), settings.batch_size):
            feats = extract_stages(model, points[start : start + settings.batch_size], stages)
            for stage, f in feats.items():
                f = f.float()
                if stage not in projections:
                    widths[stage] = f.shape[1]
                    projections[stage] = _projection(f.shape[1], settings.n_features, settings.seed, f.device)
                proj = projections[stage]
                collected[stage].append((f @ proj if proj is not None else f).cpu())
    finally:
        model.train(was_training)
    return {s: (torch.cat(v).numpy().astype(np.float64), widths[s]) for s, v in collected.items()}


def _projection(width: int, n_features: int, seed: int, device) -> torch.Tensor | None:
    """Gaussian random projection (Johnson-Lindenstrauss); same seed -> same matrix across models."""
    if width <= n_features:
        return None
    generator = torch.Generator().manual_seed(seed * 7919 + width)
    return (torch.randn(width, n_features, generator=generator) / math.sqrt(n_features)).to(device)


def analyse_model(
    model: torch.nn.Module, label: str, images: Split, settings: ManifoldConfig, progress: bool | None = None
) -> ModelManifolds:
    stages = stage_names(model)
    points = perturbation_cloud(model, images, settings)
    features = projected_stage_features(model, points, settings, stages)
    out = ModelManifolds(label)
    bar = _bar(len(stages), f"MFTMA {label}", progress)
    for stage in stages:
        flat, width = features[stage]
        # [P*M, N] image-major -> (P manifolds, N features, M points)
        X = flat.reshape(settings.n_images, settings.n_perturbations, -1).transpose(0, 2, 1)
        result = manifold_analysis(
            X,
            kappa=settings.kappa,
            n_t=settings.n_t,
            seed=settings.seed,
            center_null_space=settings.center_method != "none",
            center_method="principal" if settings.center_method == "none" else settings.center_method,
            center_reps=settings.center_reps,
            definitions=settings.definitions,
        )
        simulated = simulated_capacity(X, seed=settings.seed) if settings.simulated else None
        out.stages.append(StageResult(stage, width, result, simulated))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _bar(total: int, desc: str, enabled: bool | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def figure5(results: list[ModelManifolds]):
    """Capacity, radius, dimension and centre correlation per stage, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("capacity", "manifold capacity $\\alpha_M$"),
        ("radius", "manifold radius $R_M$"),
        ("dimension", "manifold dimension $D_M$"),
        ("center_correlation", "center correlation"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, title) in zip(axes, panels):
        for model in results:
            table = model.table()
            ax.plot(range(len(table["stage"])), table[key], marker="o", label=model.label)
            ax.set_xticks(range(len(table["stage"])), table["stage"], rotation=45, ha="right")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def figure_a8(results: list[ModelManifolds]):
    """Mean-field against simulated capacity for every analysed stage (Figure A.8)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    values = []
    for model in results:
        mf = [s.result.mean_capacity for s in model.stages]
        sim = [s.simulated_capacity for s in model.stages]
        ax.scatter(sim, mf, label=model.label)
        values += mf + sim
    lo, hi = min(values), max(values)
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("simulated capacity")
    ax.set_ylabel("mean-field capacity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(
    model_specs: list[str],
    settings,
    out_dir: Path,
    data_dir: str | None = None,
    dataset: str | None = None,
    track: bool = True,
    experiment: str = "robustlogits",
    device: str = "auto",
    progress: bool | None = None,
) -> dict:
    """MFTMA per stage for each model; a parent run with the Figure 5 plot, a nested run per model
    whose metrics use the stage index as step (so the MLflow UI draws them against depth)."""
    if not model_specs:
        raise UserError("give at least one model (registry URI, registered name, or runs:/ID/PATH)")
    if track:
        tracking.check_store(experiment)
    opened = open_models(
        model_specs,
        data_dir=data_dir,
        dataset=dataset,
        device=device,
        experiment=experiment,
        purpose="the manifold analysis",
    )
    models, name, test = opened.models, opened.dataset, opened.test
    settings.validate(len(test))
    images = choose_images(test, settings)
    results = [analyse_model(m.model, m.describe(), images, settings, progress) for m in models]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "settings": vars(settings),
        "dataset": name,
        "image_indices": images.indices.tolist(),
        "models": {
            r.label: {"uri": m.uri, **r.table(), "details": [s.result.to_dict() for s in r.stages]}
            for r, m in zip(results, models)
        },
    }
    (out_dir / "manifold.json").write_text(json.dumps(summary, indent=1, default=str))
    figures = {"figure5_manifold.png": figure5(results)}
    if settings.simulated:
        figures["figure_a8_mean_field_vs_simulated.png"] = figure_a8(results)
    for filename, fig in figures.items():
        fig.savefig(out_dir / filename, dpi=120)
    if track:
        with tracking.job_run(
            experiment, "analyze-manifold", {"robustlogits.job": "analyze-manifold", "dataset": name}
        ) as parent:
            tracking.log_params({f"manifold.{k}": v for k, v in vars(settings).items()} | {"models": model_specs})
            tracking.log_model_inputs([m.model_id for m in models])
            for result, model in zip(results, models):
                with tracking.nested_run(
                    f"manifold {result.label}",
                    {
                        "robustlogits.job": "analyze-manifold-model",
                        "model_uri": model.uri,
                        "stages": ",".join(s.stage for s in result.stages),
                    },
                ):
                    for step, stage in enumerate(result.stages):
                        tracking.log_results(stage.metrics(), step=step)
                for stage in result.stages:
                    tracking.log_results(
                        {f"{result.label}.{stage.stage}.{k}": v for k, v in stage.metrics().items()}, run_id=parent
                    )
            for filename, fig in figures.items():
                tracking.log_figure(fig, f"manifold/{filename}")
            tracking.log_file(out_dir / "manifold.json", "manifold")
            summary["run_id"] = parent
    return summary
