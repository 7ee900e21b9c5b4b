"""Analysis configs: the settings of an analysis that has more than a handful."""

from __future__ import annotations

from dataclasses import dataclass

from robustlogits.core.errors import UserError


@dataclass
class ManifoldConfig:
    """Figure 5's manifold analysis: how many images and points, the ball, and MFTMA's settings."""

    n_images: int = 50  # P
    n_perturbations: int = 50  # M
    n_features: int = 500  # N (random projection when a stage is wider)
    eps: float = 8 / 255
    pgd_steps: int = 5
    kappa: float = 0.0
    n_t: int = 200
    seed: int = 0
    simulated: bool = False  # also bisect for the empirical capacity (slow; Figure A.8)
    batch_size: int = 250
    definitions: str = "reference"  # R_M, D_M as the MFTMA reference code ("printed": the paper's A.4)
    center_method: str = "reference"  # centre-structure removal as the reference code ("principal", "none")
    center_reps: int = 10  # random starts per K of the reference's subspace optimisation

    def validate(self, n_test: int) -> None:
        if not 2 <= self.n_images <= n_test:
            raise UserError(f"n-images must be in 2..{n_test} (the test split), got {self.n_images}")
        if self.n_perturbations < 1:
            raise UserError(f"n-perturbations must be >= 1, got {self.n_perturbations}")
        if self.n_features < 1:
            raise UserError(f"n-features must be >= 1, got {self.n_features}")
        if self.eps < 0 or self.pgd_steps < 0:
            raise UserError("eps and pgd-steps must be >= 0")
        if self.definitions not in ("reference", "printed"):
            raise UserError(f"definitions must be reference or printed, got {self.definitions!r}")
        if self.center_method not in ("reference", "principal", "none"):
            raise UserError(f"center-method must be reference, principal or none, got {self.center_method!r}")
        if self.center_reps < 1:
            raise UserError(f"center-reps must be >= 1, got {self.center_reps}")
