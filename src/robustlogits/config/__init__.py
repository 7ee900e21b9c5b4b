"""Every configuration of the product: typed dataclasses named `*Config`, presets as one table.

Each value is overridable (`--set section.field=value`) and logged as a run param under its
dotted name. The package imports only `core` (for the names it validates against).
"""

from robustlogits.config.analysis import ManifoldConfig
from robustlogits.config.attack import AttackConfig
from robustlogits.config.distill import DistillationConfig, DistillConfig
from robustlogits.config.model_import import ImportConfig
from robustlogits.config.overrides import apply_overrides, coerce, flatten, keyed_view, set_value
from robustlogits.config.presets import DEFAULT_PRESET, PRESETS, Preset, distill_preset, preset, preset_row, scale
from robustlogits.config.study import STUDY_STAGES, ReproduceConfig, ScaleConfig, SweepConfig, parse_workers
from robustlogits.config.train import (
    ATTACK_METHODS,
    BN_MODES,
    DATASETS,
    TRAININGS,
    AdversaryConfig,
    DataConfig,
    ModelConfig,
    MonitorConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "DEFAULT_PRESET",
    "ATTACK_METHODS",
    "BN_MODES",
    "DATASETS",
    "PRESETS",
    "TRAININGS",
    "AdversaryConfig",
    "AttackConfig",
    "DataConfig",
    "DistillConfig",
    "DistillationConfig",
    "ImportConfig",
    "ManifoldConfig",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "Preset",
    "ReproduceConfig",
    "STUDY_STAGES",
    "RunConfig",
    "ScaleConfig",
    "SweepConfig",
    "TrainConfig",
    "apply_overrides",
    "coerce",
    "distill_preset",
    "flatten",
    "keyed_view",
    "parse_workers",
    "preset",
    "preset_row",
    "scale",
    "set_value",
]
