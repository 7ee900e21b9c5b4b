"""The sweep's own cost, measured in one run against the work it schedules:

1. per-trial overhead of the study engine (Optuna storage, keyed look-ups, child-run
   bookkeeping, the parent run's table and figures) against the trial's distillation itself
   (`run_distill`: data, teacher logits, training, attack, registration); target < 5%;
2. the same 2 x 2 grid with 2 local worker processes against 1 (threads per worker = cores / N).

    python benchmarks/bench_sweep.py                                  # test preset, seconds per trial
    python benchmarks/bench_sweep.py --epochs 6 --per-class 256       # longer trials

Everything runs in a temporary folder with the default embedded stores (sqlite mlflow.db and
optuna.db), on a synthetic AT teacher trained first. Timings on a busy machine are not final.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from robustlogits.core.device import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="student epochs per trial")
    parser.add_argument("--per-class", type=int, default=64, help="synthetic training images per class")
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="bench-sweep-")
    os.chdir(folder)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["ROBUSTLOGITS_CACHE"] = os.path.join(folder, "cache")

    from robustlogits.config import SweepConfig, preset
    from robustlogits.jobs import distill as distill_job
    from robustlogits.jobs.train import run_training
    from robustlogits.study import engine as study_engine
    from robustlogits.study.sweep import run_sweep

    cfg = preset("test")
    cfg.run.training = "adversarial"
    cfg.data.synthetic_train_per_class = args.per_class
    run_training(cfg, progress=False)

    job_seconds: list[float] = []
    worker_seconds: list[float] = []
    real_distill, real_workers = distill_job.run_distill, study_engine.run_workers

    def timed_distill(*a, **k):
        start = time.perf_counter()
        try:
            return real_distill(*a, **k)
        finally:
            job_seconds.append(time.perf_counter() - start)

    def timed_workers(*a, **k):
        start = time.perf_counter()
        try:
            return real_workers(*a, **k)
        finally:
            worker_seconds.append(time.perf_counter() - start)

    distill_job.run_distill, study_engine.run_workers = timed_distill, timed_workers

    def sweep(seed: int, workers: int) -> float:
        settings = SweepConfig(
            teacher="synthetic-cnn-tiny-at",
            losses=["l1", "kl"],
            preset="test",
            workers=workers,
            study=f"bench-{seed}-{workers}",
            overrides=[f"optim.epochs={args.epochs}", f"run.seed={seed}"],
        )
        start = time.perf_counter()
        result = run_sweep(settings)
        assert result.status.done and result.status.complete == 4, result.message()
        return time.perf_counter() - start

    first = sweep(0, 1)
    trials = len(job_seconds)
    overhead = worker_seconds[0] - sum(job_seconds)
    one, two = sweep(1, 1), sweep(2, 2)

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"trials: test preset, {args.epochs} student epochs, {args.per_class} images/class, final APGD attack")
    print(
        f"1. per trial: distillation {sum(job_seconds) / trials:.2f} s, engine overhead {overhead / trials:.3f} s "
        f"-> overhead / distillation = {overhead / sum(job_seconds):.1%} (target < 5%)"
    )
    print(f"   one-time setup of the first sweep (checks, study, parent run): {first - worker_seconds[0]:.2f} s")
    print(f"2. 2 x 2 grid wall time: 1 worker {one:.1f} s, 2 workers {two:.1f} s -> speed-up {one / two:.2f}x")
    print(f"(folder {folder})")


if __name__ == "__main__":
    main()
