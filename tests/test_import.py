"""`robustlogits import`: external checkpoints in every format become registry versions that
attack, distill and analyze use exactly like models trained here."""

from __future__ import annotations

import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from analysis.gaps import run as run_gap_job
from analysis.manifolds import run as run_manifold_job
from robustlogits.cli import app
from robustlogits.config import AttackConfig, ManifoldConfig, distill_preset
from robustlogits.core import models
from robustlogits.jobs.attack import run_attack
from robustlogits.jobs.distill import run_distill
from robustlogits.tracking.models import resolve_and_load

NORM = "0.5,0.25"  # the synthetic data's normalisation, as MEAN,STD


class ForeignNet(nn.Module):
    """Somebody else's architecture: not in our factory, normalises inside like RobustBench models."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten()
        )
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.features((x - 0.5) / 0.25))


class WrongShape(nn.Module):
    def forward(self, x):
        return x.mean(1)  # [N, 32, 32]: not logits


def cli(*args: str):
    return CliRunner().invoke(app, ["import", *args])


def registered_names() -> list[str]:
    return [m.name for m in MlflowClient().search_registered_models()]


def run_count() -> int:
    client = MlflowClient()
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def tiny() -> models.Normalized:
    torch.manual_seed(0)
    return models.build_model("cnn-tiny", 10, "synthetic").eval()


def test_state_dict_import_then_attack_distill_and_analyze(tmp_path):
    source = tiny()
    path = tmp_path / "weights.pt"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in source.net.state_dict().items()}}, path)
    result = cli(
        "--checkpoint",
        str(path),
        "--name",
        "ext-sd",
        "--arch",
        "cnn-tiny",
        "--dataset",
        "synthetic",
        "--normalization",
        NORM,
        "--alias",
        "teacher",
        "--check-images",
        "40",
    )
    assert result.exit_code == 0, result.output
    assert "natural accuracy" in result.output and "format state_dict" in result.output
    mv = MlflowClient().get_model_version("ext-sd", "1")
    assert mv.tags["dataset"] == "synthetic" and mv.tags["num_classes"] == "10" and mv.tags["arch"] == "cnn-tiny"
    assert mv.tags["source_path"] == str(path.resolve()) and len(mv.tags["source_sha256"]) == 64
    assert mv.tags["normalization"] == "mean=0.5,0.5,0.5 std=0.25,0.25,0.25" and mv.tags["source"] == "import"

    resolved = resolve_and_load("ext-sd", alias="teacher")
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(resolved.model(x), source(x))  # same normalisation, same weights
    assert resolved.dataset == "synthetic" and resolved.model.stages == source.stages

    attack_run, attack = run_attack(AttackConfig(model="ext-sd", version="1", n_examples=40, n_iter=3), progress=False)
    assert 0 <= attack.adversarial_accuracy <= attack.natural_accuracy
    cfg = distill_preset("test")
    cfg.distill.teacher, cfg.distill.teacher_version = "ext-sd", "1"
    cfg.distill.manipulation, cfg.distill.k = "permute", 3
    cfg.distill.attack_n_examples, cfg.distill.attack_n_iter = 40, 3
    cfg.optim.epochs = 1
    student_run = run_distill(cfg, progress=False)
    student = MlflowClient().get_run(student_run)
    assert student.data.tags["teacher_name"] == "ext-sd" and student.info.status == "FINISHED"
    gap = run_gap_job([attack_run], tmp_path / "gap", 4, None, track=False)
    assert gap["models"]
    manifold = run_manifold_job(
        ["models:/ext-sd@teacher"],
        ManifoldConfig(n_images=4, n_perturbations=4, n_features=20, pgd_steps=0),
        tmp_path / "manifold",
        track=False,
        device="cpu",
        progress=False,
    )
    assert len(next(iter(manifold["models"].values()))["stage"]) == len(models.stage_names(source))


def test_torchscript_import_without_arch_is_kept_and_attacked(tmp_path):
    net = ForeignNet().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.trace(net, torch.rand(2, 3, 32, 32)), str(path))
    result = cli("--checkpoint", str(path), "--name", "ext-ts", "--dataset", "synthetic", "--check-images", "40")
    assert result.exit_code == 0, result.output
    mv = MlflowClient().get_model_version("ext-ts", "1")
    assert mv.tags["source_format"] == "torchscript" and "arch" not in mv.tags
    loaded = resolve_and_load("ext-ts", version=1).model
    assert isinstance(loaded, models.ExternalModel)
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)
    _, attack = run_attack(AttackConfig(model="models:/ext-ts/1", n_examples=20, n_iter=2), progress=False)
    assert attack.n_examples == 20
    cfg = distill_preset("test")
    cfg.distill.teacher, cfg.distill.teacher_version, cfg.distill.attack = "ext-ts", "1", False
    cfg.optim.epochs = 1
    assert MlflowClient().get_run(run_distill(cfg, progress=False)).data.tags["teacher_name"] == "ext-ts"


def test_pickled_module_needs_trust_and_loads_after_its_class_is_gone(tmp_path, monkeypatch):
    net = ForeignNet().eval()
    path = tmp_path / "full.pt"
    torch.save(net, path)
    refused = cli("--checkpoint", str(path), "--name", "ext-pickle", "--dataset", "synthetic")
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and "ForeignNet" in refused.output
    assert "ext-pickle" not in registered_names() and run_count() == 0

    ok = cli(
        "--checkpoint",
        str(path),
        "--name",
        "ext-pickle",
        "--dataset",
        "synthetic",
        "--trust-pickle",
        "--check-images",
        "20",
    )
    assert ok.exit_code == 0, ok.output
    monkeypatch.delattr(sys.modules[__name__], "ForeignNet")  # the stored graph does not need the class
    loaded = resolve_and_load("ext-pickle", version=1).model
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), net(x), rtol=1e-4, atol=1e-4)


def test_torchvision_architecture_by_name(tmp_path):
    import torchvision

    net = torchvision.models.get_model("resnet18", weights=None, num_classes=10).eval()
    path = tmp_path / "tv.pth"
    torch.save(net.state_dict(), path)
    result = cli(
        "--checkpoint",
        str(path),
        "--name",
        "ext-tv",
        "--arch",
        "torchvision:resnet18",
        "--dataset",
        "synthetic",
        "--normalization",
        "cifar10",
        "--check-images",
        "20",
    )
    assert result.exit_code == 0, result.output
    loaded = resolve_and_load("ext-tv", version=1).model
    assert loaded.arch == "torchvision:resnet18" and "layer4" in loaded.stages
    mean, std = models.NORMALISATION["cifar10"]
    x = torch.rand(2, 3, 32, 32)
    expected = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make,args,message",
    [
        (None, ["--arch", "cnn-tiny"], "does not exist"),
        (
            lambda p: torch.save(models.build_model("resnet20", 10).net.state_dict(), p),
            ["--arch", "cnn-tiny"],
            "missing keys",
        ),
        (lambda p: torch.save(models.build_model("cnn-tiny", 10).net.state_dict(), p), [], "pass --arch"),
        (
            lambda p: torch.save(models.build_model("cnn-tiny", 10).net.state_dict(), p),
            ["--arch", "cnn-tiny", "--normalization", "imagenet"],
            "unknown normalisation",
        ),
        (
            lambda p: torch.save(models.build_model("cnn-tiny", 5).net.state_dict(), p),
            ["--arch", "cnn-tiny"],
            "shape mismatches",
        ),
        (
            lambda p: torch.jit.save(torch.jit.trace(WrongShape(), torch.rand(2, 3, 32, 32)), str(p)),
            [],
            "expected \\[N, C\\]",
        ),
        (lambda p: p.write_text("not a checkpoint"), ["--arch", "cnn-tiny"], "cannot read"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_registers_nothing(tmp_path, make, args, message):
    path = tmp_path / "ckpt.pt"
    if make:
        make(path)
    result = cli("--checkpoint", str(path), "--name", "bad", "--dataset", "synthetic", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and __import__("re").search(message, lines[0]), result.output
    assert registered_names() == [] and run_count() == 0


def test_mismatch_lists_the_keys(tmp_path):
    path = tmp_path / "ckpt.pt"
    state = models.build_model("cnn-tiny", 10).net.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["fc.bias"]
    torch.save(state, path)
    result = cli("--checkpoint", str(path), "--name", "bad", "--dataset", "synthetic", "--arch", "cnn-tiny")
    assert result.exit_code == 2
    assert "missing keys (1): fc.bias" in result.output and "unexpected keys (1): extra.weight" in result.output


def test_mlflow_run_import_entry_point(tmp_path):
    """`mlflow run . -e import -P checkpoint=... -P name=...`: the entry point declares the command's options."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    path = tmp_path / "weights.pt"
    torch.save(tiny().net.state_dict(), path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(repo), "-e", "import", "--env-manager", "local",
         "--experiment-name", "robustlogits", "-P", f"checkpoint={path}", "-P", "name=via-mlproject",
         "-P", "arch=cnn-tiny", "-P", "dataset=synthetic", "-P", "check_images=20"],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered via-mlproject version 1" in proc.stdout
    mv = MlflowClient().get_model_version("via-mlproject", "1")
    run = MlflowClient().get_run(mv.run_id)
    assert run.info.status == "FINISHED" and "mlflow.project.entryPoint" in run.data.tags  # the launcher's run
    assert run.data.params["import.name"] == "via-mlproject" and run.data.params["name"] == "via-mlproject"
