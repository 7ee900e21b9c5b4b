"""robustlogits: reproduce and extend "Understanding the Logit Distributions of
Adversarially-Trained Deep Neural Networks" with MLflow-tracked experiments.

The public API, for notebooks and scripts (each name is imported on first use, so importing the
package stays cheap)::

    from robustlogits import AttackConfig, preset, run_attack, run_training

    cfg = preset("smoke")
    cfg.run.training = "adversarial"
    run_id = run_training(cfg)
    run_id, result = run_attack(AttackConfig(model="models:/cifar10-cnn-small-at/Production"))

The layers behind it are described in docs/architecture.md.
"""

from __future__ import annotations

import importlib

from robustlogits.core.errors import UserError

__version__ = "0.1.0"

_PUBLIC = {
    # configs and presets
    "TrainConfig": "robustlogits.config",
    "DistillConfig": "robustlogits.config",
    "AttackConfig": "robustlogits.config",
    "ImportConfig": "robustlogits.config",
    "SweepConfig": "robustlogits.config",
    "ReproduceConfig": "robustlogits.config",
    "preset": "robustlogits.config",
    "distill_preset": "robustlogits.config",
    # jobs: a config in, a finished run out
    "run_training": "robustlogits.jobs.train",
    "run_attack": "robustlogits.jobs.attack",
    "run_distill": "robustlogits.jobs.distill",
    "run_import": "robustlogits.jobs.import_model",
    # studies
    "run_sweep": "robustlogits.study.sweep",
    "run_reproduce": "robustlogits.study.reproduce.run",
    # models from the registry, and the teacher-student links
    "resolve_and_load": "robustlogits.tracking",
    "students_of": "robustlogits.tracking",
}

__all__ = ["UserError", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'robustlogits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
