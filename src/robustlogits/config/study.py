"""Study configs: a sweep, a reproduction of the paper's study, and the scale it runs at."""

from __future__ import annotations

from dataclasses import dataclass, field

from robustlogits.core.errors import UserError

# The study's stages, in the order they run: a stage starts when the ones before it are done.
STUDY_STAGES = ("train", "attack", "distill", "analyze")


@dataclass
class SweepConfig:
    """A sweep: the grid (or sampler) over teacher epoch and distillation settings, and its workers."""

    teacher: str
    teacher_epochs: list[str] = field(default_factory=lambda: ["all"])
    losses: list[str] = field(default_factory=lambda: ["l1"])
    temperatures: list[str] = field(default_factory=lambda: ["1"])
    manipulations: list[str] = field(default_factory=lambda: ["none"])
    ks: list[str] = field(default_factory=list)
    seeds: list[str] = field(default_factory=list)
    lrs: list[str] = field(default_factory=list)
    sampler: str = "grid"
    n_trials: int | None = None
    objectives: list[str] = field(default_factory=lambda: ["adversarial"])
    preset: str = "smoke"
    data_dir: str | None = None
    study: str | None = None
    storage: str | None = None
    workers: int = 1
    workers_per_device: int = 1
    heartbeat: int = 10
    sampler_seed: int = 0
    create_only: bool = False  # create the study and queue the grid; workers join elsewhere
    overrides: list[str] = field(default_factory=list)


@dataclass
class ReproduceConfig:
    """One reproduction of the paper's study: its scale, seeds, selected steps and workers."""

    scale: str = "smoke"
    seeds: int | None = None  # default: the scale's
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    workers: int = 1  # local worker processes of every stage not named in stage_workers
    # e.g. {"distill": 2}: on 2 cores two one-thread workers ran the students 1.23x faster than one
    # worker of two threads, while a teacher is one step and gains nothing (docs/measurements.md)
    stage_workers: dict[str, int] = field(default_factory=dict)
    storage: str | None = None  # Optuna storage shared with `sweep worker`s on other machines
    out: str = "reproduce"
    data_dir: str | None = None
    dry_run: bool = False
    experiment: str = "robustlogits-reproduce"
    heartbeat: int = 10  # seconds; a silent worker's step is queued again after 3 beats

    def workers_for(self, stage: str) -> int:
        return self.stage_workers.get(stage, self.workers)

    def validate(self) -> None:
        for stage, count in {"": self.workers, **self.stage_workers}.items():
            if stage and stage not in STUDY_STAGES:
                raise UserError(f"--workers: unknown stage {stage!r}; the stages are {', '.join(STUDY_STAGES)}")
            if count < 1:
                raise UserError(f"--workers must be >= 1, got {count}" + (f" for {stage}" if stage else ""))


def parse_workers(text: str) -> tuple[int, dict[str, int]]:
    """`--workers` as `N` (every stage), `STAGE=N,...` (the others 1) or both: `1,distill=2`."""
    default, by_stage = 1, {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        stage, _, count = part.rpartition("=")
        try:
            number = int(count)
        except ValueError:
            raise UserError(f"--workers takes N or STAGE=N pairs (e.g. 1,distill=2), got {text!r}") from None
        if stage:
            by_stage[stage.strip()] = number
        else:
            default = number
    return default, by_stage


@dataclass(frozen=True)
class ScaleConfig:
    """How big each part of the study is. Every value is logged as a param of the study run."""

    name: str
    preset: str  # train/distill preset (model, data, epochs)
    seeds: int
    datasets: tuple[str, ...] = ("cifar10", "cifar100")
    ks: tuple[int, ...] | None = None  # fix-k values (None: 1..C-1, Figure 4B)
    fix_modes: tuple[str, ...] = ("permute", "average")
    average_ks: tuple[int, ...] | None = None  # fix-k (average) values when fewer than `ks` (None: the same)
    train_overrides: tuple[str, ...] = ()
    attack_n_examples: int | None = None  # None: the whole test split
    attack_n_iter: int = 100
    sweep_epochs: tuple[int, ...] | None = None  # A.6 / A.7 teacher checkpoints (None: all)
    sweep_losses: tuple[str, ...] = ("l1", "kl")
    manifold_images: int = 50
    manifold_perturbations: int = 50
    manifold_features: int = 500
    manifold_pgd_steps: int = 5
    manifold_simulated: bool = False  # also bisect for the simulated capacity (A.4.3, Figure A.8; slow)
    sweep_seeds: int | None = None  # seeds the A.6/A.7 sweeps run for (None: every seed, as the paper)
    manifold_seeds: int | None = None  # seeds the Figure 5 analysis runs for (None: every seed)
    response_images: int = 500  # test images the Appendix C gap-response attack runs on
