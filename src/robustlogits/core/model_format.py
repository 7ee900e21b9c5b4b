"""How a model is stored so that it loads next year and loading it runs nobody's code.

A stored model is an architecture spec (JSON: which factory builds it, class count, input
normalisation) plus its weights as a plain state dict (read back with
`torch.load(..., weights_only=True)` and checked against a SHA-256). The model factory in
`robustlogits.core.models` rebuilds the network, so renaming or moving a class never breaks a stored
model. Beside it, MLflow's own `pt2` graph (torch.export) keeps `mlflow.pytorch.load_model`
working for anyone who calls it, without pickle.

Imported networks we have no architecture for are stored as that `pt2` graph only; it is read
back with MLflow's pickle-free check forced on. A TorchScript network that cannot be converted to
such a graph is stored as TorchScript (`robustlogits_model.ts`, checked against its SHA-256): a
durable, code-free format of its own that `torch.jit.load` reads without importing any class.

Models registered before this format (pickled eager modules) still load, through torch's
restricted unpickler with an allowlist of module classes from torch, torchvision and
`robustlogits.core.models`: a pickle that names anything else is refused, never executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from robustlogits.core.errors import UserError
from robustlogits.core.models import EXTERNAL_ARCH, ExternalModel, Normalized, build_model, buildable, check_fitted

FORMAT = "robustlogits.model"
FORMAT_VERSION = 1
SPEC_FILE = "robustlogits_model.json"
WEIGHTS_FILE = "robustlogits_weights.pt"
TORCHSCRIPT_FILE = "robustlogits_model.ts"
# rebuilt by models.build_model | an exported graph only | a TorchScript archive
FACTORY, GRAPH, TORCHSCRIPT = "factory", "graph", "torchscript"


@dataclass
class ArchitectureSpec:
    """What the model factory needs to rebuild a network; written next to its weights."""

    builder: str  # FACTORY, GRAPH or TORCHSCRIPT
    arch: str
    num_classes: int
    mean: list[float]
    std: list[float]
    input_shape: list[int] = field(default_factory=lambda: [3, 32, 32])
    weights_sha256: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ArchitectureSpec:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise UserError(f"not a robustlogits model spec (format {raw.get('format')!r})")
        if int(raw.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(
                f"model stored with spec version {raw['format_version']}; this robustlogits "
                f"reads up to {FORMAT_VERSION}: upgrade robustlogits"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def spec_of(model: nn.Module) -> ArchitectureSpec:
    """The spec of a model about to be stored: factory-built if its arch is one we can rebuild."""
    num_classes = int(model.num_classes)
    if isinstance(model, Normalized) and buildable(model.arch):
        return ArchitectureSpec(
            FACTORY, model.arch, num_classes, model.mean.flatten().tolist(), model.std.flatten().tolist()
        )
    arch = getattr(model, "arch", EXTERNAL_ARCH)
    builder = TORCHSCRIPT if is_scripted(model) else GRAPH
    return ArchitectureSpec(builder, arch, num_classes, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])


def is_scripted(model: nn.Module) -> bool:
    """An imported network kept as TorchScript (normalisation included in the script)."""
    return isinstance(model, ExternalModel) and isinstance(model.net, torch.jit.ScriptModule)


def torchscript_bytes(model: ExternalModel) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(model.net, buf)
    return buf.getvalue()


def load_torchscript(blob: bytes, what: str) -> torch.jit.ScriptModule:
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated; reading an archive is still the only way
            warnings.simplefilter("ignore")
            return torch.jit.load(io.BytesIO(blob), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{what}: cannot load the stored TorchScript: {str(exc).strip().splitlines()[0]}") from None


def weights_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's weights as stored: equal weights, equal digest."""
    return hashlib.sha256(weights_bytes(model)).hexdigest()


def stored_digest(model: nn.Module) -> str:
    """The SHA-256 a registry records for a model and checks on load: of its TorchScript file when
    it is stored as one, else of its weights."""
    if spec_of(model).builder == TORCHSCRIPT:
        return hashlib.sha256(torchscript_bytes(model)).hexdigest()
    return weights_digest(model)


def write_files(model: nn.Module, folder: Path) -> tuple[ArchitectureSpec, list[Path]]:
    """Spec (and, for factory models, weights) as files to log inside the MLflow model."""
    folder = Path(folder)
    spec = spec_of(model)
    files = []
    if spec.builder == FACTORY:
        blob = weights_bytes(model)
        spec.weights_sha256 = hashlib.sha256(blob).hexdigest()
        (folder / WEIGHTS_FILE).write_bytes(blob)
        files.append(folder / WEIGHTS_FILE)
    elif spec.builder == TORCHSCRIPT:
        blob = torchscript_bytes(model)
        spec.weights_sha256 = hashlib.sha256(blob).hexdigest()
        (folder / TORCHSCRIPT_FILE).write_bytes(blob)
        files.append(folder / TORCHSCRIPT_FILE)
    (folder / SPEC_FILE).write_text(spec.to_json())
    return spec, [folder / SPEC_FILE, *files]


def state_dict_mismatch(model: nn.Module, state: dict[str, torch.Tensor], limit: int = 8) -> str | None:
    """Why `state` does not fit `model`, naming missing, unexpected and mis-shaped keys; None if it fits.
    BatchNorm's `num_batches_tracked` counters may be absent (many published checkpoints drop them)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
    ]

    def listed(what: str, keys: list[str]) -> str:
        more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"{what} ({len(keys)}): {', '.join(keys[:limit])}{more}"

    parts = [
        listed(w, k)
        for w, k in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if k
    ]
    return "; ".join(parts) or None


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str, arch: str | None = None) -> None:
    problem = state_dict_mismatch(model, state)
    if problem:
        name = arch or getattr(model, "arch", None) or type(model).__name__
        raise UserError(f"{what} does not match architecture {name}: {problem}")
    model.load_state_dict(state, strict=False)
    check_fitted(model, what)  # weights saved before their data-dependent layers were fitted


def rebuild(
    spec: ArchitectureSpec, weights: bytes, what: str = "stored weights", expected_sha256: str | None = None
) -> Normalized:
    """The factory's network for `spec` with `weights` loaded (weights_only: tensors and containers).
    The weights must hash to `expected_sha256` (kept by the registry, out of the artifact store's
    reach) when given, else to the spec's own record."""
    actual = hashlib.sha256(weights).hexdigest()
    if expected_sha256 and actual != expected_sha256:
        raise UserError(f"{what}: its weights do not match the SHA-256 the registry recorded (corrupt or altered)")
    if spec.weights_sha256 and actual != spec.weights_sha256:
        raise UserError(f"{what}: its weights file does not match its recorded SHA-256 (corrupt or altered)")
    model = build_model(spec.arch, spec.num_classes, normalization=(spec.mean, spec.std))
    state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
    load_state(model, state, what)
    return model


@contextlib.contextmanager
def pickle_free():
    """MLflow refuses any pickle payload in a `pt2` archive while this is set."""
    key = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def load_model_dir(
    model_dir: Path,
    device: torch.device | str = "cpu",
    load_graph: Callable[[Path], nn.Module] | None = None,
    expected_sha256: str | None = None,
    what: str | None = None,
) -> nn.Module:
    """A downloaded MLflow model folder -> an eval-mode module on `device`, without running stored
    code. `load_graph` reads an exported graph (a model no factory builds); the tracking layer
    passes MLflow's pickle-free loader."""
    model_dir = Path(model_dir)
    spec_path = model_dir / "extra_files" / SPEC_FILE
    if spec_path.is_file():
        spec = ArchitectureSpec.from_json(spec_path.read_text())
        if spec.builder == FACTORY:
            weights = (model_dir / "extra_files" / WEIGHTS_FILE).read_bytes()
            model = rebuild(spec, weights, what or str(model_dir), expected_sha256)
        elif spec.builder == GRAPH and load_graph is not None:
            model = ExternalModel(load_graph(model_dir), spec.num_classes, spec.arch)
        elif spec.builder == TORCHSCRIPT:
            blob = (model_dir / "extra_files" / TORCHSCRIPT_FILE).read_bytes()
            actual = hashlib.sha256(blob).hexdigest()
            if expected_sha256 and actual != expected_sha256:
                raise UserError(
                    f"{what or model_dir}: its TorchScript file does not match the SHA-256 the registry recorded "
                    "(corrupt or altered)"
                )
            if spec.weights_sha256 and actual != spec.weights_sha256:
                raise UserError(
                    f"{model_dir}: TorchScript file does not match its recorded SHA-256 (corrupt or altered)"
                )
            model = ExternalModel(load_torchscript(blob, str(model_dir)), spec.num_classes, spec.arch)
        else:
            raise UserError(f"unknown model builder {spec.builder!r} in {spec_path}")
    elif (model_dir / "data" / "model.pth").is_file():
        model = load_legacy_pickle(model_dir / "data" / "model.pth")
    else:
        raise UserError(f"{model_dir} holds neither a robustlogits model spec nor a legacy PyTorch model")
    return model.to(torch.device(device)).eval()


# --- models registered before the spec format --------------------------------------------------

LEGACY_MODULE_PREFIXES = ("torch.nn.modules.", "torchvision.models.", "robustlogits.core.models")
# Where the model classes lived when a legacy pickle was written, and where they live now.
MOVED_MODULES = {"robustlogits.models": "robustlogits.core.models"}


def _allowed_global(name: str):
    """The class a legacy pickle names, if it is an nn.Module class from an allowed package."""
    module_name, _, attr = name.rpartition(".")
    module_name = MOVED_MODULES.get(module_name, module_name)
    if not module_name.startswith(LEGACY_MODULE_PREFIXES):
        return None
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError):
        raise UserError(
            f"legacy pickled model names {name}, which this version of the code no longer has; "
            "models stored as weights plus spec do not have this problem"
        ) from None
    return obj if isinstance(obj, type) and issubclass(obj, nn.Module) else None


def load_legacy_pickle(path: Path) -> nn.Module:
    """A pickled eager module, through torch's weights-only unpickler plus an allowlist of module
    classes: nothing outside torch, torchvision and our model classes is ever imported or called."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    allowed = []
    for name in names:
        obj = _allowed_global(name)
        if obj is None:
            raise UserError(
                f"refusing to unpickle {path}: it names {name}, which is not a known module "
                "class; if you trust its source, re-import the file with "
                "`robustlogits import --checkpoint FILE --trust-pickle`"
            )
        allowed.append((obj, name))  # under the name the pickle uses, which may be a moved module's
    with torch.serialization.safe_globals(allowed):
        try:
            model = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the restricted unpickler refused something
            raise UserError(f"refusing to unpickle {path}: {str(exc).splitlines()[-1][:300]}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{path} does not hold a PyTorch module")
    return model
