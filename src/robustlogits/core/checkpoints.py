"""Reading a model file from elsewhere and turning it into a model that takes [0,1] images.

The format is read from the file, not from its name: a TorchScript archive, a state dict (`.pt`,
`.pth` or `.safetensors`, loaded into `--arch`: ours, the community's CIFAR networks of `core.zoo`
or `torchvision:NAME`), or a pickled module (only when trusted, since unpickling runs code from the
file); or a RobustBench model already on disk. `check_model` runs it on test images and
`storable` picks the form it is stored in (rebuilt from a spec, an exported graph, or TorchScript)
before anything is stored.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from robustlogits.core import zoo
from robustlogits.core.data import to_float
from robustlogits.core.errors import UserError
from robustlogits.core.model_format import load_state, load_torchscript, torchscript_bytes
from robustlogits.core.models import EXTERNAL_ARCH, NORMALISATION, ExternalModel, Normalized, build_model, buildable
from robustlogits.core.zoo import first_line

if TYPE_CHECKING:
    from robustlogits.config import ImportConfig

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "state")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile


def parse_normalization(text: str | None) -> tuple[list[float], list[float]] | None:
    """none | a dataset name | MEAN,STD (one value each, or three each): the (mean, std) the
    network expects its [0,1] inputs to be standardised with. None: not given."""
    if text is None:
        return None
    key = text.strip().lower()
    if key == "none":
        return [0.0] * 3, [1.0] * 3
    if key in NORMALISATION and key != "synthetic":
        mean, std = NORMALISATION[key]
        return list(mean), list(std)
    try:
        values = [float(v) for v in key.split(",")]
    except ValueError:
        values = []
    if len(values) not in (2, 6):
        raise UserError(f"unknown normalisation {text!r}; use none, cifar10, cifar100, MEAN,STD or M1,M2,M3,S1,S2,S3")
    mean, std = (values[:1] * 3, values[1:] * 3) if len(values) == 2 else (values[:3], values[3:])
    if min(std) <= 0:
        raise UserError(f"normalisation std must be > 0, got {std}")
    return mean, std


def describe_normalization(mean: list[float], std: list[float]) -> str:
    for name in ("cifar10", "cifar100"):
        ref_mean, ref_std = NORMALISATION[name]
        if all(abs(a - b) < 1e-6 for a, b in zip([*mean, *std], [*ref_mean, *ref_std])):
            return name
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return "none"
    return "mean=" + ",".join(f"{m:g}" for m in mean) + " std=" + ",".join(f"{s:g}" for s in std)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --- reading a checkpoint --------------------------------------------------------------------------


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def read_checkpoint(path: Path, trust_pickle: bool) -> tuple[str, object]:
    """(format, content): ("torchscript", ScriptModule) | ("state_dict", dict) | ("pickled_module", Module)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("reading .safetensors needs the safetensors package (pip install safetensors)") from None
        try:
            return "state_dict", load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read {path} as safetensors: {str(exc).splitlines()[0]}") from None
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit is deprecated; reading an archive is still the only way
                warnings.simplefilter("ignore", FutureWarning)
                return "torchscript", torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot load TorchScript archive {path}: {str(exc).splitlines()[0]}") from None
    with open(path, "rb") as f:
        is_pickle = f.read(1) == b"\x80"  # torch's legacy format starts with a pickle protocol byte
    if not zipfile.is_zipfile(path) and not is_pickle:
        raise UserError(
            f"cannot read {path} as a PyTorch checkpoint: neither a torch.save file, "
            "a TorchScript archive nor .safetensors"
        )
    try:
        content = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):  # not a torch file at all
            raise UserError(f"cannot read {path} as a PyTorch checkpoint: {str(exc).splitlines()[0]}") from None
        content = _pickled_object(path, trust_pickle)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read {path} as a PyTorch checkpoint: {str(exc).splitlines()[0]}") from None
    if isinstance(content, nn.Module):
        return "pickled_module", content
    if isinstance(content, Mapping):
        return "state_dict", find_state_dict(content, path)
    raise UserError(f"{path} holds a {type(content).__name__}, not a model or a state dict")


def _pickled_object(path: Path, trust_pickle: bool) -> object:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be inspected
        names = []
    names = sorted(names, key=lambda n: n.startswith(("torch.", "collections.")))  # the unusual ones first
    named = f" (it names {', '.join(names[:3])}{'...' if len(names) > 3 else ''})" if names else ""
    if not trust_pickle:
        raise UserError(
            f"{path} is a pickled Python object{named}; loading it runs code from the file: "
            "pass --trust-pickle only if you trust its source"
        )
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot unpickle {path}: {str(exc).splitlines()[0]}") from None


def find_state_dict(content: Mapping, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict, also when wrapped ({"state_dict": ...}) or prefixed (module.)."""
    if not all(isinstance(v, torch.Tensor) for v in content.values()):
        inner = [content[k] for k in STATE_DICT_KEYS if isinstance(content.get(k), Mapping)]
        if not inner or not all(isinstance(v, torch.Tensor) for v in inner[0].values()):
            raise UserError(f"no state dict found in {path}; top-level keys: {', '.join(map(str, list(content)[:10]))}")
        content = inner[0]
    state = dict(content)
    for prefix in STRIPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


# --- turning what was read into a model that takes [0,1] images -----------------------------------


def model_from_state_dict(
    state: dict[str, torch.Tensor], arch: str | None, num_classes: int, dataset: str, normalization, what: str
) -> Normalized:
    """Our wrapper around the factory's network; a state dict of our own wrapper (net.*, mean, std)
    brings its normalisation along unless one is given."""
    if arch is None:
        raise UserError(
            f"{what} is a state dict: pass --arch (one of ours, cifar-resnet18, preact-resnet18, wrn-28-10, "
            "wrn-34-10, or torchvision:NAME)"
        )
    if "mean" in state and "std" in state and any(k.startswith("net.") for k in state):
        if normalization is None:
            normalization = (state["mean"].flatten().tolist(), state["std"].flatten().tolist())
        state = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    unused = zoo.UNUSED_PREFIXES.get(arch, ())
    state = {k: v for k, v in state.items() if not k.startswith(unused)} if unused else state
    model = build_model(arch, num_classes, dataset, normalization or ([0.0] * 3, [1.0] * 3))
    load_state(model.net, state, what, arch)
    return model


def build_imported(cfg: ImportConfig, num_classes: int) -> tuple[Normalized, dict[str, str]]:
    """The model and what its tags should say about where it came from."""
    normalization = parse_normalization(cfg.normalization)
    if cfg.robustbench:
        net, weights = zoo.load_from_model_dir(cfg.robustbench, cfg.model_dir, cfg.dataset, cfg.threat_model)
        source = {
            "source_format": "robustbench",
            "robustbench_model": cfg.robustbench,
            "source_path": str(weights.resolve()),
            "source_sha256": file_digest(weights),
        }
        kind, content = "pickled_module", net
    else:
        path = Path(cfg.checkpoint)
        kind, content = read_checkpoint(path, cfg.trust_pickle)
        source = {"source_format": kind, "source_path": str(path.resolve()), "source_sha256": file_digest(path)}
    what = cfg.robustbench or cfg.checkpoint
    if kind == "state_dict":
        model = model_from_state_dict(content, cfg.arch, num_classes, cfg.dataset, normalization, what)
    elif cfg.arch is not None:  # a module whose architecture we know: keep only its weights
        model = model_from_state_dict(content.state_dict(), cfg.arch, num_classes, cfg.dataset, normalization, what)
    elif isinstance(content, Normalized) and buildable(content.arch):  # one of ours, pickled
        model = build_model(
            content.arch,
            num_classes,
            cfg.dataset,
            normalization or (content.mean.flatten().tolist(), content.std.flatten().tolist()),
        )
        load_state(model.net, content.net.state_dict(), what, content.arch)
    else:  # stored as an exported graph or as TorchScript: see `storable`
        mean, std = normalization or ([0.0] * 3, [1.0] * 3)
        model = Normalized(content, mean, std, EXTERNAL_ARCH, num_classes, {})
    source["normalization"] = describe_normalization(model.mean.flatten().tolist(), model.std.flatten().tolist())
    return model.eval(), source


class Standardized(nn.Module):
    """[0,1] images standardised, then the network: what a TorchScript network is kept as, scripted whole."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean.detach().clone().view(1, 3, 1, 1))
        self.register_buffer("std", std.detach().clone().view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


# --- checking it, then registering it ----------------------------------------------------------


@torch.no_grad()
def check_model(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str, batch_size: int = 256
) -> float:
    """Natural accuracy on [0,1] images, after checking the output is finite [N, num_classes]."""
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size])
        try:
            out = model(x)
        except Exception as exc:  # noqa: BLE001
            raise UserError(
                f"{what} fails on [N, 3, 32, 32] images in [0,1]: {str(exc).splitlines()[0][:300]}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape != (len(x), num_classes):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"{what} outputs {shape} for {len(x)} images; expected [N, C] = [{len(x)}, {num_classes}] "
                "(logits for every class)"
            )
        if not torch.isfinite(out).all():
            raise UserError(f"{what} outputs non-finite logits")
        correct += int((out.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def storable(model: nn.Module, images: torch.Tensor, what: str) -> nn.Module:
    """The form a checked model is stored in. One we have an architecture for is rebuilt from its
    spec. One we do not is stored as an exported graph (`torch.export`); TorchScript is kept as
    TorchScript (`torch.export` refuses a ScriptModule, and the only converter is private API that
    changes between torch releases). Each form must give the same logits as the model itself; when
    none does, the reason is in the message."""
    if not isinstance(model, Normalized) or model.arch != EXTERNAL_ARCH:
        return model
    x = to_float(images[:8])
    with torch.no_grad():
        expected = model(x)
    reasons = []
    if isinstance(model.net, torch.jit.ScriptModule):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(Standardized(model.net, model.mean, model.std))
            kept = ExternalModel(
                load_torchscript(torchscript_bytes(ExternalModel(scripted, 0)), what), model.num_classes
            )
            with torch.no_grad():
                same = torch.allclose(kept(x), expected, rtol=1e-4, atol=1e-4)
            if not same:
                raise ValueError("it gives different logits once saved and loaded again")
            return kept.eval()
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"as TorchScript: {first_line(exc)}")
    else:
        try:
            return _exported_check(model, x, expected)
        except Exception as exc:  # noqa: BLE001
            reasons.append(f"as an exported graph: {first_line(exc)}")
    raise UserError(
        f"{what} cannot be stored without its architecture ({'; '.join(reasons)}); "
        "pass --arch so its weights are loaded into a known architecture"
    )


def _exported_check(model: Normalized, x: torch.Tensor, expected: torch.Tensor) -> Normalized:
    """`model` if it exports with a free batch size and the graph gives its logits."""
    graph = torch.export.export(model, (x,), dynamic_shapes=[{0: torch.export.Dim.AUTO}]).module()
    with torch.no_grad():
        if not torch.allclose(graph(x), expected, rtol=1e-4, atol=1e-4):
            raise ValueError("the exported graph gives different logits (data-dependent control flow?)")
    return model


CHANCE_MARGIN = 0.05  # "within a few points of chance"


def near_chance(accuracy: float, num_classes: int, normalization: str) -> str | None:
    """A warning when the check accuracy is within a few points of chance: a trained model whose
    declared input normalisation is wrong looks exactly like this."""
    chance = 1 / num_classes
    if accuracy > chance + CHANCE_MARGIN:
        return None
    return (
        f"natural accuracy {accuracy:.1%} is within {CHANCE_MARGIN:.0%} of chance ({chance:.1%}): if the model "
        f"is trained, the normalisation it was given ({normalization}) is probably not the one it expects; "
        "try --normalization none, cifar10 or its own MEAN,STD"
    )
