"""A small real task for the study-engine tests: a tracked run whose metrics depend on its params."""

from __future__ import annotations

import os
import time

from robustlogits import tracking
from robustlogits.study import engine as study_engine


@study_engine.task("square")
def square(params: dict) -> dict[str, float]:
    def job() -> str:
        with tracking.job_run(
            "robustlogits", f"square-{params['x']}-{params.get('y')}", {"robustlogits.job": "square"}
        ) as run_id:
            tracking.log_params({"x": params["x"]})
            time.sleep(float(os.environ.get("SQUARE_SLEEP", "0")))
            if params.get("y") == "fail":
                raise RuntimeError("asked to fail")
            tracking.log_results({"score": params["x"] ** 2, "other": -params["x"]})
            return run_id

    key = tracking.job_key({"task": "square", "x": params["x"], "y": params.get("y")})
    return study_engine.keyed("square", key, job)
