"""Classifiers that take [0,1] pixels: normalisation lives inside the model, so attacks and
their eps balls are defined in pixel space and nothing outside the model needs dataset stats.

`resnet18` is torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no
max-pool), the paper's architecture. Smaller variants keep CPU runs short. Every model names
its stages (input, residual stages, logits) for per-layer analyses.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from robustlogits.core import zoo
from robustlogits.core.errors import UserError

NORMALISATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "synthetic": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}


class Normalized(nn.Module):
    """Wraps a network so that it consumes [0,1] images and remembers what it is."""

    def __init__(self, net: nn.Module, mean, std, arch: str, num_classes: int, stages: dict[str, str]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.arch = arch
        self.num_classes = num_classes
        self.stages = dict(stages)  # stage name -> submodule path inside `net`

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _resnet18_torchvision(num_classes: int) -> tuple[nn.Module, dict[str, str]]:
    from torchvision.models import resnet18

    net = resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    stages = {"stem": "relu", "layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    return net, stages


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Pre-activation-free CIFAR ResNet with configurable widths (ResNet-18 layout or ResNet-20)."""

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...], num_classes: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layers.append(
                nn.Sequential(*[BasicBlock(cin if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)])
            )
            cin = w
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _cifar_resnet(blocks, widths) -> Callable[[int], tuple[nn.Module, dict[str, str]]]:
    def build(num_classes: int):
        stages = {"stem": "stem"} | {f"layer{i + 1}": f"layers.{i}" for i in range(len(blocks))}
        return CifarResNet(blocks, widths, num_classes), stages

    return build


def _cnn(widths: tuple[int, int, int]) -> Callable[[int], tuple[nn.Module, dict[str, str]]]:
    """Three conv blocks and a linear head: thousands of images/s on a CPU, for smoke runs and tests."""

    def build(num_classes: int):
        a, b, c = widths

        def block(cin, cout, pool):
            mods = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            return nn.Sequential(*(mods + [nn.MaxPool2d(2)] if pool else mods))

        net = nn.Sequential()
        net.add_module("block1", block(3, a, True))
        net.add_module("block2", block(a, b, True))
        net.add_module("block3", block(b, c, True))
        net.add_module("pool", nn.AdaptiveAvgPool2d(1))
        net.add_module("flatten", nn.Flatten())
        net.add_module("fc", nn.Linear(c, num_classes))
        return net, {"block1": "block1", "block2": "block2", "block3": "block3"}

    return build


class PatchWhitening(nn.Module):
    """A fixed first convolution that whitens the input's 2x2 patches (the fast CIFAR-training
    baselines' most effective trick: the later layers start from decorrelated, unit-variance
    features, so training converges in fewer epochs). Its weights come from the training data
    (`fit`), are saved with the model and never trained; only its bias learns.

    Each eigenvector of the patch covariance appears twice, as +v and -v, so the ReLU after it
    keeps both signs of every whitened coordinate."""

    def __init__(self, in_channels: int = 3, patch: int = 2, eps: float = 5e-4):
        super().__init__()
        self.patch, self.eps = patch, eps
        dims = in_channels * patch * patch
        self.out_channels = 2 * dims
        self.register_buffer("weight", torch.zeros(self.out_channels, in_channels, patch, patch))
        self.register_buffer("fitted", torch.tensor(False))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, eps: float | None = None) -> None:
        """Sets the weights from normalised training images (N, C, H, W), in float64 for a stable
        eigendecomposition; `eps` (default: the layer's) is added to every eigenvalue."""
        eps = self.eps if eps is None else eps
        patches = nn.functional.unfold(images.double(), self.patch).transpose(1, 2).reshape(-1, self.weight[0].numel())
        eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]).reshape(-1, *self.weight.shape[1:])
        self.weight.copy_(torch.cat([filters, -filters]).to(self.weight))
        self.fitted.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def fit_to_data(model: Normalized, images: torch.Tensor, max_images: int = 10_000, eps: float | None = None) -> None:
    """Fits the model's data-dependent layers (`PatchWhitening`) to uint8 training images; a
    model without such layers is left as it is. Deterministic: the first `max_images`."""
    layers = [m for m in model.modules() if isinstance(m, PatchWhitening)]
    if layers:
        x = model.normalize(images[:max_images].float() / 255.0)
        for layer in layers:
            layer.fit(x, eps)


def check_fitted(model: nn.Module, what: str | None = None) -> None:
    """Refuses a model whose data-dependent layers were never fitted (they would pass zeros on)."""
    if any(isinstance(m, PatchWhitening) and not bool(m.fitted) for m in model.modules()):
        name = what or getattr(model, "arch", "the model")
        raise UserError(f"{name}: its patch-whitening layer was never fitted to data")


def _vgg_fast(widths: tuple[int, int, int], whiten: bool = False) -> Callable[[int], tuple[nn.Module, dict[str, str]]]:
    """The shape of the fast CIFAR-training baselines (airbench, ResNet-9-style): a stem and three
    stages of conv-pool-BN-ReLU then conv-BN-ReLU, widest early; few layers, so CPUs train it fast.
    With `whiten`, the stem is a fixed patch-whitening convolution (`PatchWhitening`)."""

    def build(num_classes: int):
        a, b, c = widths

        def stage(cin, cout):
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        net = nn.Sequential()
        if whiten:
            whitening = PatchWhitening()
            net.add_module("stem", nn.Sequential(whitening, nn.ReLU()))
            net.add_module("block1", stage(whitening.out_channels, a))
        else:
            net.add_module(
                "stem", nn.Sequential(nn.Conv2d(3, a, 3, padding=1, bias=False), nn.BatchNorm2d(a), nn.ReLU())
            )
            net.add_module("block1", stage(a, a))
        net.add_module("block2", stage(a, b))
        net.add_module("block3", stage(b, c))
        net.add_module("pool", nn.AdaptiveMaxPool2d(1))
        net.add_module("flatten", nn.Flatten())
        net.add_module("fc", nn.Linear(c, num_classes))
        return net, {"stem": "stem", "block1": "block1", "block2": "block2", "block3": "block3"}

    return build


ARCHS: dict[str, Callable[[int], tuple[nn.Module, dict[str, str]]]] = {
    "resnet18": _resnet18_torchvision,
    "resnet18-w32": _cifar_resnet((2, 2, 2, 2), (32, 64, 128, 256)),
    "resnet18-w16": _cifar_resnet((2, 2, 2, 2), (16, 32, 64, 128)),
    "resnet20": _cifar_resnet((3, 3, 3), (16, 32, 64)),
    "cnn-small": _cnn((32, 64, 128)),
    "vgg-fast": _vgg_fast((64, 128, 256)),
    "vgg-fast-s": _vgg_fast((32, 64, 128)),
    "vgg-fast-wide": _vgg_fast((64, 256, 256)),  # airbench's widths
    "vgg-fast-white": _vgg_fast((64, 128, 256), whiten=True),
    "vgg-fast-wide-white": _vgg_fast((64, 256, 256), whiten=True),
    "cnn-tiny": _cnn((8, 16, 32)),
}


TORCHVISION_PREFIX = "torchvision:"


def _torchvision(name: str, num_classes: int) -> tuple[nn.Module, dict[str, str]]:
    """A torchvision classifier, untrained; its parametrised top-level children (all but the head)
    are the stages."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown torchvision architecture {name!r}; see torchvision.models.list_models()")
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    parametrised = [n for n, child in net.named_children() if any(True for _ in child.parameters())]
    return net, {n: n for n in parametrised[:-1]}


def arch_names() -> list[str]:
    """Every architecture `build_net` knows by name: ours, then the community's (`core.zoo`)."""
    return [*ARCHS, *zoo.ARCHS]


def buildable(arch: str) -> bool:
    return arch in ARCHS or arch in zoo.ARCHS or arch.startswith(TORCHVISION_PREFIX)


def build_net(arch: str, num_classes: int) -> tuple[nn.Module, dict[str, str]]:
    """The bare network and its stages: ours by name, the robustness community's CIFAR networks
    with their own key names (`core.zoo`, from the robustbench package), torchvision's as `torchvision:NAME`."""
    if arch.startswith(TORCHVISION_PREFIX):
        return _torchvision(arch[len(TORCHVISION_PREFIX) :], num_classes)
    if arch in zoo.ARCHS:
        return zoo.ARCHS[arch](num_classes)
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(arch_names())} (or torchvision:NAME)")
    return ARCHS[arch](num_classes)


def build_model(
    arch: str, num_classes: int, dataset: str = "cifar10", normalization: tuple | None = None
) -> Normalized:
    """An untrained model; normalisation is the dataset's unless given as (mean, std)."""
    net, stages = build_net(arch, num_classes)
    mean, std = normalization or NORMALISATION.get(dataset, NORMALISATION["synthetic"])
    return Normalized(net, mean, std, arch, num_classes, stages)


EXTERNAL_ARCH = "external"


class ExternalModel(nn.Module):
    """An imported network we have no architecture for, kept as an exported graph
    (`torch.export`) that already includes its input normalisation.

    The graph was exported in eval mode and cannot switch modes; asking for training mode is
    refused rather than silently ignored. Its only stages are the input and the logits.
    """

    def __init__(self, net: nn.Module, num_classes: int, arch: str = EXTERNAL_ARCH):
        super().__init__()
        self.net = net
        self.arch = arch
        self.num_classes = num_classes
        self.stages: dict[str, str] = {}

    def train(self, mode: bool = True) -> ExternalModel:
        if mode:
            raise UserError(
                "an imported model without an architecture runs in eval mode only "
                "(re-import it with --arch to get a trainable, per-stage model)"
            )
        self.training = False
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def stage_names(model: nn.Module) -> list[str]:
    return ["input", *model.stages, "logits"]


@torch.no_grad()
def extract_stages(model: nn.Module, x: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Activations at named stages (flattened per example), captured with forward hooks."""
    names = names or stage_names(model)
    unknown = set(names) - set(stage_names(model))
    if unknown:
        raise UserError(f"unknown stages {sorted(unknown)}; {model.arch} has {stage_names(model)}")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.net.named_modules())
    for name in names:
        if name in model.stages:
            handles.append(
                modules[model.stages[name]].register_forward_hook(
                    lambda _m, _i, out, name=name: captured.__setitem__(name, out.flatten(1))
                )
            )
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if "input" in names:
        captured["input"] = x.flatten(1)
    if "logits" in names:
        captured["logits"] = logits
    return {n: captured[n] for n in names}


def model_class_count(model: nn.Module, device: torch.device, image_shape=(3, 32, 32)) -> int:
    """How many classes a model outputs: its own record, else one forward pass."""
    count = getattr(model, "num_classes", None)
    if count is None:
        with torch.no_grad():
            count = model.eval()(torch.zeros(2, *image_shape, device=device)).shape[1]
    return int(count)
