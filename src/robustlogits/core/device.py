"""Where work runs and in which precision: the one place that asks the hardware.

bf16 autocast is several times faster than fp32 on CPUs with AMX or AVX-512-BF16 and on
Ampere-or-newer GPUs, but 4-10x *slower* on CPUs without native bf16 (most laptops, AVX2-only
AMD servers). `run.amp = auto` therefore asks the machine instead of assuming.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch

from robustlogits.core.errors import UserError

AMP_SETTINGS = ("auto", "true", "false")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None): the device a study worker was given (ROBUSTLOGITS_DEVICE), else a GPU if
    any. A bare `cuda` becomes the current GPU, so tensors and models agree on the index."""
    if isinstance(name, torch.device):
        device = name
    else:
        if name is None or name == "auto":
            name = os.environ.get("ROBUSTLOGITS_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no GPU is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def normalise_amp(setting) -> str:
    """`auto`, `true` or `false` (also bools and 1/0/yes/no, as older runs logged them)."""
    text = str(setting).strip().lower()
    text = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}.get(text, text)
    if text not in AMP_SETTINGS:
        raise UserError(f"run.amp must be one of {', '.join(AMP_SETTINGS)}, got {setting!r}")
    return text


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512-BF16, asked of torch's own CPU probe, else of /proc/cpuinfo."""
    probes = [getattr(torch._C._cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    probes = [p for p in probes if p is not None]
    if probes:
        try:
            return any(bool(p()) for p in probes)
        except Exception:  # noqa: BLE001 - fall back to the kernel's view
            pass
    try:
        return cpuinfo_has_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def cpuinfo_has_native_bf16(cpuinfo: str) -> bool:
    flags = set(cpuinfo.split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def bf16_is_native(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_amp(setting, device: torch.device) -> bool:
    """Whether training forward/backward run under bf16 autocast on this device."""
    choice = normalise_amp(setting)
    if choice == "auto":
        return bf16_is_native(device)
    return choice == "true"


def precision_name(amp: bool) -> str:
    """What a run logs as `run.precision`, so runs on different machines stay comparable."""
    return "bf16-autocast" if amp else "fp32"


def worker_devices(n_workers: int, workers_per_device: int = 1) -> list[str | None]:
    """The device of each of N local study workers: GPUs round-robin, `workers_per_device` on
    each (several small runs can share a GPU one run cannot fill); None on CPU-only machines."""
    if workers_per_device < 1:
        raise UserError(f"--workers-per-device must be >= 1, got {workers_per_device}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not gpus:
        return [None] * n_workers
    if n_workers > gpus * workers_per_device:
        raise UserError(
            f"{n_workers} workers do not fit {gpus} GPU(s) x {workers_per_device} workers per device; "
            "raise --workers-per-device or lower --workers"
        )
    return [f"cuda:{i % gpus}" for i in range(n_workers)]


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (platform.processor() is often empty): every
    timing names it, since CPUs differ by integer factors."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
