"""The distillation config: a student trains like any model (the training sections) on its
teacher's manipulated logits (the `distill` section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from robustlogits.config.train import TrainConfig
from robustlogits.core.errors import UserError


@dataclass
class DistillationConfig:
    """The `distill.*` section: the teacher, what is done to its logits, the loss, the final attack."""

    # Teacher: a registry URI or registered name; None = "<dataset>-<arch>-at" of the preset.
    teacher: str | None = None
    teacher_stage: str | None = None  # default Production when no alias/version is given
    teacher_alias: str | None = None
    teacher_version: str | None = None
    # Second, standard-trained teacher for `hybrid`; None = "models:/<dataset>-<arch>-st/Production".
    st_teacher: str | None = None
    manipulation: str = "none"
    k: int | None = None  # correct-fix defaults to the paper's k = 1
    fix_mode: str = "permute"  # how correct-fix fixes the rest: permute | average
    manipulation_seed: int = 0
    loss: str = "l1"
    temperature: float = 1.0
    # Teacher targets: mean logits over this many random crop/flip passes (A.3, point 3).
    n_augment: int = 8
    teacher_bn: str = "eval"  # eval: running statistics; train: batch statistics
    teacher_logits_seed: int = 0
    teacher_logits_run: str | None = None  # reuse this run's artifact explicitly
    attack: bool = True
    attack_n_examples: int | None = None
    attack_n_iter: int = 100


@dataclass
class DistillConfig(TrainConfig):
    """A student's whole config: the training sections plus `distill`."""

    distill: DistillationConfig = field(default_factory=DistillationConfig)

    def allowed_trainings(self) -> tuple[str, ...]:
        return ("distillation",)

    def registered_model_name(self) -> str:
        return self.run.registered_name or f"{self.data.dataset}-{self.model.arch}-student"

    def teacher_spec(self) -> str:
        return self.distill.teacher or f"{self.data.dataset}-{self.model.arch}-at"

    def st_teacher_spec(self) -> str:
        return self.distill.st_teacher or f"models:/{self.data.dataset}-{self.model.arch}-st/Production"

    def resolved_k(self) -> int | None:
        d = self.distill
        return 1 if d.k is None and d.manipulation == "correct-fix" else d.k

    def validate(self) -> None:
        # core's vocabularies, imported here: importing core (torch) costs seconds, and
        # commands read these configs' defaults long before anything is validated
        from robustlogits.core.manipulations import MANIPULATIONS
        from robustlogits.core.training import DISTILLATION_LOSSES

        super().validate()
        d = self.distill
        if d.manipulation not in MANIPULATIONS:
            raise UserError(f"unknown manipulation {d.manipulation!r}; choose one of: {', '.join(MANIPULATIONS)}")
        if d.loss not in DISTILLATION_LOSSES:
            raise UserError(f"unknown loss {d.loss!r}; choose one of: {', '.join(DISTILLATION_LOSSES)}")
        if not d.temperature > 0:
            raise UserError(f"temperature must be > 0, got {d.temperature}")
        if d.manipulation in ("permute", "average") and d.k is None:
            raise UserError(f"manipulation {d.manipulation!r} needs k (1..number of classes)")
        if d.fix_mode not in ("permute", "average"):
            raise UserError(f"unknown fix_mode {d.fix_mode!r}; choose permute or average")
        if d.n_augment < 1:
            raise UserError(f"n_augment must be >= 1, got {d.n_augment}")
        if d.teacher_bn not in ("eval", "train"):
            raise UserError(f"unknown teacher_bn {d.teacher_bn!r}; choose eval or train")
        if d.attack_n_examples is not None and d.attack_n_examples < 1:
            raise UserError(f"attack n-examples must be >= 1, got {d.attack_n_examples}")

    def check_k(self, num_classes: int) -> None:
        k = self.resolved_k()
        if k is not None and self.distill.manipulation not in ("none", "hybrid") and not 1 <= k <= num_classes:
            raise UserError(f"k must be in 1..{num_classes} for {self.data.dataset}, got {k}")
