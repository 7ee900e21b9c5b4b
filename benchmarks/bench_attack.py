"""Throughput of the adversarial-accuracy attack (APGD-CE + APGD-DLR) against the library.

Three timings on the same small CNN and the same synthetic examples, in one process:

* ``ours``: ``robustlogits.core.attacks.evaluate_robustness`` (1 restart, per-example records,
  bound checks, library checks, fp32 with TF32 off);
* ``library defaults``: AutoAttack called directly with ``version='custom'``,
  ``attacks_to_run=['apgd-ce', 'apgd-dlr']`` and everything else left at its defaults
  (5 APGD restarts, batch 250);
* ``library, 1 restart``: the same call with our attack settings, which separates the
  cost of our bookkeeping from the cost of the extra restarts.

The data are made so that a fair share of points survives APGD-CE; otherwise APGD-DLR would
see almost nothing and the timing would be APGD-CE alone.

    PYTHONPATH=src:. python benchmarks/bench_attack.py --n 256
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlogits.core import autoattack_adapter as adapter
from robustlogits.core.attacks import evaluate_robustness


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(64, n_classes)
        # normalisation inside the model, as for every model in the project
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.register_buffer("std", torch.full((1, 3, 1, 1), 0.25))

    def forward(self, x):
        return self.head(self.features((x - self.mean) / self.std))


def synthetic(n: int, spread: float, seed: int, n_classes: int = 10):
    """Class means are smooth random images; samples add pixel noise. Same means for every seed."""
    g = torch.Generator().manual_seed(1234)
    means = F.interpolate(torch.randn(n_classes, 3, 8, 8, generator=g), size=32, mode="bilinear")
    means = 0.5 + spread * means / means.std()
    g.manual_seed(seed)
    y = torch.arange(n) % n_classes
    x = (means[y] + 0.1 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, y


def train(model: nn.Module, x, y, steps: int, device) -> nn.Module:
    torch.manual_seed(0)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _step in range(steps):
        i = torch.randint(0, x.shape[0], (128,))
        opt.zero_grad()
        F.cross_entropy(model(x[i].to(device)), y[i].to(device)).backward()
        opt.step()
    return model.eval()


def machine_info(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    parts = [
        f"host {platform.node()}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"cpu {cpu} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        f"autoattack backend {adapter.load_backend().label}",
    ]
    if device.type == "cuda":
        parts.append(f"gpu {torch.cuda.get_device_name(device)}; cudnn tf32 default {torch.backends.cudnn.allow_tf32}")
    return "\n".join("  " + p for p in parts)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=256, help="examples attacked")
    ap.add_argument("--n-iter", type=int, default=100)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--spread", type=float, default=0.3, help="distance between class means (robustness knob)")
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timing rounds")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    print("machine:")
    print(machine_info(device))
    x_train, y_train = synthetic(2048, args.spread, seed=0)
    x, y = synthetic(args.n, args.spread, seed=1)
    model = train(SmallCNN(), x_train, y_train, args.train_steps, device)
    print(f"config: n={args.n} eps={args.eps:.5f} n_iter={args.n_iter} Linf, device {device}")

    # warm-up (kernels, allocator, first-call import costs), not timed
    evaluate_robustness(model, x[:8], y[:8], eps=args.eps, n_iter=2, device=device, progress=False)

    x_dev, y_dev = x.to(device), y.to(device)

    def ours():
        r = evaluate_robustness(
            model, x, y, eps=args.eps, n_iter=args.n_iter, n_restarts=1, device=device, progress=False
        )
        runs["ours"] = r
        return r.adversarial_accuracy

    def library(n_restarts):
        x_adv = adapter.run_standard_autoattack(
            model,
            x_dev,
            y_dev,
            eps=args.eps,
            device=device,
            attacks=["apgd-ce", "apgd-dlr"],
            n_iter=None if n_restarts is None else args.n_iter,
            n_restarts=n_restarts,
        )
        with torch.no_grad():
            return float((model(x_adv).argmax(1) == y_dev).float().mean())

    contenders = {
        "ours (evaluate_robustness, 1 restart)": ours,
        "library defaults (custom ce+dlr, 5 restarts, bs 250)": lambda: library(None),
        "library, 1 restart (our settings)": lambda: library(1),
    }
    runs: dict = {}
    times = {name: [] for name in contenders}
    accs = {}
    # interleaved rounds with the order rotated, median reported: the machine may be shared,
    # its load drifts, and a run can be slowed by the one before it
    order = list(contenders)
    for k in range(args.repeats):
        for name in order[k % len(order) :] + order[: k % len(order)]:
            accs[name], sec = timed(contenders[name], device)
            times[name].append(sec)

    r = runs["ours"]
    print(
        f"natural accuracy {r.natural_accuracy:.3f}, after APGD-CE {r.accuracy_after_apgd_ce:.3f}; "
        f"our batch size {r.config['batch_size']}; median of {args.repeats} interleaved rounds (order rotated)"
    )
    print(f"{'run':55s} {'adv acc':>8s} {'median s':>9s} {'ex/s':>8s}  all rounds (s)")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in contenders:
        rounds = " ".join(f"{t:.1f}" for t in times[name])
        print(f"{name:55s} {accs[name]:8.3f} {med[name]:9.2f} {args.n / med[name]:8.1f}  {rounds}")
    names = list(contenders)
    print(f"throughput ratio ours / library defaults: {med[names[1]] / med[names[0]]:.2f}")
    print(f"throughput ratio ours / library 1 restart: {med[names[2]] / med[names[0]]:.2f}")
    if r.warnings:
        print("library warnings:", *r.warnings, sep="\n  ")


if __name__ == "__main__":
    main()
