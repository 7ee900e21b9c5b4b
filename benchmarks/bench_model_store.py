"""Cost of storing a checkpoint as weights + spec (+ MLflow's pt2 graph) against the old pickled
eager module, measured in the same run: seconds to log, seconds to load back, bytes stored.

    python benchmarks/bench_model_store.py --arch cnn-small --repeats 3
    python benchmarks/bench_model_store.py --arch resnet18 --repeats 1

Prints ratios (new / pickle); nothing here is a timed test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path


def folder_bytes(uri: str) -> int:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import mlflow
    import torch

    from robustlogits import tracking
    from robustlogits.core.models import build_model
    from robustlogits.tracking.models import PIP_REQUIREMENTS

    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    root = Path(tempfile.mkdtemp(prefix="bench-store-"))
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri((root / "mlruns").as_uri())
    tracking.check_store("bench")
    model = build_model(args.arch, 10).eval()

    def log_new():
        return tracking.log_torch_model(model, "new").model_uri

    def log_pickle():
        return mlflow.pytorch.log_model(
            model, name="pickle", serialization_format="pickle", pip_requirements=PIP_REQUIREMENTS
        ).model_uri

    results = {}
    with mlflow.start_run():
        log_new()  # warm-up: torch.export's first call pays for imports
        for label, log in (("weights+spec+pt2", log_new), ("pickle (old)", log_pickle)):
            log_s, load_s, uri = [], [], None
            for _ in range(args.repeats):
                t = time.perf_counter()
                uri = log()
                log_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                if label.startswith("weights"):
                    tracking.load_model(uri)
                else:
                    mlflow.pytorch.load_model(uri)
                load_s.append(time.perf_counter() - t)
            results[label] = (statistics.median(log_s), statistics.median(load_s), folder_bytes(uri))
    print(f"{args.arch}, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    for label, (log_t, load_t, size) in results.items():
        print(f"  {label:18s} log {log_t:6.2f} s  load {load_t:6.2f} s  stored {size / 1e6:7.1f} MB")
    (nl, nd, ns), (pl, pd, ps) = results.values()
    print(f"  ratio new/pickle:  log {nl / pl:.2f}x  load {nd / pd:.2f}x  bytes {ns / ps:.2f}x")


if __name__ == "__main__":
    main()
