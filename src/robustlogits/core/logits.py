"""Logit statistics the paper is about: max logit and logit gap (top-1 minus top-2).

Statistics and histograms use fixed bins so epochs and runs compare directly (Figure 1, B.1).
Logits are always computed in fp32: bf16 rounding (~0.4%) would blur gaps near zero.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from robustlogits.core.data import to_float


@torch.no_grad()
def compute_logits(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500, channels_last: bool = False
) -> torch.Tensor:
    """fp32 logits in eval mode (the model's mode is restored); uint8 or [0,1] float images."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            x = to_float(chunk, channels_last) if chunk.dtype == torch.uint8 else chunk
            out.append(model(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def max_logit_and_gap(logits: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = torch.as_tensor(logits, dtype=torch.float32)
    top2 = z.topk(2, dim=1).values
    return top2[:, 0].cpu().numpy(), (top2[:, 0] - top2[:, 1]).cpu().numpy()


def summary(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "skew": float(stats.skew(values)) if len(values) > 2 and values.std() > 0 else 0.0,
    }


def histogram(values: np.ndarray, value_range: tuple[float, float], bins: int) -> dict:
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    counts, _ = np.histogram(values, bins=edges)
    return {
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "underflow": int((values < edges[0]).sum()),
        "overflow": int((values > edges[-1]).sum()),
    }


def logit_report(
    logits: torch.Tensor, labels: torch.Tensor, split: str, max_logit_range, gap_range, bins: int
) -> tuple[dict[str, float], dict]:
    """Metrics named `<split>_<quantity>_<stat>` plus `<split>_accuracy`, and the split's histograms."""
    max_logit, gap = max_logit_and_gap(logits)
    metrics = {f"{split}_accuracy": float((logits.argmax(1) == labels.to(logits.device)).float().mean())}
    hists = {}
    for name, values, rng in (("max_logit", max_logit, max_logit_range), ("gap", gap, gap_range)):
        metrics.update({f"{split}_{name}_{k}": v for k, v in summary(values).items()})
        hists[name] = histogram(values, rng, bins)
    return metrics, hists
