"""Figure 2: logit-gap distributions and adversarial accuracy per gap bin, from `attack` runs'
per-example artifacts (or a distillation's final attack)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from robustlogits import tracking  # noqa: E402
from robustlogits.core.errors import UserError  # noqa: E402
from robustlogits.core.figures import QUANTITY_LABEL  # noqa: E402
from robustlogits.core.logits import max_logit_and_gap  # noqa: E402


def gap_robustness_table(gap: np.ndarray, robust: np.ndarray, correct: np.ndarray, edges: np.ndarray) -> dict:
    """Per logit-gap bin: examples, natural and adversarial accuracy (Figure 2B's curve)."""
    which = np.clip(np.digitize(gap, edges) - 1, 0, len(edges) - 2)
    rows = {
        "bin_low": edges[:-1].tolist(),
        "bin_high": edges[1:].tolist(),
        "n": [],
        "natural_accuracy": [],
        "adversarial_accuracy": [],
    }
    for b in range(len(edges) - 1):
        members = which == b
        n = int(members.sum())
        rows["n"].append(n)
        rows["natural_accuracy"].append(float(correct[members].mean()) if n else None)
        rows["adversarial_accuracy"].append(float(robust[members].mean()) if n else None)
    return rows


def gap_robustness_figure(models: dict[str, tuple[np.ndarray, np.ndarray]], edges: np.ndarray):
    """Figure 2: (A) clean logit-gap distributions, (B) adversarial accuracy per gap bin."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
    centres = (edges[:-1] + edges[1:]) / 2
    for name, (gap, robust) in models.items():
        ax_a.hist(
            np.clip(gap, edges[0], edges[-1]),
            bins=edges,
            density=True,
            alpha=0.5,
            label=f"{name} (mean {gap.mean():.2f})",
        )
        which = np.clip(np.digitize(gap, edges) - 1, 0, len(edges) - 2)
        counts = np.bincount(which, minlength=len(centres))
        hits = np.bincount(which, weights=robust.astype(float), minlength=len(centres))
        shown = counts > 0
        ax_b.plot(centres[shown], hits[shown] / counts[shown], marker="o", label=name)
    ax_a.set_xlabel(QUANTITY_LABEL["gap"] + " (clean)")
    ax_a.set_ylabel("density")
    ax_a.set_title("A: logit gaps")
    ax_a.legend(fontsize=8)
    ax_b.set_xlabel(QUANTITY_LABEL["gap"] + " (clean)")
    ax_b.set_ylabel("adversarial accuracy")
    ax_b.set_ylim(-0.02, 1.02)
    ax_b.set_title("B: adversarial accuracy by logit gap")
    ax_b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(
    attack_runs: list[str],
    out_dir: Path,
    bins: int = 10,
    max_gap: float | None = None,
    track: bool = True,
    experiment: str = "robustlogits",
) -> dict:
    """Figure 2: clean logit-gap distributions (A) and adversarial accuracy per gap bin (B),
    from the per-example artifacts of `attack` runs (or a distillation's final attack)."""
    if not attack_runs:
        raise UserError("give at least one attack run id (robustlogits attack ... prints it)")
    if bins < 1:
        raise UserError(f"bins must be >= 1, got {bins}")
    if track:
        tracking.check_store(experiment)
    models = []
    for run_id in attack_runs:
        tags = tracking.run_record(run_id).tags
        result = tracking.load_attack_result(run_id)
        label = (
            f"{tags['model_name']} v{tags.get('model_version', '?')}"
            if "model_name" in tags
            else tags.get("mlflow.runName", run_id[:8])
        )
        _, gap = max_logit_and_gap(result.clean_logits)
        correct = result.clean_logits.argmax(1) == result.label
        models.append((label, run_id, gap, result.robust.astype(bool), correct))
    top = max_gap or float(max(np.percentile(g, 99) for _, _, g, _, _ in models))
    edges = np.linspace(0.0, max(top, 1e-6), bins + 1)
    summary = {"edges": edges.tolist(), "models": {}}
    for label, run_id, gap, robust, correct in models:
        summary["models"][label] = {
            "attack_run": run_id,
            "mean_gap": float(gap.mean()),
            "adversarial_accuracy": float(robust.mean()),
            "bins": gap_robustness_table(gap, robust, correct, edges),
        }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gap_robustness.json").write_text(json.dumps(summary, indent=1))
    fig = gap_robustness_figure({label: (gap, robust) for label, _, gap, robust, _ in models}, edges)
    fig.savefig(out_dir / "figure2_gap_robustness.png", dpi=120)
    if track:
        with tracking.job_run(experiment, "analyze-gap", {"robustlogits.job": "analyze-gap"}) as run_id:
            tracking.log_params({"attack_runs": attack_runs, "bins": bins, "max_gap": top})
            for label, info in summary["models"].items():
                tracking.log_results(
                    {
                        f"{label}.mean_gap": info["mean_gap"],
                        f"{label}.adversarial_accuracy": info["adversarial_accuracy"],
                    }
                )
            tracking.log_figure(fig, "gap/figure2_gap_robustness.png")
            tracking.log_file(out_dir / "gap_robustness.json", "gap")
            summary["run_id"] = run_id
    return summary
