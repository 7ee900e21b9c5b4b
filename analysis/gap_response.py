"""How an attack moves the logit gaps of correctly classified images (Appendix C.2.5's predictions).

The analytical model is a linear-response (perturbative) theory, so the attack here is small: PGD
at eps = 1/255 by default. For every correctly classified test image it records the clean margin
(z_y - max_{j != y} z_j, the logit gap of a correct prediction) and the margin after the attack;
the theory predicts the margin shrinks, and by an amount growing quadratically with the margin.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from robustlogits import tracking
from robustlogits.core.data import stratified_indices
from robustlogits.core.logits import compute_logits
from robustlogits.core.perturb import LinfPGD
from robustlogits.jobs.test_logits import open_models

ARTIFACT = "gap_response"


def margins(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    z = logits.double().clone()
    rows = torch.arange(len(z))
    true = z[rows, labels].clone()
    z[rows, labels] = -torch.inf
    return (true - z.max(1).values).cpu().numpy()


def response(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int) -> dict:
    """Clean and attacked margins of the correctly classified images (batch of uint8 images)."""
    clean = compute_logits(model, images)
    correct = (clean.argmax(1) == labels).cpu().numpy()
    x = images.float().div(255)
    attack = LinfPGD(eps, 2.5 * eps / steps, steps, random_start=False, bn_mode="eval")
    adv = torch.cat([attack(model, x[i : i + 256], labels[i : i + 256]) for i in range(0, len(x), 256)])
    attacked = compute_logits(model, adv)
    before, after = margins(clean, labels)[correct], margins(attacked, labels)[correct]
    return {
        "n_images": len(images),
        "n_correct": int(correct.sum()),
        "margin": before.tolist(),
        "shrink": (before - after).tolist(),
    }


def figure(found: dict[str, dict], eps: float) -> Figure:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for label, r in found.items():
        ax.scatter(r["margin"], r["shrink"], s=5, alpha=0.4, label=label)
    ax.set_xlabel("clean logit gap of a correct prediction")
    ax.set_ylabel(f"gap shrinkage under PGD, eps={eps * 255:.0f}/255")
    ax.set_title("Appendix C.2.5: attacks shrink gaps, more for large gaps")
    ax.legend()
    fig.tight_layout()
    return fig


def run(
    models: list[str],
    labels: list[str],
    out_dir: Path,
    n_images: int = 500,
    eps: float = 1 / 255,
    steps: int = 10,
    data_dir: str | None = None,
    experiment: str = "robustlogits",
) -> dict:
    tracking.check_store(experiment)
    opened = open_models(models, data_dir=data_dir, minimum=1, purpose="the gap response")
    test = opened.test
    chosen = test.subset(stratified_indices(test.labels.cpu().numpy(), min(n_images, len(test)), 0))
    torch.manual_seed(0)
    found = {
        label: response(m.model, chosen.images, chosen.labels, eps, steps) for label, m in zip(labels, opened.models)
    }
    summary = {"eps": eps, "steps": steps, "dataset": opened.dataset, "models": found}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{ARTIFACT}.json").write_text(json.dumps(summary))
    with tracking.job_run(experiment, "analyze-gap-response", {"robustlogits.job": "analyze-gap-response"}) as run_id:
        tracking.log_params({"models": models, "eps": eps, "steps": steps, "n_images": len(chosen)})
        tracking.log_model_inputs([m.model_id for m in opened.models])
        for label, r in found.items():
            shrink = np.asarray(r["shrink"])
            tracking.log_results({f"{label}.mean_shrink": float(shrink.mean()) if len(shrink) else float("nan")})
        tracking.log_figure(figure(found, eps), f"{ARTIFACT}/gap_response.png")
        tracking.log_file(out_dir / f"{ARTIFACT}.json", ARTIFACT)
    summary["run_id"] = run_id
    return summary
