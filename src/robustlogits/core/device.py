"""Where work runs and in which precision: the one place that asks the hardware.

bf16 autocast is several times faster than fp32 on CPUs with AMX and on Ampere-or-newer GPUs, but
4-10x *slower* on CPUs without native bf16 (most laptops, AVX2-only AMD servers). Between the two,
the AVX-512-BF16 flag alone does not tell: measured 1.8x faster on an AMD EPYC, 1.3-1.6x slower on an
Intel Xeon without AMX. `run.amp = auto` therefore asks the machine, and on a CPU times it.
"""

from __future__ import annotations

import functools
import os
import platform
import time
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


# oneDNN ISA caps (`ONEDNN_MAX_CPU_ISA`) below AVX512_CORE_BF16: its convolutions then emulate bf16
# exactly as on an AVX2-only CPU, the case `auto` exists for
_ISA_CAPS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def isa_cap() -> str | None:
    """The instruction set oneDNN was told not to exceed (the variable its own docs name, or the
    older DNNL_ one), upper-cased; None when uncapped."""
    value = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return value.strip().upper() if value and value.strip() else None


def isa_cap_allows_bf16(cap: str | None) -> bool:
    """False for a cap below AVX512_CORE_BF16, so a machine capped to measure AVX2 behaviour trains
    in fp32 under `auto`, as the AVX2 machine would. No cap, a higher one (ALL, AVX512_CORE_AMX, ...)
    or one oneDNN does not know leaves the hardware's answer standing."""
    return cap not in _ISA_CAPS_WITHOUT_BF16


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AMX or AVX-512-BF16, asked of torch's own CPU probe, else of /proc/cpuinfo; and not capped
    away by `ONEDNN_MAX_CPU_ISA`."""
    return isa_cap_allows_bf16(isa_cap()) and _cpu_flags_have_bf16()


# bf16 must beat fp32 by this much to be chosen: where it pays it measured 1.8-1.95x, where it does
# not 0.6-0.75x, so a timing this far from both cannot flip with the noise of a shared machine
BF16_MIN_SPEEDUP = 1.15


@functools.cache
def cpu_bf16_pays_off() -> bool:
    """Native bf16 that is also measured faster than fp32, once per process."""
    return cpu_has_native_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP


def cpu_bf16_speedup(repeats: int = 3) -> float:
    """fp32 time over bf16-autocast time of one 3x3 convolution's forward and backward (batch 32, 64
    channels, 32x32, channels_last: the shape of the CIFAR nets' work), the best of interleaved
    repeats. About half a second on 2 cores."""
    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(32, 64, 32, 32, generator=generator).to(memory_format=torch.channels_last)

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = conv(x.requires_grad_())
        out.float().square().mean().backward()
        return time.perf_counter() - start

    best = {False: float("inf"), True: float("inf")}
    for _ in range(repeats + 1):  # the first round warms both paths up
        for bf16 in (False, True):
            best[bf16] = min(best[bf16], step(bf16))
    return best[False] / best[True]


def _cpu_flags_have_bf16() -> bool:
    """The kernel's view of the CPU's flags (torch's own probes are private API)."""
    try:
        return cpuinfo_has_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def cpuinfo_has_native_bf16(cpuinfo: str) -> bool:
    flags = set(cpuinfo.split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def bf16_is_native(device: torch.device) -> bool:
    """Whether bf16 autocast is the faster precision on this device (what `auto` picks)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return cpu_bf16_pays_off()
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
    """The CPU's model name as the kernel reports it (platform.processor() is often empty), and the
    oneDNN ISA cap when one is set: every timing names it, since CPUs differ by integer factors and
    a capped CPU runs another machine's kernels."""
    cap = isa_cap()
    return _model_name() + (f" (oneDNN capped to {cap})" if cap else "")


def _model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
