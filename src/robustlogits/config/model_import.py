"""The import config: a model file from elsewhere (or a RobustBench name) and what it classifies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from robustlogits.config.train import DATASETS
from robustlogits.core.errors import UserError


@dataclass
class ImportConfig:
    name: str = ""
    checkpoint: str | None = None
    arch: str | None = None
    dataset: str = "cifar10"
    normalization: str | None = (
        None  # none | cifar10 | cifar100 | MEAN,STD (2 or 6 numbers); default: the file's, else none
    )
    trust_pickle: bool = False
    robustbench: str | None = None
    model_dir: str = "./models"  # RobustBench's folder: MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt
    threat_model: str = "Linf"
    data_dir: str | None = None
    check_images: int = 200
    stage: str | None = None
    alias: str | None = None
    device: str = "auto"
    experiment: str = "robustlogits"

    def validate(self) -> None:
        # core's vocabularies, imported here: importing core (torch) costs seconds, and
        # commands read these configs' defaults long before anything is validated
        from robustlogits.core.checkpoints import parse_normalization
        from robustlogits.core.models import buildable

        if not self.name or not self.name.strip():
            raise UserError("give the registered model a --name")
        if (self.checkpoint is None) == (self.robustbench is None):
            raise UserError("give exactly one of --checkpoint PATH or --robustbench MODEL_NAME")
        if self.dataset not in DATASETS:
            raise UserError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(DATASETS)}")
        if self.check_images < 1:
            raise UserError(f"check-images must be >= 1, got {self.check_images}")
        if self.arch is not None and not buildable(self.arch):
            raise UserError(
                f"unknown arch {self.arch!r}; choose one of ours (see `robustlogits train --help`) or torchvision:NAME"
            )
        parse_normalization(self.normalization)
        if self.checkpoint is not None:
            path = Path(self.checkpoint)
            if not path.exists():
                raise UserError(f"checkpoint {path} does not exist")
            if not path.is_file():
                raise UserError(f"checkpoint {path} is not a file")
