"""A small real task for the study-engine tests: a tracked run whose metrics depend on its params."""

from __future__ import annotations

import os
import time

import mlflow

from robustlogits.study import engine as study_engine
from robustlogits import tracking
@study_engine.task("square")
def square(params: dict) -> dict[str, float]:
    def job() -> str:
        with tracking.managed_run("robustlogits", run_name=f"square-{params['x']}-{params.get('y')}",
                                  tags={"robustlogits.job": "square"}) as run:
            mlflow.log_param("x", params["x"])
            time.sleep(float(os.environ.get("SQUARE_SLEEP", "0")))
            if params.get("y") == "fail":
                raise RuntimeError("asked to fail")
            mlflow.log_metrics({"score": params["x"] ** 2, "other": -params["x"]})
            return run.info.run_id

    return study_engine.keyed("square", {"x": params["x"], "y": params.get("y")}, job)
