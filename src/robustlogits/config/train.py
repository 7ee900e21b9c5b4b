"""The training config: the sections every tracked training (train and distill) shares.

Every field is overridable from the CLI (`--set section.field=value`) and logged as an MLflow param
under its dotted name, so a run's params fully describe it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from robustlogits.core.errors import UserError

DATASETS = ("cifar10", "cifar100", "synthetic")
TRAININGS = ("standard", "adversarial")
ATTACK_METHODS = ("pgd", "fgsm")
BN_MODES = ("eval", "train")


@dataclass
class DataConfig:
    dataset: str = "cifar10"
    data_dir: str | None = None
    # Stratified subset of the training split (after the validation hold-out); None = all.
    train_subset: int | None = None
    # CIFAR-10 holds out this many training images per class (paper A.2); CIFAR-100 uses 0.
    val_per_class: int | None = None
    split_seed: int = 0
    # Fixed, un-augmented training images whose logits are tracked every epoch.
    stats_subset: int = 2000
    # Held-out images tracked every epoch (None = the whole validation/test split).
    heldout_subset: int | None = None
    # Training augmentation: random crop after this much zero padding, and a horizontal flip (paper: 4).
    # Short runs under-fit, and a smaller shift (the fast-training baselines use 2) trains faster.
    crop_pad: int = 4
    # Synthetic data (tests only): images per class and class count.
    synthetic_train_per_class: int = 64
    synthetic_test_per_class: int = 16
    synthetic_classes: int = 10
    synthetic_size: int = 32


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    # Patch-whitening nets (`*-white`) only: added to every eigenvalue of the patch covariance
    # before whitening (a direction of variance v comes out with v / (v + eps)). Small (airbench's
    # 5e-4) scales every direction up to unit variance; a large one leaves the low-variance
    # directions near their input scale, which FGSM adversarial training needs (docs/measurements.md).
    whitening_eps: float = 5e-4


SCHEDULES = ("step", "onecycle")


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    # The learning rate is divided by lr_decay at these fractions of training (paper: 100, 150 of 200).
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_decay: float = 10.0
    # "step" (the paper's) or "onecycle": per-step linear warm-up to `lr` over the first `warmup`
    # share of training, then linear decay to 0 (fast-training baselines; short runs need it).
    schedule: str = "step"
    warmup: float = 0.2
    label_smoothing: float = 0.0  # ST and AT cross-entropy only; distillation matches logits


@dataclass
class AdversaryConfig:
    """The training-time attack (paper A.2: PGD-10, Linf eps 8/255, step 2/255, random start)."""

    method: str = "pgd"
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    # BatchNorm mode while the attack runs. "eval" (default): the attack sees running
    # statistics and does not update them, as in the TRADES code whose PGD the paper used (A.2).
    # "train": batch statistics, and the inner-loop forwards also update the running stats.
    bn_mode: str = "eval"


@dataclass
class MonitorConfig:
    """What every epoch logs beyond loss/accuracy."""

    # Fixed histogram bins so epochs and runs compare (values outside go to under/overflow).
    max_logit_range: tuple[float, float] = (-5.0, 45.0)
    gap_range: tuple[float, float] = (0.0, 40.0)
    bins: int = 400
    # Cheap PGD robustness monitor on a fixed test subset, every `robust_every` epochs (0 = off).
    robust_every: int = 5
    robust_examples: int = 500
    robust_steps: int = 10


@dataclass
class RunConfig:
    training: str = "standard"
    seed: int = 0
    device: str = "auto"
    # bf16 autocast for training forward/backward: auto = where the hardware runs bf16 natively
    # (AMX / AVX-512-BF16 CPUs, Ampere+ GPUs), fp32 elsewhere; true/false force it. Evaluation
    # and reported attacks stay fp32. The choice made is logged as `run.precision`.
    amp: str = "auto"
    channels_last: bool = True
    # torch.compile the training forward and the PGD inner loop (off: compile time only pays
    # back on long GPU runs). Results match eager up to floating-point reordering.
    compile: bool = False
    # Training steps between host reads of the on-device loss/accuracy/NaN tallies (0 = once
    # per epoch). Results do not depend on it; a divergence is reported at its exact step.
    sync_every: int = 50
    # Epochs whose model is logged, registered and whose full test logits are saved.
    checkpoint_epochs: tuple[int, ...] = ()
    # The checkpoint promoted as the teacher (paper: epoch 40 of 200); None = last checkpoint.
    teacher_epoch: int | None = None
    teacher_stage: str = "Production"
    teacher_alias: str = "teacher"
    # Registered model name; None = "<dataset>-<arch>-<st|at>".
    registered_name: str | None = None
    experiment: str = "robustlogits"
    eval_batch_size: int = 500


@dataclass
class TrainConfig:
    preset: str = "paper"
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def allowed_trainings(self) -> tuple[str, ...]:
        return TRAININGS

    @property
    def adversarial(self) -> bool:
        return self.run.training == "adversarial"

    def registered_model_name(self) -> str:
        if self.run.registered_name:
            return self.run.registered_name
        suffix = "at" if self.adversarial else "st"
        return f"{self.data.dataset}-{self.model.arch}-{suffix}"

    def resolved_val_per_class(self) -> int:
        if self.data.val_per_class is not None:
            return self.data.val_per_class
        return 500 if self.data.dataset == "cifar10" else 0

    def resolved_teacher_epoch(self) -> int | None:
        if self.run.teacher_epoch is not None:
            return self.run.teacher_epoch
        return max(self.run.checkpoint_epochs) if self.run.checkpoint_epochs else None

    def fit_schedule_to_epochs(self, keep_teacher: bool = False) -> None:
        """After `--epochs` overrides a preset: keep the preset's checkpoints that still exist,
        always checkpoint the last epoch, and drop a preset teacher epoch that no longer exists
        (a teacher epoch the user gave is kept, and validated)."""
        epochs = self.optim.epochs
        kept = sorted({e for e in self.run.checkpoint_epochs if e <= epochs} | {epochs})
        self.run.checkpoint_epochs = tuple(kept)
        if not keep_teacher and self.run.teacher_epoch is not None and self.run.teacher_epoch not in kept:
            self.run.teacher_epoch = None

    def validate(self) -> None:
        """Fail before anything is written: every check a user could trip over lives here."""
        # core's vocabularies, imported here: importing core (torch) costs seconds, and
        # commands read these configs' defaults long before anything is validated
        from robustlogits.core.device import normalise_amp
        from robustlogits.core.models import arch_names

        _choice("run.training", self.run.training, self.allowed_trainings())
        _choice("data.dataset", self.data.dataset, DATASETS)
        _choice("model.arch", self.model.arch, tuple(arch_names()))
        _choice("adversary.method", self.adversary.method, ATTACK_METHODS)
        _choice("adversary.bn_mode", self.adversary.bn_mode, BN_MODES)
        self.run.amp = normalise_amp(self.run.amp)
        o, a = self.optim, self.adversary
        if o.epochs < 1:
            raise UserError(f"optim.epochs must be >= 1, got {o.epochs}")
        if self.run.sync_every < 0:
            raise UserError(f"run.sync_every must be >= 0 (0 = once per epoch), got {self.run.sync_every}")
        if o.batch_size < 1 or self.run.eval_batch_size < 1:
            raise UserError("batch sizes must be >= 1")
        if o.lr <= 0:
            raise UserError(f"optim.lr must be > 0, got {o.lr}")
        _choice("optim.schedule", o.schedule, SCHEDULES)
        if not 0 <= o.warmup < 1 or not 0 <= o.label_smoothing < 1:
            raise UserError("optim.warmup and optim.label_smoothing must be in [0, 1)")
        if o.nesterov and o.momentum <= 0:
            raise UserError("optim.nesterov needs optim.momentum > 0")
        if not 0 <= self.data.crop_pad <= 16:
            raise UserError(f"data.crop_pad must be in 0..16 pixels, got {self.data.crop_pad}")
        if a.eps < 0:
            raise UserError(f"adversary.eps must be >= 0, got {a.eps}")
        if not self.model.whitening_eps > 0:
            raise UserError(f"model.whitening_eps must be > 0, got {self.model.whitening_eps}")
        if a.step_size < 0 or a.steps < 1:
            raise UserError("adversary.step_size must be >= 0 and adversary.steps >= 1")
        for epoch in self.run.checkpoint_epochs:
            if not 1 <= epoch <= o.epochs:
                raise UserError(f"checkpoint epoch {epoch} is outside 1..{o.epochs} (the last epoch is {o.epochs})")
        if self.data.dataset == "synthetic" and self.data.synthetic_classes < 2:
            raise UserError("data.synthetic_classes must be >= 2")
        teacher = self.run.teacher_epoch
        if teacher is not None and teacher not in self.run.checkpoint_epochs:
            raise UserError(f"teacher epoch {teacher} is not a checkpoint epoch {list(self.run.checkpoint_epochs)}")
        if self.data.train_subset is not None and self.data.train_subset < 1:
            raise UserError(f"data.train_subset must be >= 1, got {self.data.train_subset}")
        if self.data.stats_subset < 1:
            raise UserError("data.stats_subset must be >= 1")
        lo, hi = self.monitor.max_logit_range
        glo, ghi = self.monitor.gap_range
        if not (lo < hi and glo < ghi and self.monitor.bins >= 2):
            raise UserError("monitor histogram ranges must be increasing with >= 2 bins")


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise UserError(f"unknown {name} {value!r}; choose one of: {', '.join(options)}")
