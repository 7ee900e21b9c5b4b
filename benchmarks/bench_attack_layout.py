"""What the attack's channels-last weights buy: fp32 input-gradient steps (forward, loss, gradient
with respect to the images: one APGD iteration) on the laptop preset's nets, per memory layout.

`core.attacks` runs every attack with channels-last weights (`_attack_mode`); this prints images/s
for the plain (NCHW) weights, channels-last weights, and channels-last weights and inputs, and
the ratio of each to NCHW measured in the same process (median of `--repeats`).

    PYTHONPATH=src python benchmarks/bench_attack_layout.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from robustlogits.core.device import cpu_name
from robustlogits.core.models import build_model

LAYOUTS = ("nchw", "channels-last weights", "channels-last weights and inputs")


def input_gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return grad


def images_per_second(model, x, y, repeats: int) -> float:
    input_gradient(model, x, y)  # warm-up: kernels chosen, memory allocated
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        input_gradient(model, x, y)
        times.append(time.perf_counter() - start)
    return x.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="vgg-fast,vgg-fast-s")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{cpu_name()}, torch {torch.__version__}, {args.threads} threads, fp32")
    for arch in args.archs.split(","):
        x = torch.rand(args.batch, 3, 32, 32)
        y = torch.randint(0, 10, (args.batch,))
        rates = {}
        for layout in LAYOUTS:
            model = build_model(arch, 10, "cifar10").eval()
            inputs = x
            if layout != "nchw":
                model = model.to(memory_format=torch.channels_last)
            if layout.endswith("inputs"):
                inputs = x.contiguous(memory_format=torch.channels_last)
            rates[layout] = images_per_second(model, inputs, y, args.repeats)
        base = rates["nchw"]
        print(f"{arch}: " + "; ".join(f"{k} {v:,.0f} img/s ({v / base:.2f}x)" for k, v in rates.items()))


if __name__ == "__main__":
    main()
