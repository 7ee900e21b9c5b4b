"""What the per-epoch histogram image costs a `smoke` epoch (target: at most 5%).

Runs a tracked `smoke`-preset training (cnn-small, 4,000 training images, PGD-5 AT by default)
in a temporary file store, and times, inside the same run, each epoch's full wall time
(training plus everything logged after it) and the part spent rendering the image and logging
it with `mlflow.log_image`. Epoch 1 warms up and is left out.

    python benchmarks/bench_epoch_images.py                       # synthetic images, AT
    python benchmarks/bench_epoch_images.py --training standard   # the cheaper ST epoch
    python benchmarks/bench_epoch_images.py --data-dir ../shared/data

Prints the median share of an epoch per part and the ratio render+log / epoch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from robustlogits.core.device import cpu_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--training", default="adversarial", choices=("standard", "adversarial"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data-dir", default=None, help="real CIFAR-10 (default: synthetic images, same sizes)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-images-"))
    os.environ.update(
        MLFLOW_TRACKING_URI=(tmp / "mlruns").as_uri(),
        MLFLOW_ALLOW_FILE_STORE="true",
        ROBUSTLOGITS_CACHE=os.environ.get("ROBUSTLOGITS_CACHE", str(tmp / "cache")),
    )

    import mlflow
    import torch

    from robustlogits.config import apply_overrides, preset
    from robustlogits.jobs import tracked_training as training_run
    from robustlogits.jobs.train import run_training

    cfg = preset("smoke")
    cfg.run.training = args.training
    overrides = [f"optim.epochs={args.epochs}", f"run.checkpoint_epochs={args.epochs}", "monitor.robust_every=0"]
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    else:  # the smoke sizes: 4,000 training images, 1,000 tracked train and held-out images
        overrides += [
            "data.dataset=synthetic",
            "data.synthetic_train_per_class=400",
            "data.synthetic_test_per_class=100",
            "data.train_subset=None",
        ]
    apply_overrides(cfg, overrides)

    spent: dict[int, dict[str, float]] = {}
    original_call, original_image = training_run.EpochLogger.__call__, training_run.EpochLogger.histogram_image
    original_log_image = mlflow.log_image

    def timed_call(self, result):
        started = time.perf_counter()
        original_call(self, result)
        spent.setdefault(result.epoch, {})["epoch"] = result.seconds + time.perf_counter() - started

    def timed_image(self, epoch, histograms):
        started = time.perf_counter()
        image = original_image(self, epoch, histograms)
        spent.setdefault(epoch, {})["render"] = time.perf_counter() - started
        return image

    def timed_log_image(image, *a, step=None, **kw):
        started = time.perf_counter()
        original_log_image(image, *a, step=step, **kw)
        spent.setdefault(step, {})["log"] = time.perf_counter() - started

    training_run.EpochLogger.__call__ = timed_call
    training_run.EpochLogger.histogram_image = timed_image
    mlflow.log_image = timed_log_image
    run_training(cfg, progress=False)

    rows = [spent[e] for e in sorted(spent) if e > 1]
    epoch = statistics.median(r["epoch"] for r in rows)
    render = statistics.median(r["render"] for r in rows)
    log = statistics.median(r["log"] for r in rows)
    print(
        f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}, "
        f"{'real CIFAR-10' if args.data_dir else 'synthetic'} smoke data, {args.training} training, "
        f"median of epochs 2..{args.epochs}"
    )
    print(f"smoke epoch (train + evaluation + logging): {epoch * 1000:.0f} ms")
    print(f"render histogram image:                     {render * 1000:.1f} ms ({render / epoch:.2%} of the epoch)")
    print(f"mlflow.log_image:                           {log * 1000:.1f} ms ({log / epoch:.2%} of the epoch)")
    print(f"render + log / epoch:                       {(render + log) / epoch:.2%} (target <= 5%)")


if __name__ == "__main__":
    main()
