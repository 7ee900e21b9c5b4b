"""The layers hold, the code is linted and formatted, MLproject follows the commands, and
finished work is found again through the one keyed-reuse helper."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from robustlogits import tracking
from robustlogits.cli import mlproject

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed (it is in the test extra: pip install -e '.[test]')"
    return found


def test_import_contracts_hold():
    """core imports no MLflow or Optuna, only tracking imports MLflow, each layer imports only the
    layers below it, and jobs never import jobs (the contracts are in pyproject.toml)."""
    proc = subprocess.run([tool("lint-imports")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.lower().split("contracts:")[-1].replace("0 broken", "")


def test_only_tracking_imports_mlflow():
    """Independent of import-linter: read every module and list the ones naming mlflow."""
    offenders = []
    door = REPO / "src" / "robustlogits" / "tracking"
    for path in [*(REPO / "src" / "robustlogits").rglob("*.py"), *(REPO / "analysis").rglob("*.py")]:
        if door in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    proc = subprocess.run([tool("ruff"), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mlproject_is_generated_from_the_commands():
    assert (REPO / "MLproject").read_text() == mlproject.render(), (
        "MLproject is out of step with the commands: python -m robustlogits.cli.mlproject > MLproject"
    )


def test_every_entry_point_declares_its_parameters_with_the_commands_defaults():
    import yaml

    spec = yaml.safe_load((REPO / "MLproject").read_text())["entry_points"]
    assert set(spec) == {"train", "attack", "distill", "import", "analyze", "sweep", "reproduce"}
    for name, entry in spec.items():
        assert entry["parameters"], name
        for parameter in entry["parameters"]:
            assert f"{{{parameter}}}" in entry["command"], (name, parameter)
    # Defaults are the commands' (which come from the config dataclasses), e.g. the attack's:
    assert spec["attack"]["parameters"]["eps"]["default"] == "8/255"
    assert spec["attack"]["parameters"]["n_iter"]["default"] == "100"
    assert spec["reproduce"]["parameters"]["scale"]["default"] == "smoke"
    # Options the command decides are not declared, so the launcher never records a placeholder
    # (`manipulation=default`) beside the value the run used; the file names them in a comment.
    assert "manipulation" not in spec["distill"]["parameters"]
    assert all(p.get("default") != mlproject.NOT_GIVEN for e in spec.values() for p in e["parameters"].values())
    assert "also -P manipulation, k," in (REPO / "MLproject").read_text()
    assert "default" not in spec["import"]["parameters"]["name"]  # required


def test_mlproject_parameters_become_the_commands_arguments():
    line = mlproject.command_line
    assert line(
        "distill",
        [
            "--manipulation",
            "permute",
            "--k",
            "3",
            "--loss",
            "default",
            "--attack",
            "false",
            "--distill.teacher_logits_seed",
            "123",
        ],
    ) == ["--manipulation", "permute", "--k", "3", "--no-attack", "--set", "distill.teacher_logits_seed=123"]
    assert line("attack", ["--attack.model", "models:/m@teacher", "--attack.n_examples", "500", "--eps", "8/255"]) == [
        "--model",
        "models:/m@teacher",
        "--n-examples",
        "500",
        "--eps",
        "8/255",
    ]
    assert line("reproduce", ["--dry_run", "true", "--scale", "test"]) == ["--dry-run", "--scale", "test"]
    assert line("analyze", ["--mode", "overlap", "--models", "a,b", "--group", "ST=a;AT=b", "--bins", "10"]) == [
        "overlap",
        "--models",
        "a,b",
        "--group",
        "ST=a",
        "--group",
        "AT=b",
    ]


@pytest.mark.parametrize(
    "entry_point, argv, message",
    [
        ("train", ["--trainig", "adversarial"], "unknown MLproject parameter 'trainig'"),
        ("attack", ["--attack.bogus", "1"], "unknown MLproject parameter 'attack.bogus'"),
        ("analyze", ["--mode", "ranks", "--bins", "3"], "analyze mode 'ranks' takes no parameter 'bins'"),
        ("analyze", ["--mode", "nonsense"], "unknown analyze mode 'nonsense'"),
    ],
)
def test_bad_mlproject_parameters_exit_2_with_one_line(entry_point, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mlproject.command_line(entry_point, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_find_or_run_reuses_finished_work_and_keys_the_right_run():
    """The key of the innermost `find_or_run` goes to the first run opened inside it, so an
    artifact made on the way (teacher logits) and the job around it each carry their own key."""
    calls = []

    def artifact() -> str:
        calls.append("artifact")
        with tracking.artifact_run("robustlogits-artifacts", "artifact", {"kind": "artifact"}) as run_id:
            tracking.log_results({"value": 1.0})
        return run_id

    def job() -> str:
        calls.append("job")
        inner = tracking.find_or_run("artifact-key", artifact)
        with tracking.job_run("robustlogits", "job", {"uses": inner.run_id}) as run_id:
            tracking.log_results({"value": 2.0})
        return run_id

    first = tracking.find_or_run("job-key", job)
    assert not first.reused and calls == ["job", "artifact"]
    job_tags = tracking.run_record(first.run_id).tags
    artifact_run = job_tags["uses"]
    assert job_tags[tracking.KEY_TAG] == "job-key"
    assert tracking.run_record(artifact_run).tags[tracking.KEY_TAG] == "artifact-key"
    again = tracking.find_or_run("job-key", job)
    assert again.reused and again.run_id == first.run_id and calls == ["job", "artifact"]
    assert tracking.find_or_run("artifact-key", artifact).run_id == artifact_run


def test_a_failed_keyed_run_is_not_reused():
    def failing() -> str:
        with tracking.job_run("robustlogits", "fails"):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        tracking.find_or_run("failing-key", failing)
    assert tracking.find_finished_run("failing-key") is None
    failed = tracking.find_runs_with_key("failing-key", ("FAILED",))
    assert len(failed) == 1 and failed[0].data.tags["error"] == "RuntimeError: boom"


def test_the_public_api_resolves_lazily():
    import subprocess

    import robustlogits

    for name in robustlogits.__all__:
        assert getattr(robustlogits, name) is not None, name
    # Importing the package alone does not import MLflow (the API loads on first use).
    code = "import sys, robustlogits; print('mlflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
