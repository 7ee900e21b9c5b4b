"""The attack config: which model, which data, and the paper's attack (APGD-CE then APGD-DLR)."""

from __future__ import annotations

from dataclasses import dataclass

from robustlogits.core.errors import UserError


@dataclass
class AttackConfig:
    model: str = ""
    stage: str | None = None
    alias: str | None = None
    version: str | None = None
    dataset: str | None = None  # default: the model's own dataset (registry tag / source run)
    data_dir: str | None = None  # default: the source run's data directory
    eps: float = 8 / 255
    n_iter: int = 100
    n_restarts: int = 1
    seed: int = 0
    suite: str = "apgd-ce-dlr"
    n_examples: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    experiment: str = "robustlogits"

    def validate(self) -> None:
        # core's vocabularies, imported here: importing core (torch) costs seconds, and
        # commands read these configs' defaults long before anything is validated
        from robustlogits.core.attacks import SUITES

        if not self.model:
            raise UserError(
                "no model given: pass a registry URI (models:/NAME@ALIAS), a registered name, or runs:/ID/PATH"
            )
        if self.eps < 0:
            raise UserError(f"eps must be >= 0, got {self.eps}")
        if self.n_examples is not None and self.n_examples < 1:
            raise UserError(f"n-examples must be >= 1, got {self.n_examples}")
        if self.suite not in SUITES:
            raise UserError(f"unknown suite {self.suite!r}; choose one of: {', '.join(SUITES)}")
        if self.n_iter < 1 or self.n_restarts < 1:
            raise UserError("n_iter and n_restarts must be >= 1")

    def attack_settings(self) -> dict:
        return dict(
            n_examples=self.n_examples,
            eps=self.eps,
            n_iter=self.n_iter,
            n_restarts=self.n_restarts,
            seed=self.seed,
            suite=self.suite,
            batch_size=self.batch_size,
        )
