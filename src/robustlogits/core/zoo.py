"""The robustness community's CIFAR networks, from the `robustbench` package (optional extra
`pip install 'robustlogits[robustbench]'`), with their own parameter names so published state
dicts load as they are.

| our name | RobustBench's definition | key names |
|---|---|---|
| `cifar-resnet18` | `architectures.resnet.ResNet18` | `conv1`, `bn1`, `layer1..4` (blocks with `shortcut`), `linear` |
| `preact-resnet18` | `architectures.resnet.PreActResNet18` | `conv1`, `layer1..4` (pre-activation blocks), `linear` |
| `wrn-28-10`, `wrn-34-10` | `architectures.wide_resnet.WideResNet` | `conv1`, `block1..3.layer`, `bn1`, `fc` |

The same package's `load_model` reads a RobustBench model zoo entry from `MODEL_DIR/DATASET/THREAT/NAME.pt`;
`load_from_model_dir` calls it only when every file it would read is already there, so nothing is
downloaded.

RobustBench 1.1.1 imports `autoattack` (the official, git-only package) when it is imported, though
loading a model never calls it. Where only the registry's repackaging `pyautoattack` is installed,
that name is lent to it for the duration of the import and taken back afterwards, so
`core.autoattack_adapter` still sees which package is really installed.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from torch import nn

from robustlogits.core.errors import UserError

INSTALL_HINT = "pip install 'robustlogits[robustbench]'"
THREAT_MODELS = ("Linf", "L2", "corruptions")
ROBUSTBENCH_DATASETS = ("cifar10", "cifar100", "imagenet")


@contextlib.contextmanager
def _autoattack_name_lent():
    """`autoattack` resolves to `pyautoattack` inside the block when the official package is absent."""
    try:
        importlib.import_module("autoattack")
        yield
        return
    except ImportError:
        pass
    try:
        package = importlib.import_module("pyautoattack")
        state = importlib.import_module("pyautoattack.state")
    except ImportError:
        yield  # robustbench's own import error then names what is missing
        return
    lent = {"autoattack": package, "autoattack.state": state}
    sys.modules.update(lent)
    try:
        yield
    finally:
        for name, module in lent.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def robustbench(submodule: str = "utils") -> ModuleType:
    """`robustbench.<submodule>`, or a one-line error saying how to install the extra."""
    name = f"robustbench.{submodule}"
    if name in sys.modules:
        return sys.modules[name]
    try:
        with _autoattack_name_lent(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkg_resources and torch.jit deprecations inside the package
            return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(f"this needs the robustbench package ({exc}); install it with {INSTALL_HINT}") from None


def _architectures(module: str) -> ModuleType:
    return robustbench(f"model_zoo.architectures.{module}")


def _resnet18(num_classes: int) -> tuple[nn.Module, dict[str, str]]:
    net = _architectures("resnet").ResNet(_architectures("resnet").BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    return net, {"stem": "bn1", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}


def _preact_resnet18(num_classes: int) -> tuple[nn.Module, dict[str, str]]:
    resnet = _architectures("resnet")
    net = resnet.PreActResNet(resnet.PreActBlock, [2, 2, 2, 2], num_classes=num_classes)
    return net, {"stem": "conv1", **{f"layer{i}": f"layer{i}" for i in range(1, 5)}}


def _wide_resnet(depth: int, widen: int) -> Callable[[int], tuple[nn.Module, dict[str, str]]]:
    def build(num_classes: int):
        net = _architectures("wide_resnet").WideResNet(depth=depth, num_classes=num_classes, widen_factor=widen)
        return net, {"stem": "conv1", "block1": "block1", "block2": "block2", "block3": "block3"}

    return build


ARCHS: dict[str, Callable[[int], tuple[nn.Module, dict[str, str]]]] = {
    "cifar-resnet18": _resnet18,
    "preact-resnet18": _preact_resnet18,
    "wrn-28-10": _wide_resnet(28, 10),
    "wrn-34-10": _wide_resnet(34, 10),
}
# Parameters some published checkpoints carry for modules their forward never uses: TRADES'
# WideResNet-34-10 defines a `sub_block1` (RobustBench builds it with sub_block1=True to load it).
UNUSED_PREFIXES = {"wrn-28-10": ("sub_block1.",), "wrn-34-10": ("sub_block1.",)}


# --- RobustBench's model zoo, from files already on disk ------------------------------------------


def expected_files(name: str, model_dir: str | Path, dataset: str, threat_model: str) -> tuple[dict, list[Path]]:
    """The zoo entry for `name` and the files `load_model` would read for it."""
    if dataset not in ROBUSTBENCH_DATASETS:
        raise UserError(f"RobustBench has no dataset {dataset!r}; it has {', '.join(ROBUSTBENCH_DATASETS)}")
    if threat_model not in THREAT_MODELS:
        raise UserError(f"unknown RobustBench threat model {threat_model!r}; choose one of {', '.join(THREAT_MODELS)}")
    zoo = robustbench("model_zoo")
    enums = robustbench("model_zoo.enums")
    entries = zoo.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]
    if name not in entries:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"RobustBench has no {dataset} {threat_model} model named {name!r}{hint}")
    path = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    ids = entries[name].get("gdrive_id")
    files = [Path(f"{path}_m{i}.pt") for i in range(len(ids))] if isinstance(ids, list) else [path]
    return entries[name], files


def load_from_model_dir(name: str, model_dir: str | Path, dataset: str, threat_model: str) -> tuple[nn.Module, Path]:
    """RobustBench's `load_model(name, model_dir, dataset, threat_model)` on files already in place:
    the zoo's own architecture with the file's weights, in eval mode. Never downloads."""
    _, files = expected_files(name, model_dir, dataset, threat_model)
    timm_name = f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"
    if robustbench("utils").timm.is_model(timm_name):
        raise UserError(
            f"RobustBench serves {name} through timm's hub ({timm_name}), which this command does not download "
            "from; save its state dict and import it with --checkpoint FILE --arch timm's architecture instead"
        )
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"RobustBench weights for {name} not found: put {', '.join(map(str, missing))} there first "
            f"(MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt, as robustbench.utils.load_model reads it; "
            "this command does not download)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = robustbench("utils").load_model(
                model_name=name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model
            )
    except Exception as exc:  # noqa: BLE001 - a corrupt or mismatched file
        raise UserError(f"robustbench could not load {name} from {files[0]}: {first_line(exc)}") from None
    if not isinstance(net, nn.Module):
        raise UserError(f"robustbench returned a {type(net).__name__} for {name}, not a module")
    return net.cpu().eval(), files[0]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's reason on one line, following its cause when its own message is empty."""
    seen = exc
    while seen is not None:
        text = next((line.strip() for line in str(seen).splitlines() if line.strip()), "")
        if text:
            return f"{type(seen).__name__}: {text}"[:limit]
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__
