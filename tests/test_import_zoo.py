"""What the robustness community publishes, imported as a new user would: a CIFAR ResNet-18 in the
layout most adversarial-robustness code uses (conv1, bn1, layer1..4 with `shortcut`, linear; 4x4
average pool then `view(n, -1)`) traced and scripted, state dicts of that ResNet-18, PreActResNet-18
and WideResNet-28-10 (`.pt` and `.safetensors`), and a RobustBench model zoo file. Each imports,
reports its accuracy and is attacked from the registry.

The networks are the `robustbench` package's own definitions (the `robustbench` extra, which the
`test` extra installs): the very classes published checkpoints were saved from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from robustlogits.cli import app
from robustlogits.config import AttackConfig
from robustlogits.core import checkpoints, model_format, models, zoo
from robustlogits.core.errors import UserError
from robustlogits.jobs.attack import run_attack
from robustlogits.tracking.models import resolve_and_load
from tests.test_data import write_cifar10_pickles

X = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # not the batch size it was traced with


def architectures():
    return zoo.robustbench("model_zoo.architectures.resnet"), zoo.robustbench("model_zoo.architectures.wide_resnet")


def cli(*args: str):
    return CliRunner().invoke(app, ["import", *args])


def run_count() -> int:
    client = MlflowClient()
    return sum(len(client.search_runs([e.experiment_id])) for e in client.search_experiments())


def registered(name: str):
    return MlflowClient().get_model_version(name, "1")


def attacked_from_registry(name: str) -> None:
    _, result = run_attack(AttackConfig(model=f"models:/{name}/1", n_examples=10, n_iter=1), progress=False)
    assert result.n_examples == 10 and 0 <= result.adversarial_accuracy <= result.natural_accuracy <= 1


def imported_ok(result, name: str) -> dict:
    assert result.exit_code == 0, result.output
    assert re.search(r"natural accuracy \d\.\d{4} on \d+ ", result.output)
    tags = registered(name).tags
    assert float(tags["natural_accuracy"]) >= 0 and tags["source"] == "import"
    run = MlflowClient().get_run(registered(name).run_id)
    assert run.info.status == "FINISHED" and run.data.tags["natural_accuracy"] == tags["natural_accuracy"]
    return tags


def community_resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return architectures()[0].ResNet18().eval()


@pytest.mark.parametrize("how", ["trace", "script"])
def test_traced_and_scripted_community_resnet18(tmp_path, how):
    net = community_resnet18()
    path = tmp_path / f"{how}d.pt"
    program = torch.jit.trace(net, torch.rand(2, 3, 32, 32)) if how == "trace" else torch.jit.script(net)
    torch.jit.save(program, str(path))
    result = cli(
        "--checkpoint", str(path), "--name", f"rn18-{how}", "--dataset", "synthetic", "--normalization", "cifar10",
        "--check-images", "20",
    )  # fmt: skip
    tags = imported_ok(result, f"rn18-{how}")
    assert tags["source_format"] == "torchscript" and tags["stored_as"] == "torchscript"
    assert "arch" not in tags and tags["normalization"] == "cifar10"
    loaded = resolve_and_load(f"rn18-{how}", version=1).model
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in models.NORMALISATION["cifar10"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), net((X - mean) / std), rtol=1e-4, atol=1e-4)
    attacked_from_registry(f"rn18-{how}")
    if how == "trace":  # a flipped byte, the spec's own digest removed: the registry's record refuses it
        version = registered(f"rn18-{how}")
        location = MlflowClient().get_logged_model(version.model_id).artifact_location
        folder = Path(location.removeprefix("file://")) / "extra_files"
        stored = folder / model_format.TORCHSCRIPT_FILE
        blob = bytearray(stored.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        stored.write_bytes(bytes(blob))
        spec = json.loads((folder / model_format.SPEC_FILE).read_text())
        (folder / model_format.SPEC_FILE).write_text(json.dumps(spec | {"weights_sha256": None}))
        with pytest.raises(UserError, match="SHA-256 the registry recorded"):
            resolve_and_load(f"rn18-{how}", version=1)


def test_torchscript_that_cannot_be_stored_names_the_reason(tmp_path, monkeypatch):
    """When TorchScript cannot be re-scripted with its normalisation, the error says why and what to do."""

    def cannot_script(*args, **kwargs):
        raise RuntimeError("Python builtin <built-in function id> is currently not supported in Torchscript")

    monkeypatch.setattr(checkpoints.torch.jit, "script", cannot_script)
    path = tmp_path / "ts.pt"
    torch.jit.save(torch.jit.trace(models.build_model("cnn-tiny", 10).net.eval(), torch.rand(2, 3, 32, 32)), str(path))
    result = cli("--checkpoint", str(path), "--name", "nowhere", "--dataset", "synthetic", "--check-images", "10")
    assert result.exit_code == 2, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "as TorchScript: RuntimeError: Python builtin" in line and "pass --arch" in line
    assert run_count() == 0 and MlflowClient().search_registered_models() == []


def _save(state: dict, path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize(
    "arch,build,filename",
    [
        ("cifar-resnet18", lambda rn, wrn: rn.ResNet18(), "rn18.pt"),
        ("cifar-resnet18", lambda rn, wrn: rn.ResNet18(), "rn18.safetensors"),
        ("preact-resnet18", lambda rn, wrn: rn.PreActResNet18(), "preact.safetensors"),
        pytest.param(  # 36M parameters: about two minutes on a busy 2-core CPU
            "wrn-28-10", lambda rn, wrn: wrn.WideResNet(depth=28, widen_factor=10), "wrn.pt", marks=pytest.mark.slow
        ),
    ],
)
def test_community_state_dicts_load_with_their_own_key_names(tmp_path, arch, build, filename):
    torch.manual_seed(0)
    net = build(*architectures()).eval()
    path = tmp_path / filename
    _save(net.state_dict(), path)
    name = f"{arch}-{path.suffix[1:]}"
    result = cli(
        "--checkpoint", str(path), "--name", name, "--arch", arch, "--dataset", "synthetic", "--normalization", "none",
        "--check-images", "10",
    )  # fmt: skip
    tags = imported_ok(result, name)
    assert tags["arch"] == arch and tags["stored_as"] == "factory" and tags["source_format"] == "state_dict"
    loaded = resolve_and_load(name, version=1).model
    assert type(loaded.net) is type(net) and list(loaded.stages)[-1] in ("layer4", "block3")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), net(X), rtol=1e-4, atol=1e-4)
    attacked_from_registry(name)


def test_trades_wrn_34_10_with_its_unused_sub_block_loads():
    """TRADES' WideResNet-34-10 carries `sub_block1` weights its forward never uses (RobustBench builds
    it with sub_block1=True to load them); they are dropped, the rest must match exactly."""
    torch.manual_seed(0)
    net = architectures()[1].WideResNet(depth=34, widen_factor=10, sub_block1=True).eval()
    state = net.state_dict()
    assert any(k.startswith("sub_block1.") for k in state)
    model = checkpoints.model_from_state_dict(state, "wrn-34-10", 10, "cifar10", ([0.0] * 3, [1.0] * 3), "trades")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X[:1]), net(X[:1]))
    del state["fc.bias"]
    with pytest.raises(checkpoints.UserError, match=r"missing keys \(1\): fc.bias"):
        checkpoints.model_from_state_dict(state, "wrn-34-10", 10, "cifar10", None, "trades")


def test_robustbench_model_zoo_file_already_on_disk(tmp_path, monkeypatch):
    """The real `robustbench.utils.load_model` reads MODEL_DIR/DATASET/THREAT/NAME.pt, written here
    from the zoo's own architecture for Wong2020Fast (a PreActResNet-18 that normalises inside)."""

    def no_downloads(*args, **kwargs):
        raise AssertionError("robustbench tried to download")

    monkeypatch.setattr(zoo.robustbench("utils"), "download_gdrive_new", no_downloads)
    write_cifar10_pickles(tmp_path / "data")
    model_dir = tmp_path / "models"
    args = ["--model-dir", str(model_dir), "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")]

    missing = cli("--robustbench", "Wong2020Fast", "--name", "rb", *args)
    where = model_dir / "cifar10" / "Linf" / "Wong2020Fast.pt"
    assert missing.exit_code == 2 and f"put {where} there first" in missing.output, missing.output
    unknown = cli("--robustbench", "Wong2020Fats", "--name", "rb", *args)
    assert unknown.exit_code == 2 and "did you mean Wong2020Fast" in unknown.output, unknown.output
    assert run_count() == 0 and not model_dir.exists()  # nothing written, nothing fetched

    entry, _ = zoo.expected_files("Wong2020Fast", model_dir, "cifar10", "Linf")
    torch.manual_seed(0)
    net = entry["model"]().eval()
    where.parent.mkdir(parents=True)
    torch.save(net.state_dict(), where)
    result = cli("--robustbench", "Wong2020Fast", "--name", "rb", "--check-images", "20", *args)
    tags = imported_ok(result, "rb")
    assert tags["robustbench_model"] == "Wong2020Fast" and tags["source_format"] == "robustbench"
    assert tags["normalization"] == "none" and tags["source_path"] == str(where.resolve())
    with torch.no_grad():
        torch.testing.assert_close(resolve_and_load("rb", version=1).model(X), net(X), rtol=1e-4, atol=1e-4)
    attacked_from_registry("rb")


def test_near_chance_accuracy_is_warned_and_tagged(tmp_path):
    assert checkpoints.near_chance(0.93, 10, "cifar10") is None
    assert "within 5% of chance (10.0%)" in checkpoints.near_chance(0.12, 10, "none")
    path = tmp_path / "untrained.pt"
    torch.manual_seed(0)
    torch.save(models.build_model("cnn-tiny", 10).net.state_dict(), path)
    result = cli(
        "--checkpoint", str(path), "--name", "untrained", "--arch", "cnn-tiny", "--dataset", "synthetic",
        "--normalization", "none", "--check-images", "40",
    )  # fmt: skip
    tags = imported_ok(result, "untrained")
    assert float(tags["natural_accuracy"]) <= 0.15  # an untrained network is at chance
    assert "warning: natural accuracy" in result.output and "normalisation" in result.output
    assert "try --normalization" in tags["natural_accuracy_warning"]
