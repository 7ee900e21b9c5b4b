"""Reading the study's finished runs back into the numbers the claims are judged on.

Every value comes from the run that produced it, found by its step's key. Per-example arrays
(the attacked test images' clean logits, robustness and margins) are kept so that claims about
distributions can be judged with their sampling error, not just a mean.
"""

from __future__ import annotations

import json

import numpy as np

from robustlogits import tracking
from robustlogits.config import TrainConfig, flatten
from robustlogits.core.logits import max_logit_and_gap

QUANTITIES = ("max_logit", "gap")
STATS = ("mean", "std", "skew")


def _artifact_json(run_id: str | None, path: str) -> dict | None:
    if not run_id:
        return None
    try:
        return json.loads(tracking.read_artifact(run_id, path)) | {"run": run_id}
    except Exception:  # noqa: BLE001 - a missing artifact shows as "not measured"
        return None


def per_example(result) -> dict[str, np.ndarray]:
    max_logit, gap = max_logit_and_gap(result.clean_logits)
    return {
        "max_logit": max_logit.astype(np.float64),
        "gap": gap.astype(np.float64),
        "correct": result.clean_logits.argmax(1) == result.label,
        "robust": np.asarray(result.robust, dtype=bool),
    }


def _histories(run_id: str) -> tuple[dict[str, dict[int, float]], str, dict[str, int]]:
    """Per-epoch statistics of the training run on its train-statistics and held-out splits."""
    metrics = tracking.run_record(run_id).metrics
    heldout = "val" if "val_max_logit_mean" in metrics else "test"
    keys = [f"{split}_{q}_{s}" for split in ("train", heldout) for q in QUANTITIES for s in STATS]
    keys += ["train_clean_accuracy", f"{heldout}_accuracy"]
    histories = {k.replace(f"{heldout}_", "heldout_", 1): tracking.metric_history(run_id, k) for k in keys}
    sizes = {"train": 0, "heldout": 0}
    last = max(histories["train_max_logit_mean"] or {0: 0})
    found = _artifact_json(run_id, f"histograms/epoch_{last:04d}.json")
    if found:
        for split, name in (("train", "train"), (heldout, "heldout")):
            h = found["splits"].get(split, {}).get("max_logit")
            if h:
                sizes[name] = int(sum(h["counts"]) + h["underflow"] + h["overflow"])
    return histories, heldout, sizes


def collect(plan, dataset: str) -> dict:
    """Everything the report shows and the claims judge for one dataset."""
    finished = tracking.finished_runs_by_key()
    runs = {s.name: finished.get(s.key) for s in plan.steps}
    steps = {s.name: s for s in plan.steps}
    results: dict = {
        "dataset": dataset,
        "teachers": {"st": [], "at": []},
        "students": {},
        "sweeps": {},
        "manifold": {},
        "cross": {},
        "figures": [],
        "runs": runs,
    }
    seeds = sorted({int(n.rsplit("/s", 1)[1]) for n in runs if n.startswith(f"train/{dataset}/")})
    for kind in ("st", "at"):
        for seed in seeds:
            train_run, attack_run = (
                runs.get(f"train/{dataset}/{kind}/s{seed}"),
                runs.get(f"attack/{dataset}/{kind}/s{seed}"),
            )
            if not (train_run or attack_run):
                continue
            epoch = steps[f"attack/{dataset}/{kind}/s{seed}"].args["epoch"]
            row = {"seed": seed, "train_run": train_run, "run": attack_run, "epoch": epoch}
            if train_run:
                record = tracking.run_record(train_run)
                row["epochs"] = int(float(record.params.get("optim.epochs", 0)) or 0)
                row["arch"] = record.params.get("model.arch")
                row["schedule"] = record.params.get("optim.schedule", "step")
                row["adversary"] = record.params.get("adversary.method", "pgd")
                row["adversary_steps"] = int(float(record.params.get("adversary.steps", 0)) or 0)
                row["recipe"] = recipe(record.params)
                row["history"], row["heldout_split"], row["sizes"] = _histories(train_run)
                accuracy = row["history"]["train_clean_accuracy"]
                row["train_error"] = 1 - accuracy.get(epoch, accuracy[max(accuracy)]) if accuracy else None
            if attack_run:
                m = tracking.run_record(attack_run).metrics
                row |= {"natural": m.get("natural_accuracy"), "adversarial": m.get("adversarial_accuracy")}
                result = tracking.load_attack_result(attack_run)
                row["n"] = int(result.n_examples)
                row["test"] = per_example(result)
            results["teachers"][kind].append(row)
    for name, run_id in runs.items():
        if not run_id or not name.startswith((f"distill/{dataset}/", f"sweep/{dataset}/")):
            continue
        record = tracking.run_record(run_id)
        m = record.metrics
        args = steps[name].args
        row = {
            "epochs": int(float(record.params.get("optim.epochs", 0)) or 0),
            "arch": record.params.get("model.arch"),
            "run": run_id,
            "seed": args["seed"],
            "natural": m.get("natural_accuracy"),
            "adversarial": m.get("adversarial_accuracy"),
            "n": int(m.get("n_examples") or 0),
            "teacher_error": m.get("targets_teacher_error_rate"),
            "l1_to_teacher": m.get("final_l1_to_teacher"),
            "kl_to_teacher": m.get("final_kl_to_teacher"),
        }
        if name.startswith("distill/"):
            results["students"].setdefault(name.rsplit("/", 1)[1], []).append(row)
        else:
            results["sweeps"][(args["seed"], args["teacher_epoch"], args["loss"])] = row
    for name, step in steps.items():
        if name.startswith(f"analyze/{dataset}/manifold"):
            found = _artifact_json(runs.get(name), "manifold/manifold.json")
            if found:  # the job names models by registry version; the plan by role
                found["models"] = dict(zip(step.args["labels"], found["models"].values()))
                results["manifold"][step.args.get("seed", 0)] = found
    results["theory"] = _artifact_json(runs.get(f"analyze/{dataset}/theory"), "theory/theory.json")
    response = _artifact_json(runs.get(f"analyze/{dataset}/gap-response"), "gap_response/gap_response.json")
    results["gap_response"] = response
    for analysis in ("ranks", "errors", "overlap", "images"):
        found = _artifact_json(runs.get(f"analyze/{dataset}/{analysis}"), f"{analysis}/{analysis}.json")
        if found:
            results["cross"][analysis] = found
    return results


# What the paper keeps equal between its ST and AT teachers besides the adversary (A.2)
RECIPE = (
    "model.arch",
    "model.whitening_eps",
    "optim.epochs",
    "optim.batch_size",
    "optim.lr",
    "optim.schedule",
    "optim.momentum",
    "optim.nesterov",
    "optim.weight_decay",
    "optim.label_smoothing",
    "data.crop_pad",
)


def recipe(params: dict[str, str]) -> dict[str, str]:
    """A teacher's training recipe from its params; runs from before a knob existed get its default."""
    defaults = flatten(TrainConfig())
    return {k: str(params.get(k, defaults[k])) for k in RECIPE}
