"""`reproduce`: the paper's study planned as keyed steps, run on the study engine, resumed after a
kill, and reported beside the paper (checked in headless Chromium)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits import tracking
from robustlogits.cli import app
from robustlogits.config import ReproduceConfig, scale
from robustlogits.core.errors import UserError
from robustlogits.study.reproduce.claims import CLAIMS
from robustlogits.study.reproduce.evidence import VERDICTS
from robustlogits.study.reproduce.paper import TABLE2_LABELS
from robustlogits.study.reproduce.plan import GROUPS, build_plan, select_groups
from robustlogits.study.reproduce.report import mean_std, pct
from robustlogits.study.reproduce.run import make_plan, plan_table, run_reproduce

REPO = Path(__file__).resolve().parents[1]


def all_runs() -> list:
    client = MlflowClient()
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def all_versions() -> list:
    return list(MlflowClient().search_model_versions(""))


def trial_count(root: Path) -> int:
    storage = f"sqlite:///{root / 'optuna.db'}"
    return sum(
        len(optuna.load_study(study_name=s.study_name, storage=storage).trials)
        for s in optuna.get_all_study_summaries(storage)
    )


# ----------------------------------------------------------------------------- the plan


def test_plan_covers_the_study_and_keys_follow_config_and_inputs():
    sc = scale("smoke")
    steps = build_plan(sc, 2, {"cifar10": "digest-a"}, None)
    names = {s.name for s in steps}
    assert {
        "train/cifar10/at/s1",
        "attack/cifar10/st/s0",
        "distill/cifar10/s1/permute-k7",
        "distill/cifar10/s0/average-k3",
        "distill/cifar10/s0/correct-fix-1",
        "distill/cifar10/s1/hybrid",
        "sweep/cifar10/s0/e1-kl",
        "analyze/cifar10/manifold/s0",
        "analyze/cifar10/gap-response",
        "analyze/cifar10/overlap",
    } <= names
    assert "analyze/cifar10/manifold/s1" not in names  # the smoke scale analyses one seed's networks
    assert {s.group for s in steps} == set(GROUPS)
    # 2 seeds x (2 teachers + 2 attacks + normal + 3 permute + 3 average + correct-fix + hybrid)
    assert sum(s.group in ("train", "attack", "distill") for s in steps) == 2 * (4 + 9)
    keys = {s.name: s.key for s in steps}
    assert len(set(keys.values())) == len(keys) - 1  # the L1 sweep at the teacher epoch is the normal student
    assert keys["sweep/cifar10/s0/e5-l1"] == keys["distill/cifar10/s0/normal"]
    other_data = {s.name: s.key for s in build_plan(sc, 2, {"cifar10": "digest-b"}, None)}
    assert all(other_data[n] != keys[n] for n in keys)  # the data digest reaches every key via the inputs
    moved = {s.name: s.key for s in build_plan(sc, 2, {"cifar10": "digest-a"}, "/elsewhere")}
    assert moved == keys  # a data folder is a hint, not an identity
    paper = build_plan(scale("paper"), 3, {"cifar10": "d", "cifar100": "e"}, None)
    assert sum(s.name.startswith("distill/cifar10/s0/permute-k") for s in paper) == 9  # k = 1..C-1
    assert not any(s.name.startswith("distill/cifar100") for s in paper)  # distillation is CIFAR-10 only
    assert {s.name for s in paper} >= {"train/cifar100/at/s2", "analyze/cifar100/overlap"}


def test_steps_selected_by_only_and_skip():
    assert select_groups(["train", "attack"], None) == ("train", "attack")
    assert "sweeps" not in select_groups(None, ["sweeps"])
    with pytest.raises(UserError, match="unknown step 'distil'"):
        select_groups(["distil"], None)
    with pytest.raises(UserError, match="no step"):
        select_groups(["train"], ["train"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--scale", "huge"], "unknown scale 'huge'"),
        (["--scale", "test", "--seeds", "0"], "--seeds must be >= 1"),
        (["--scale", "test", "--only", "training"], "unknown step 'training'"),
        (["--scale", "test", "--only", "distill"], "needs train/synthetic/at/s0"),
        (["--scale", "test", "--storage", "sqlite:////nonexistent/dir/optuna.db"], "not reachable"),
        (["--scale", "smoke", "--data-dir", "{empty}"], "no cifar10 data found"),
        (["--scale", "test", "--workers", "two"], "--workers takes N or STAGE=N pairs"),
        (["--scale", "test", "--workers", "students=2"], "unknown stage 'students'"),
        (["--scale", "test", "--workers", "1,distill=0"], "--workers must be >= 1, got 0 for distill"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(args, message, tmp_path):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{empty}", str(tmp_path / "empty")) for a in args]
    result = CliRunner().invoke(app, ["reproduce", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not all_runs() and not (tmp_path / "out").exists()


def test_unreachable_tracking_store_fails_before_anything(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = CliRunner().invoke(app, ["reproduce", "--scale", "test", "--dry-run"])
    assert result.exit_code == 2 and "tracking store http://127.0.0.1:9 is not usable" in result.output


def test_paper_scale_counts_its_training_runs_against_appendix_a1():
    from robustlogits.study.reproduce.run import training_count

    sc = scale("paper")
    steps = build_plan(sc, sc.seeds, {"cifar10": "digest-a", "cifar100": "digest-b"}, None)
    lines = training_count(steps)
    # 2 datasets x 3 seeds x ST/AT; 3 seeds x (normal + 9 permute + 9 average + correct-fix + hybrid);
    # 3 seeds x 10 checkpoints x (L1, KL), of which each seed's epoch-40 L1 point is its normal student
    assert lines[0] == "training runs: 12 teachers, 63 students (Table 2, fix-k), 57 sweep students (A.6, A.7) = 132"
    assert "136" in lines[1] and "135 trainings" in lines[1]
    manifold = [s for s in steps if s.group == "manifold"]
    assert len(manifold) == 6  # every seed, both datasets
    c10 = [s for s in manifold if "/cifar10/" in s.name][0]
    assert c10.args["labels"] == [
        "ST teacher",
        "AT teacher",
        "normal student",
        "fix-1 (avg) student",
        "correct-fix-1 student",
        "hybrid student",
    ]
    assert c10.args["simulated"] is True


# ----------------------------------------------------------------------------- the whole study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The `test` scale end to end (2 seeds, synthetic data), once for this module's tests."""
    root = tmp_path_factory.mktemp("study")
    mp = pytest.MonkeyPatch()
    env = {
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
        "ROBUSTLOGITS_CACHE": str(root / "cache"),
        "ROBUSTLOGITS_NO_DOWNLOAD": "1",
    }
    for key, value in env.items():
        mp.setenv(key, value)
    mp.chdir(root)
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    opts = ReproduceConfig(scale="test", out=str(root / "out"), heartbeat=2)
    result = run_reproduce(opts)
    mp.undo()
    return {"root": root, "env": env, "opts": opts, "result": result}


@pytest.fixture
def in_study(study, monkeypatch):
    for key, value in study["env"].items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(study["root"])
    mlflow.set_tracking_uri(study["env"]["MLFLOW_TRACKING_URI"])
    return study


def test_every_step_has_one_finished_run_nested_under_the_study(in_study):
    plan, parent = in_study["result"]["plan"], in_study["result"]["parent_run_id"]
    runs = all_runs()
    by_id = {r.info.run_id: r for r in runs}
    keyed, artifacts_by_key = {}, {}
    for r in runs:
        if tracking.KEY_TAG in r.data.tags and r.info.run_id != parent:
            reusable = r.data.tags.get("robustlogits.job") in ("teacher-logits", "test-logits")
            (artifacts_by_key if reusable else keyed).setdefault(r.data.tags[tracking.KEY_TAG], []).append(r)
    assert {s.key for s in plan.steps} == set(keyed)
    assert artifacts_by_key and all(len(v) == 1 for v in artifacts_by_key.values())  # each artifact made once
    assert all(len(v) == 1 and v[0].info.status == "FINISHED" for v in keyed.values())
    assert all(r.info.status in ("FINISHED",) for r in runs)  # nothing left RUNNING or FAILED
    for r in [v[0] for v in keyed.values()]:  # step run -> stage study run -> the reproduce run
        stage = by_id[r.data.tags["mlflow.parentRunId"]]
        assert stage.data.tags["mlflow.parentRunId"] == parent
    counts = by_id[parent].data.metrics
    assert sum(counts[f"claims_{v.replace(' ', '_')}"] for v in VERDICTS) == len(CLAIMS)
    artifacts = {f.path for f in MlflowClient().list_artifacts(parent, "report")}
    assert {"report/index.html", "report/report.md", "report/figures"} <= artifacts


def test_second_run_does_nothing(in_study):
    runs, versions, trials = {r.info.run_id for r in all_runs()}, len(all_versions()), trial_count(in_study["root"])
    assert trials >= len({s.key for s in in_study["result"]["plan"].steps})
    result = run_reproduce(in_study["opts"])
    assert result["parent_run_id"] == in_study["result"]["parent_run_id"]
    assert {r.info.run_id for r in all_runs()} == runs and len(all_versions()) == versions
    assert trial_count(in_study["root"]) == trials
    plan = make_plan(ReproduceConfig(scale="test"))
    assert all(plan.done.values())
    from robustlogits.study.reproduce.estimate import estimate

    table = plan_table(plan, 1, estimate(plan.chosen))
    assert "0 to run" in table and "to do" not in table
    assert "cnn-tiny" in table and "over 5 repeats" in table and "at the probe's fastest and slowest" in table


def test_a_narrower_selection_works_off_its_own_stage_studies(in_study):
    """A `--only sweeps` run shares the distill stage with the students; it must not run the students
    an earlier full run queued there (it did, on the laptop study), while a rerun resumes its own queue."""
    from robustlogits.study.reproduce.run import stage_study_name

    full, again = make_plan(ReproduceConfig(scale="test")), make_plan(ReproduceConfig(scale="test"))
    sweeps = make_plan(ReproduceConfig(scale="test", only=["sweeps"]))
    assert {s.stage for s in sweeps.chosen} == {"distill"} and len(sweeps.chosen) < len(full.chosen)
    assert stage_study_name(full, "distill") == stage_study_name(again, "distill")
    assert stage_study_name(sweeps, "distill") != stage_study_name(full, "distill")
    assert full.study_key == sweeps.study_key  # one study run: the selections differ, not the plan


def _cells(html: str, table: str) -> dict[str, list[str]]:
    body = html.split(f'id="{table}"', 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]:
        cells = [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        rows[cells[0]] = cells
    return rows


def test_report_numbers_equal_the_runs(in_study):
    plan = in_study["result"]["plan"]
    finished = tracking.finished_runs_by_key()
    client = MlflowClient()

    def metric(name: str, key: str) -> float:
        return client.get_run(finished[{s.name: s.key for s in plan.steps}[name]]).data.metrics[key]

    html = (Path(in_study["opts"].out) / "report" / "index.html").read_text()
    markdown = (Path(in_study["opts"].out) / "report" / "report.md").read_text()
    table1, table2 = _cells(html, "table1"), _cells(html, "table2")
    for kind, who in (("st", "ST"), ("at", "AT")):
        for column, key in ((1, "natural_accuracy"), (2, "adversarial_accuracy")):
            values = [metric(f"attack/synthetic/{kind}/s{seed}", key) for seed in (0, 1)]
            assert table1[who][column] == pct(*mean_std(values))
            assert np.isclose(float(table1[who][column].split(" ± ")[0]), 100 * np.mean(values), atol=0.051)
    for label, shown in TABLE2_LABELS.items():
        values = [metric(f"distill/synthetic/s{seed}/{label}", "adversarial_accuracy") for seed in (0, 1)]
        assert table2[shown][2] == pct(*mean_std(values))
        assert f"| {shown} | " in markdown and pct(*mean_std(values)) in markdown
    assert len(re.findall(r"<tr data-claim=", html)) == len(CLAIMS)
    report = json.loads((Path(in_study["opts"].out) / "report" / "report.json").read_text())
    assert len(report["claims"]) == len(CLAIMS) >= 40
    for claim in report["claims"]:
        assert {"verdict", "quote", "section", "threshold", "interval", "se"} <= set(claim)
        assert claim["verdict"] in VERDICTS
        if claim["verdict"] != "not measured":
            assert claim["interval"] is not None or claim["se"] is not None
    by_id = {c["id"]: c for c in report["claims"]}
    # the test scale's teachers err on far more than 19.6% of their images: distillation is out of regime
    assert report["regimes"]["teacher"]["met"] is False
    assert by_id["hybrid-not-robust-to-any"]["verdict"] == "out of regime"
    assert by_id["l1-beats-kl-consistently"]["verdict"] in ("out of regime", "not measured")
    assert sum(report["counts"].values()) == len(CLAIMS)
    # the new evidence reaches the claims: gap response, Figure 5's students, A.3's distances, histories
    for claim_id in (
        "theory-attacks-shrink-gaps",
        "manifold-fix1-last-block-decrease",
        "l1-lower-losses",
        "st-max-logit-symmetric",
        "overlap-at-at-above-at-st",
        "mftma-mildly-overestimates",
    ):
        assert by_id[claim_id]["parts"], (claim_id, by_id[claim_id]["note"])
    # the setup's departures from A.2 (cnn-tiny on synthetic images, 2 epochs) are named beside the claims
    assert {"network", "training", "attacked images"} <= set(report["differences"])
    assert "network" in by_id["gap-smaller"]["differs"] and "differs: network" in markdown


def test_the_report_says_where_when_and_from_which_commit_its_numbers_came(in_study):
    report = json.loads((Path(in_study["opts"].out) / "report" / "report.json").read_text())
    prov = report["provenance"]
    plan = in_study["result"]["plan"]
    runs = set(tracking.finished_runs_by_key()[s.key] for s in plan.steps)
    assert {r["run"] for r in prov["steps"]} == runs and len(prov["steps"]) == len(runs)  # each run once
    assert all(r["seconds"] > 0 for r in prov["steps"])
    # timed as the worker ran each step: a student that made its teacher's logits first is charged
    # for them (they live on a run of their own, before the student's run opens)
    assert {r["timed_by"] for r in prov["steps"]} == {"worker"} and prov["steps_timed_by_worker"] == len(runs)
    assert all(r["seconds"] >= r["run_seconds"] for r in prov["steps"])
    first_student = next(r for r in prov["steps"] if r["step"].startswith("distill/"))
    assert first_student["seconds"] > first_student["run_seconds"]
    assert prov["wall_seconds"] >= max(r["seconds"] for r in prov["steps"]) and prov["step_seconds"] > 0
    assert 0 <= prov["outside_steps_seconds"] < prov["wall_seconds"]  # one uninterrupted invocation
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert prov["code"]["commit"] == head.strip() and prov["machine"]["cores"] == os.cpu_count()
    dirty = "+dirty" if prov["code"]["uncommitted_changes"] else ""
    assert {r["commit"] for r in prov["steps"]} == {head.strip() + dirty}  # each run names the code it ran
    assert prov["precisions"] == ["fp32"]  # the test preset trains in fp32
    markdown = (Path(in_study["opts"].out) / "report" / "report.md").read_text()
    assert "## Provenance" in markdown and prov["machine"]["cpu"] in markdown
    assert "each as its worker timed it, teacher logits included" in markdown
    # each step carries the estimate it was queued with, so a --dry-run's prediction can be checked
    planned: dict[str, float] = {}
    for step in plan.chosen:  # a key's first step is the one queued (a sweep point may equal a student)
        planned.setdefault(step.key, step.estimate_s)
    for row in prov["steps"]:
        key = next(s.key for s in plan.steps if s.name == row["step"])
        assert row["estimate_s"] == pytest.approx(planned[key]) and row["estimate_s"] > 0, row["step"]
    assert prov["estimated_steps"] == len(runs)
    assert prov["estimate_seconds"] == pytest.approx(sum(r["estimate_s"] for r in prov["steps"]))
    assert "| estimated | took |" in markdown and "x the estimate)" in markdown


def test_a_resumed_study_says_how_much_of_its_span_no_step_accounts_for():
    """A study killed in a student's 8th epoch and resumed 39 minutes later: its first-to-last span
    holds the stop and the thrown-away work; only its steps' own (worker) times are covered."""
    from robustlogits.study.reproduce.provenance import _clock, outside_steps_seconds, summary

    s = 1000  # ms per second
    rows = [
        {"_start": 0, "_end": 100 * s, "seconds": 100.0},  # teacher
        {"_start": 130 * s, "_end": 200 * s, "seconds": 100.0},  # student: its teacher logits came before its run
        # killed at 700 s after 500 s of work, resumed at 3040 s, finished its last epoch by 3100 s
        {"_start": 200 * s, "_end": 3100 * s, "seconds": 60.0},
        {"_start": 3100 * s, "_end": 3400 * s, "seconds": 300.0},
    ]
    assert outside_steps_seconds(rows) == pytest.approx(3400 - (100 + 100 + 60 + 300))
    assert outside_steps_seconds(rows[:2]) == pytest.approx(0)  # back to back: nothing outside
    overlapping = [{"_start": 0, "_end": 100 * s, "seconds": 100.0}, {"_start": 50 * s, "_end": 120 * s, "seconds": 70}]
    assert outside_steps_seconds(overlapping) == pytest.approx(0)  # two workers: counted once
    assert outside_steps_seconds([]) is None
    prov = {
        "machine": {"cpu": "x", "cores": 2, "memory_gib": 1, "bf16_native_cpu": False, "torch": "t"},
        "code": {"commit": "abc"},
        "step_commits": ["abc"],
        "precisions": [],
        "started": "a",
        "ended": "b",
        "wall_seconds": 3400.0,
        "step_seconds": 560.0,
        "outside_steps_seconds": 2840.0,
        "steps": [],
    }
    assert f"{_clock(2840)} of it in no step's time" in summary(prov)[2]
    assert "no step's time" not in summary({**prov, "outside_steps_seconds": 5.0})[2]


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="headless Chromium (Debian package chromium) not installed"
)
def test_report_renders_in_chromium_with_every_image(in_study, tmp_path):
    page = Path(in_study["opts"].out) / "report" / "index.html"
    out = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = out.stdout
    loaded = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert loaded, f"the page's load script did not run: {out.stderr[-2000:]}"
    ok, total = map(int, loaded.groups())
    assert total >= 14 and ok == total, f"{total - ok} of {total} images failed to load"
    assert "broken" not in re.findall(r'<img[^>]*class="([^"]*)"', dom)
    static = _cells(page.read_text(), "table1")
    assert _cells(dom, "table1") == static and _cells(dom, "table2") == _cells(page.read_text(), "table2")


# ----------------------------------------------------------------------------- killed, then resumed


@pytest.mark.parametrize("left", ["empty", "missing"])
def test_a_record_left_half_written_by_a_kill_is_moved_aside_and_the_store_reads_again(tmp_path, left):
    import pandas as pd

    mlflow.set_experiment("a killed write")
    with mlflow.start_run() as run:
        mlflow.log_input(mlflow.data.from_pandas(pd.DataFrame({"x": [1]}), name="d"), context="training")
    store = tmp_path / "mlruns"
    inputs = list((store / run.info.experiment_id / run.info.run_id / "inputs").iterdir())
    assert inputs
    # What SIGKILL leaves: MLflow creates the record's folder, then writes its meta.yaml in place.
    if left == "empty":
        (inputs[0] / "meta.yaml").write_text("")
    else:
        (inputs[0] / "meta.yaml").unlink()
    with pytest.raises((TypeError, MlflowException)):
        all_runs()
    assert tracking.configure_store().startswith("file:")
    assert [r.info.run_id for r in all_runs()] == [run.info.run_id]
    assert (tmp_path / "mlruns.quarantine" / inputs[0].relative_to(store)).is_dir()
    assert not inputs[0].exists()


def test_a_record_a_live_writer_is_still_filling_is_left_in_place(tmp_path):
    import threading

    store = tmp_path / "store"
    record = store / "1" / "abc" / "inputs" / "in1"
    record.mkdir(parents=True)
    writer = threading.Timer(0.2, lambda: (record / "meta.yaml").write_text("source_type: 0\n"))
    writer.start()
    try:
        assert tracking.repair_file_store(store) == []
    finally:
        writer.join()
    assert (record / "meta.yaml").read_text() and not (tmp_path / "store.quarantine").exists()


def test_killed_between_steps_resumes_without_duplicates(tmp_path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "robustlogits.cli",
        "reproduce",
        "--scale",
        "test",
        "--seeds",
        "1",
        "--only",
        "train,attack",
        "--heartbeat",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = subprocess.Popen(
        command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            runs = all_runs()
        except mlflow.exceptions.MissingConfigException:  # read while the job writes a record: look again
            runs = []
        finished = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("robustlogits.job") == "train"]
        if finished:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: the worst case
    proc.wait()
    tracking.configure_store()  # as the resumed job will: a record the kill left half-written is moved aside
    killed_state = {r.info.run_id: r.info.status for r in all_runs()}
    assert "FINISHED" in killed_state.values()
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs()
    keys = [
        r.data.tags[tracking.KEY_TAG]
        for r in runs
        if r.info.status == "FINISHED"
        and tracking.KEY_TAG in r.data.tags
        and r.data.tags.get("robustlogits.job") in ("train", "attack")
    ]
    assert len(keys) == 4 and len(set(keys)) == 4  # 2 teachers + 2 attacks, each once
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for r in runs:  # a run that finished before the kill is the one the study used, untouched
        if killed_state.get(r.info.run_id) == "FINISHED":
            assert r.info.status == "FINISHED"
    versions = all_versions()
    per_run_epoch = [(v.run_id, v.tags.get("epoch")) for v in versions]
    assert len(per_run_epoch) == len(set(per_run_epoch)) == 4  # 2 teachers x 2 checkpoints, none twice
    assert "claims" in result.stdout or "report in" in result.stdout


def test_average_ks_narrows_the_average_students_only():
    sc = dataclasses.replace(scale("smoke"), ks=(1, 3, 5, 7), average_ks=(1,))
    names = {s.name for s in build_plan(sc, 1, {"cifar10": "digest-a"}, None)}
    assert {f"distill/cifar10/s0/permute-k{k}" for k in (1, 3, 5, 7)} <= names
    assert "distill/cifar10/s0/average-k1" in names and "distill/cifar10/s0/average-k3" not in names


def test_the_laptop_plan_builds_and_is_estimated_by_a_probe_with_its_spread():
    from robustlogits.study.reproduce import estimate as estimate_mod
    from robustlogits.study.reproduce.estimate import estimate
    from robustlogits.study.reproduce.run import training_count

    sc = scale("laptop")
    steps = build_plan(sc, sc.seeds, {"cifar10": "digest-a"}, None)
    # the teacher regime at CPU cost: both teachers, Table 2's students, fix-k 1..7, a few swept epochs
    assert training_count(steps)[0] == (
        "training runs: 2 teachers, 8 students (Table 2, fix-k), 3 sweep students (A.6, A.7) = 13"
    )
    teacher = next(s for s in steps if s.name == "train/cifar10/at/s0").args["config"]
    assert teacher["model.arch"] == "vgg-fast-white" and teacher["data.train_subset"] is None
    assert teacher["model.whitening_eps"] == 1.0  # FGSM training collapsed on the sharper ST stem
    assert teacher["adversary.method"] == "fgsm" and teacher["optim.schedule"] == "onecycle"
    assert all(s.args["n_examples"] == 1000 for s in steps if s.task in ("reproduce-attack", "reproduce-distill"))
    sources = estimate(steps)
    assert set(sources) == {"vgg-fast-white", "vgg-fast-wide-white", "vgg-fast-s"}  # each network probed once
    assert "repeats" in sources["vgg-fast-white"]
    for step in steps:
        low, high = step.estimate_spread
        assert 0 < low <= step.estimate_s <= high, step.name
    at = next(s for s in steps if s.name == "train/cifar10/at/s0")
    st = next(s for s in steps if s.name == "train/cifar10/st/s0")
    assert estimate_mod.attack_steps(teacher) == 1 and at.estimate_s < 3 * st.estimate_s  # FGSM-RS: one step
    standard = st.args["config"]  # the ST teacher's own row: the wider net, 20 epochs, its own augmentation
    assert (standard["model.arch"], standard["optim.epochs"], standard["data.crop_pad"]) == (
        "vgg-fast-wide-white",
        20,
        2,
    )
    from robustlogits.config import distill_preset

    student = distill_preset("laptop")  # narrower, shorter students of the preset's own teachers
    assert (student.model.arch, student.optim.epochs, teacher["optim.epochs"]) == ("vgg-fast-s", 6, 12)
    assert student.teacher_spec() == "cifar10-vgg-fast-white-at"


def test_a_preset_that_trains_st_longer_reads_each_teacher_at_its_own_epoch(monkeypatch):
    from robustlogits.config import PRESETS, preset

    laptop = PRESETS["laptop"]
    longer = {"optim.epochs": 18, "run.checkpoint_epochs": (4, 8, 12, 18)}
    monkeypatch.setitem(PRESETS, "laptop", dataclasses.replace(laptop, standard=longer))
    st, at = preset("laptop", "standard"), preset("laptop", "adversarial")
    assert (st.run.training, at.run.training) == ("standard", "adversarial")
    assert (st.optim.epochs, at.optim.epochs) == (18, 12) and st.resolved_teacher_epoch() == 18
    assert preset("laptop").optim.epochs == 12  # no training named: the row's shared values only
    with pytest.raises(UserError, match="unknown run.training 'foo'; choose one of: standard, adversarial"):
        preset("laptop", "foo")
    steps = {s.name: s for s in build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)}
    assert steps["train/cifar10/st/s0"].args["config"]["optim.epochs"] == 18
    assert steps["train/cifar10/at/s0"].args["config"]["optim.epochs"] == 12
    assert (steps["attack/cifar10/st/s0"].args["epoch"], steps["attack/cifar10/at/s0"].args["epoch"]) == (18, 12)
    hybrid, normal = steps["distill/cifar10/s0/hybrid"], steps["distill/cifar10/s0/normal"]
    assert (hybrid.args["teacher_epoch"], hybrid.args["st_teacher_epoch"]) == (12, 18)
    assert "st_teacher_epoch" not in normal.args
    assert steps["analyze/cifar10/theory"].args["epochs"] == [18, 12]  # runs: ST, AT
    assert steps["analyze/cifar10/gap-response"].args["epochs"] == [18, 12]
    manifold = steps["analyze/cifar10/manifold/s0"].args
    assert dict(zip(manifold["labels"], manifold["epochs"]))["ST teacher"] == 18
    ranks = steps["analyze/cifar10/ranks"].args
    assert dict(zip(ranks["labels"], ranks["epochs"])) == {"AT s0": 12, "ST s0": 18}
    # without the ST row every teacher is read at the shared epoch, and the AT side keeps its keys
    monkeypatch.setitem(PRESETS, "laptop", dataclasses.replace(laptop, standard={}))
    shared = {s.name: s for s in build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)}
    assert shared["attack/cifar10/st/s0"].args["epoch"] == 12 and "st_teacher_epoch" not in shared[hybrid.name].args
    assert shared["train/cifar10/st/s0"].key != steps["train/cifar10/st/s0"].key
    for name in ("train/cifar10/at/s0", "attack/cifar10/at/s0", normal.name, "sweep/cifar10/s0/e4-kl"):
        assert shared[name].key == steps[name].key, name


def test_a_students_st_teacher_is_the_registered_model_of_the_st_teachers_own_network(monkeypatch):
    from robustlogits.config import PRESETS, distill_preset

    assert distill_preset("laptop").st_teacher_spec() == "models:/cifar10-vgg-fast-wide-white-st/Production"
    assert distill_preset("smoke").distill.st_teacher is None  # students of the teachers' own network
    before = {name: distill_preset(name) for name in ("laptop", "smoke")}
    wide = {"model.arch": "vgg-fast-wide", "optim.epochs": 24}
    for name, student in before.items():
        monkeypatch.setitem(PRESETS, name, dataclasses.replace(PRESETS[name], standard=wide))
        after = distill_preset(name)
        assert after.st_teacher_spec() == "models:/cifar10-vgg-fast-wide-st/Production", name
        assert after.teacher_spec() == student.teacher_spec(), name  # the AT teacher keeps the shared network
        assert (after.model.arch, after.optim.epochs) == (student.model.arch, student.optim.epochs), name


def test_an_st_row_of_its_own_network_moves_the_keys_of_the_st_teacher_and_its_users_only(monkeypatch):
    from robustlogits.config import PRESETS, distill_preset
    from robustlogits.study.reproduce.plan import STEP_SUPPLIED
    from robustlogits.study.reproduce.steps import planned_as

    before = {s.name: s.key for s in build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)}
    monkeypatch.setitem(
        PRESETS, "laptop", dataclasses.replace(PRESETS["laptop"], standard={"model.arch": "vgg-fast-wide"})
    )
    steps = {s.name: s for s in build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)}
    moved = {name for name, step in steps.items() if step.key != before[name]}
    uses_st = {"train/cifar10/st/s0", "attack/cifar10/st/s0", "distill/cifar10/s0/hybrid"}
    assert uses_st <= moved
    assert not any(
        name.startswith(("distill/", "sweep/")) for name in moved - uses_st
    )  # students of the AT teacher stay
    assert {"train/cifar10/at/s0", "attack/cifar10/at/s0", "distill/cifar10/s0/normal"}.isdisjoint(moved)
    # the teacher names the step replaces with its inputs' checkpoints are not refused as a change
    normal = steps["distill/cifar10/s0/normal"]
    planned_as(distill_preset("laptop"), json.loads(json.dumps(normal.args)), normal.name, STEP_SUPPLIED)


def test_the_teachers_targets_are_costed_once_per_checkpoint_with_the_teachers_network(monkeypatch):
    from robustlogits.study.reproduce import estimate as est

    def fixed(arch, num_classes=10, batch=128, amp_setting="auto", threads=None):
        per = 1e-4 if arch == "vgg-fast-s" else 1e-3  # the teachers' forward ten times the student's
        return est.Probe((per,) * 3, (per,) * 3, (per,) * 3, (per,) * 3, batch, "fp32", 0.0)

    monkeypatch.setattr(est, "probe", fixed)
    sc = scale("laptop")
    steps = {s.name: s for s in build_plan(sc, sc.seeds, {"cifar10": "digest-a"}, None)}
    est.estimate(list(steps.values()))
    from robustlogits.config import distill_preset

    targets = distill_preset("laptop").distill.n_augment * 45000 * 1e-3  # passes over the split, AT teacher
    first, later = steps["distill/cifar10/s0/normal"], steps["distill/cifar10/s0/permute-k3"]
    assert first.estimate_s - later.estimate_s == pytest.approx(targets)
    hybrid = steps["distill/cifar10/s0/hybrid"]  # its ST teacher's targets are new; the AT ones are paid
    assert hybrid.estimate_s - later.estimate_s == pytest.approx(targets)
    # an earlier checkpoint is another artifact: its first student pays, the next reuses it
    e4_first, e4_later = steps["sweep/cifar10/s0/e4-l1"], steps["sweep/cifar10/s0/e4-kl"]
    assert e4_first.estimate_s - e4_later.estimate_s == pytest.approx(targets)
    assert steps["sweep/cifar10/s0/e12-kl"].estimate_s == pytest.approx(later.estimate_s)


def test_an_attack_is_costed_for_the_examples_each_apgd_runs_on(monkeypatch):
    from robustlogits.study.reproduce import estimate as est

    per = 1e-3
    monkeypatch.setattr(
        est,
        "probe",
        lambda arch, num_classes=10, batch=128, amp_setting="auto", threads=None: est.Probe(
            *[(per,) * 3] * 4, batch, "fp32", 0
        ),
    )
    steps = {s.name: s for s in build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)}
    est.estimate(list(steps.values()))
    n, n_iter = 1000, 100

    def cost(kind):  # APGD-CE on the correct share, APGD-DLR on what CE left robust, one clean pass
        return n * n_iter * sum(est.ATTACKED_SHARE[kind]) * per + n * per

    st, at = steps["attack/cifar10/st/s0"], steps["attack/cifar10/at/s0"]
    assert st.estimate_s == pytest.approx(cost("standard")) and at.estimate_s == pytest.approx(cost("adversarial"))
    assert st.estimate_s < at.estimate_s  # CE leaves an ST net nothing for DLR to attack
    assert est.ATTACKED_SHARE["standard"][1] == 0 and all(0 < c <= 1 for c, _ in est.ATTACKED_SHARE.values())


def test_the_manifold_step_is_costed_per_network_with_an_mftma_fit_per_stage(monkeypatch):
    from robustlogits.study.reproduce import estimate as est

    per = {"vgg-fast-white": 1e-3, "vgg-fast-wide-white": 2e-3, "vgg-fast-s": 1e-4}  # each network its own cost
    widths = (3072, 65536, 16384, 8192, 4096, 10)  # input, stem, three blocks, logits
    monkeypatch.setattr(
        est,
        "probe",
        lambda arch, num_classes=10, batch=128, amp_setting="auto", threads=None: est.Probe(
            *[(per[arch],) * 3] * 4, batch, "fp32", 0, widths
        ),
    )
    fits = []

    def fit(n_manifolds, n_features, n_points):
        fits.append((n_manifolds, n_features, n_points))
        return n_features / 100  # 5 s at 500 features, 0.1 s at the logits' 10

    monkeypatch.setattr(est, "mftma_probe", fit)
    steps = {s.name: s for s in build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)}
    est.estimate(list(steps.values()))
    manifold = steps["analyze/cifar10/manifold/s0"]
    a = manifold.args
    assert sorted(set(fits)) == [(a["n_images"], 10, a["n_perturbations"]), (a["n_images"], 500, a["n_perturbations"])]
    assert len(fits) == 2  # one probe per shape, whatever the number of networks and stages

    def network(arch):  # PGD points, a clean pass for the features, then a fit per stage
        points = a["n_images"] * a["n_perturbations"]
        return points * (a["pgd_steps"] * per[arch] + per[arch]) + 5 * 5.0 + 0.1

    teachers = {"ST teacher": "vgg-fast-wide-white", "AT teacher": "vgg-fast-white"}
    archs = [teachers.get(label, "vgg-fast-s") for label in a["labels"]]
    assert {"ST teacher", "AT teacher"} <= set(a["labels"]) and archs.count("vgg-fast-s") >= 2
    assert manifold.estimate_s == pytest.approx(est.ANALYSIS_SECONDS + sum(network(arch) for arch in archs))


def test_an_analyses_only_selection_costs_its_networks_from_the_whole_plan(monkeypatch):
    from robustlogits.study.reproduce import estimate as est

    monkeypatch.setattr(
        est,
        "probe",
        lambda arch, num_classes=10, batch=128, amp_setting="auto", threads=None: est.Probe(
            *[(1e-4 if arch == "vgg-fast-s" else 1e-3,) * 3] * 4, batch, "fp32", 0, (500, 10)
        ),
    )
    monkeypatch.setattr(est, "mftma_probe", lambda n_manifolds, n_features, n_points: 1.0)
    steps = build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)
    est.estimate(steps)
    full = {s.name: s.estimate_s for s in steps}
    analyses = [s for s in steps if s.name.startswith("analyze/")]  # as `--only analyses` chooses them
    est.estimate(analyses, steps)
    for step in analyses:
        assert step.estimate_s == pytest.approx(full[step.name]), step.name
    est.estimate(analyses)  # without the plan: no network known, still no crash
    assert all(s.estimate_s >= est.ANALYSIS_SECONDS for s in analyses)


def test_the_mftma_probe_times_a_real_fit_on_clouds_of_the_asked_shape():
    from robustlogits.study.reproduce import estimate as est

    assert est.synthetic_manifolds(6, 20, 4).shape == (6, 20, 4)
    assert est.mftma_probe(6, 20, 4) > 0


def test_a_student_step_is_keyed_on_its_presets_values_and_refuses_a_preset_changed_since(monkeypatch):
    from robustlogits.config import PRESETS
    from robustlogits.study.reproduce.steps import planned_as

    before = {s.name: s for s in build_plan(scale("smoke"), 1, {"cifar10": "digest-a"}, None)}
    smoke = PRESETS["smoke"]
    monkeypatch.setitem(
        PRESETS,
        "smoke",
        dataclasses.replace(smoke, distill={**smoke.distill, "n_augment": smoke.distill["n_augment"] + 1}),
    )
    after = {s.name: s.key for s in build_plan(scale("smoke"), 1, {"cifar10": "digest-a"}, None)}
    assert after["train/cifar10/at/s0"] == before["train/cifar10/at/s0"].key  # teachers do not distil
    assert after["distill/cifar10/s0/normal"] != before["distill/cifar10/s0/normal"].key
    assert after["analyze/cifar10/manifold/s0"] != before["analyze/cifar10/manifold/s0"].key  # downstream follows
    from robustlogits.config import distill_preset

    stale = before["distill/cifar10/s0/normal"]  # queued under the old values, run after the change
    with pytest.raises(UserError, match="n_augment"):
        planned_as(distill_preset("smoke"), json.loads(json.dumps(stale.args)), stale.name)
    fresh = {s.name: s for s in build_plan(scale("smoke"), 1, {"cifar10": "digest-a"}, None)}
    planned_as(distill_preset("smoke"), json.loads(json.dumps(fresh[stale.name].args)), stale.name)  # no error


def test_workers_are_given_for_every_stage_or_per_stage():
    from robustlogits.config import parse_workers

    assert parse_workers("2") == (2, {})
    assert parse_workers("distill=2") == (1, {"distill": 2})
    assert parse_workers("3, distill=2,analyze=1") == (3, {"distill": 2, "analyze": 1})
    opts = ReproduceConfig(workers=1, stage_workers={"distill": 2})
    assert [opts.workers_for(stage) for stage in ("train", "attack", "distill", "analyze")] == [1, 1, 2, 1]


def test_each_stage_runs_on_its_own_workers(monkeypatch, tmp_path):
    from robustlogits.study.reproduce import estimate, report, run

    started = []
    monkeypatch.setattr(estimate, "estimate", lambda *args, **kwargs: {})
    monkeypatch.setattr(
        run,
        "run_stage",
        lambda name, items, opts, parent, estimates=None, workers=None: started.append(
            (name.rsplit("-", 1)[1], workers)
        ),
    )
    monkeypatch.setattr(report, "write_report", lambda *args: (tmp_path, []))
    opts = ReproduceConfig(scale="test", stage_workers={"distill": 2, "analyze": 3}, out=str(tmp_path))
    run.run_reproduce(opts)
    assert started == [("train", 1), ("attack", 1), ("distill", 2), ("analyze", 3)]


def test_a_stage_of_several_workers_is_probed_on_each_workers_share_of_the_cores(monkeypatch):
    """Two workers on a machine get half its cores each: a step of theirs is costed at that share,
    not at the whole machine's speed divided by two (which promised 2x where 2 cores gave 1.23x)."""
    from robustlogits.study.reproduce import estimate as est
    from robustlogits.study.reproduce.run import stage_threads

    probed = []

    def fake(arch, num_classes=10, batch=128, amp_setting="auto", threads=None):
        probed.append((arch, threads))
        per = 1e-3 if threads is None else 1.6e-3  # one of two cores: 1.6x slower per step, not 2x
        return est.Probe(*[(per,) * 3] * 4, batch, "fp32", 0, (500, 10), threads or 2)

    monkeypatch.setattr(est, "probe", fake)
    monkeypatch.setattr(est, "mftma_probe", lambda n_manifolds, n_features, n_points: 1.0)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    steps = build_plan(scale("laptop"), 1, {"cifar10": "digest-a"}, None)
    one = est.estimate(steps, stage_threads=stage_threads(ReproduceConfig()))
    alone = {s.name: s.estimate_s for s in steps}
    assert {threads for _, threads in probed} == {None} and not any("thread" in name for name in one)
    probed.clear()
    two = est.estimate(steps, stage_threads=stage_threads(ReproduceConfig(stage_workers={"distill": 2})))
    assert {threads for _, threads in probed} == {None, 1}
    assert ("vgg-fast-s", 1) in probed and ("vgg-fast-white", None) in probed
    assert "vgg-fast-s (1 thread(s))" in two and "1 thread(s) of 2 cores" in two["vgg-fast-s (1 thread(s))"]
    for step in steps:
        ratio = 1.6 if step.stage == "distill" else 1.0
        assert step.estimate_s == pytest.approx(alone[step.name] * ratio), step.name

    plan = make_plan(ReproduceConfig(scale="test"))
    for step in plan.chosen:
        step.estimate_s, step.estimate_spread = 60.0, (60.0, 60.0)
    from robustlogits.study.reproduce.run import duration

    def wall(workers):  # stages one after another; in each, its steps (one per key) shared among its workers
        counts = [len({s.key for s in plan.chosen if s.stage == stage}) for stage in workers]
        return sum(max(n * 60 / w, 60) for n, w in zip(counts, workers.values()) if n)

    per_stage = {"train": 1, "attack": 1, "distill": 2, "analyze": 1}
    assert wall(per_stage) < wall(dict.fromkeys(per_stage, 1))
    assert f"{duration(wall(per_stage))} with 1 worker (distill: 2)" in plan_table(plan, per_stage, {})
    one_worker = plan_table(plan, 1, {})
    assert (
        f"{duration(wall(dict.fromkeys(per_stage, 1)))} with 1 worker (" in one_worker
        and "distill: 2" not in one_worker
    )


def test_a_probe_runs_on_the_threads_it_is_given_and_gives_them_back():
    import torch

    from robustlogits.study.reproduce import estimate as est

    before = torch.get_num_threads()
    seen = []
    real_timed = est._timed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(est, "_timed", lambda fn, batch: seen.append(torch.get_num_threads()) or real_timed(fn, batch))
        probe = est.probe("cnn-tiny", batch=8, threads=1)
    assert probe.threads == 1 and set(seen) == {1} and "1 thread(s) of" in probe.describe()
    assert torch.get_num_threads() == before
