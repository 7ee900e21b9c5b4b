"""The paper's study in GPU-hours: our paths against a naive reference, measured in one run.

At the paper's settings (ResNet-18, batch 128, PGD-10 at eps 8/255 step 2/255, the 45,000-image
CIFAR-10 train split) it times, on one device:

* an ST epoch, a PGD-10 AT epoch and a distillation epoch (L1 on fixed teacher targets) of
  `training.fit` (uint8 data and augmentation on the device, channels_last, `run.amp=auto`,
  no host sync per step, optionally `torch.compile`), each after a warm-up;
* the same epochs done naively: a DataLoader over PIL images with per-image torchvision
  transforms, fp32, eager, a loss read with `.item()` every step, textbook PGD and, for
  distillation, the teacher run on every batch (as the paper did); timed over
  `--reference-batches` batches and scaled to the epoch;
* APGD-CE + APGD-DLR examples/s (`attacks.evaluate_robustness`) against the AutoAttack library
  called directly with the same attack settings and its default batch of 250;
* what a run also does per epoch (logit statistics, the PGD monitor every 10 epochs,
  checkpoint logits) and, for distillation, the averaged teacher-logit pass;

then estimates hours per 200-epoch run and for the whole study, next to the paper's Table 3
(Titan Xp: 1.66 h ST, 18 h AT, 3.83 h KD per run; 136 runs). The paper gives only the run total,
not how many runs of each kind; `--study ST,AT,KD` (default 38,10,88: 136 runs, 580 Titan Xp
hours) sets the mix. On a GPU, `torch.cuda.set_sync_debug_mode` also counts the host
synchronisations one training epoch makes.

    python benchmarks/bench_gpu.py --data-dir ../shared/data                   # GPU, paper settings
    python benchmarks/bench_gpu.py --data-dir ../shared/data --compile         # with torch.compile
    python benchmarks/bench_gpu.py --device cpu --arch cnn-tiny --images 512 \\
        --reference-batches 2 --attack-n 32 --attack-iter 5                    # does it run (CPU)
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from bench_train import cpu_name  # benchmarks/ is on sys.path when run as a script
from torch.nn import functional as F

from robustlogits.config import AdversaryConfig, DataConfig, OptimConfig, preset
from robustlogits.core import training
from robustlogits.core.attacks import evaluate_robustness
from robustlogits.core.autoattack_adapter import run_standard_autoattack
from robustlogits.core.data import Split, build_bundle, load_raw, make_synthetic
from robustlogits.core.device import bf16_is_native, precision_name, resolve_amp, resolve_device
from robustlogits.core.logits import compute_logits
from robustlogits.core.models import build_model
from robustlogits.core.perturb import LinfPGD
from robustlogits.jobs.distill import averaged_teacher_logits

PAPER_HOURS = {"ST": 1.66, "AT": 18.0, "KD": 3.83}  # Table 3, per run, Titan Xp
EPS, STEP = 8 / 255, 2 / 255


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def new_model(args, num_classes, device, seed=0):
    torch.manual_seed(seed)
    return build_model(args.arch, num_classes, "cifar10").to(device).to(memory_format=torch.channels_last)


# --- ours -----------------------------------------------------------------------------------


def ours_epoch(args, model, split: Split, objective, amp, device) -> float:
    """Seconds for one epoch over `split` after a short warm-up (kernels, allocator, compile)."""

    def run(part, epochs=1):
        optim = OptimConfig(epochs=epochs, batch_size=args.batch, lr=0.01)
        results = []
        training.fit(
            training.make_state(model, optim, device, 0),
            part,
            objective,
            optim,
            amp=amp,
            channels_last=True,
            compile=args.compile,
            sync_every=0,
            on_epoch_end=results.append,
            progress=False,
        )
        return results[-1].seconds

    run(split.subset(torch.arange(min(len(split), args.batch * 8)).numpy()))
    return run(split)


def count_host_syncs(args, model, split, objective, amp, device) -> int | None:
    """Synchronising CUDA calls during one short epoch (`set_sync_debug_mode`); None off CUDA."""
    if device.type != "cuda":
        return None
    part = split.subset(torch.arange(min(len(split), args.batch * 20)).numpy())
    optim = OptimConfig(epochs=1, batch_size=args.batch, lr=0.01)
    state = training.make_state(model, optim, device, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            training.fit(
                state,
                part,
                objective,
                optim,
                amp=amp,
                channels_last=True,
                compile=args.compile,
                sync_every=0,
                progress=False,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


# --- the naive reference --------------------------------------------------------------------


def pil_loader(split: Split, batch, shuffle=True):
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    images = split.images.cpu().numpy()
    labels = split.labels.cpu().numpy()

    class PilDataset(Dataset):
        def __init__(self):
            self.images = [Image.fromarray(im.transpose(1, 2, 0)) for im in images]
            self.transform = transforms.Compose(
                [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
            )

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.transform(self.images[i]), int(labels[i]), i

    return DataLoader(PilDataset(), batch_size=batch, shuffle=shuffle, num_workers=0, drop_last=True)


def cycle(loader):
    while True:
        yield from loader


def naive_pgd(model, x, y):
    """Textbook PGD-10: a new tensor per step, fp32, eager."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(10):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + STEP * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    model.train()
    return x_adv.detach()


def reference_epoch(args, kind, split: Split, num_classes, device, teacher=None) -> float:
    """Seconds per epoch of a straightforward script, timed over a few batches and scaled."""
    model = build_model(args.arch, num_classes, "cifar10").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    loader = cycle(pil_loader(split, args.batch))
    warm, timed_batches = 3, args.reference_batches
    started, total = None, 0.0
    for b in range(warm + timed_batches):
        if b == warm:
            sync(device)
            started = time.perf_counter()
        x, y, _ = next(loader)
        x, y = x.to(device), y.to(device)
        model.train()
        if kind == "AT":
            x = naive_pgd(model, x, y)
        logits = model(x)
        if kind == "KD":
            with torch.no_grad():
                target = teacher(x)
            loss = (logits - target).abs().sum(1).mean()
        else:
            loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    sync(device)
    per_batch = (time.perf_counter() - started) / timed_batches
    return per_batch * (len(split) // args.batch)


# --- per-run extras -------------------------------------------------------------------------


def per_epoch_evaluation(args, model, bundle, device) -> tuple[float, float, float]:
    """(logit statistics per epoch, one PGD monitor, one checkpoint's test logits) in seconds."""
    paper = preset("paper")
    monitor = paper.monitor
    stats = lambda: [compute_logits(model, s.images, 500, True) for s in (bundle.stats, bundle.heldout)]  # noqa: E731
    compute_logits(model, bundle.stats.images[:500], 500, True)
    _, stats_s = timed(stats, device)
    n_mon = min(paper.monitor.robust_examples, len(bundle.test))
    x = bundle.test.images[:n_mon].float().div(255).contiguous(memory_format=torch.channels_last)
    y = bundle.test.labels[:n_mon]
    attack = LinfPGD(EPS, 2.5 * EPS / monitor.robust_steps, monitor.robust_steps, True, "eval")
    _, monitor_s = timed(lambda: [attack(model, x[i : i + 500], y[i : i + 500]) for i in range(0, n_mon, 500)], device)
    _, ckpt_s = timed(lambda: compute_logits(model, bundle.test.images, 500, True), device)
    return stats_s, monitor_s, ckpt_s


def attack_rates(args, model, bundle, device) -> tuple[float, float]:
    n = min(args.attack_n, len(bundle.test))
    x = bundle.test.images[:n].float().div(255)
    y = bundle.test.labels[:n]
    model.eval()
    evaluate_robustness(model, x[:8], y[:8], eps=EPS, n_iter=2, device=device, progress=False)
    _, ours_s = timed(
        lambda: evaluate_robustness(
            model, x, y, eps=EPS, n_iter=args.attack_iter, n_restarts=1, device=device, progress=False
        ),
        device,
    )
    n_ref = min(n, args.attack_reference_n)
    _, ref_s = timed(
        lambda: run_standard_autoattack(
            model,
            x[:n_ref],
            y[:n_ref],
            eps=EPS,
            device=device,
            attacks=["apgd-ce", "apgd-dlr"],
            n_iter=args.attack_iter,
            n_restarts=1,
        ),
        device,
    )
    return n / ours_s, n_ref / ref_s


# --- main -----------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=None, help="real CIFAR-10; synthetic images of the same size otherwise")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--images", type=int, default=45000, help="training images (paper: 45,000)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile our paths (run.compile=true)")
    ap.add_argument("--amp", default="auto", help="run.amp for our paths: auto, true, false")
    ap.add_argument("--reference-batches", type=int, default=30, help="batches timed per naive epoch")
    ap.add_argument("--attack-n", type=int, default=1000)
    ap.add_argument("--attack-reference-n", type=int, default=500)
    ap.add_argument("--attack-iter", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=200, help="epochs per run (paper: 200)")
    ap.add_argument("--n-augment", type=int, default=8, help="teacher-logit passes per distillation run")
    ap.add_argument("--study", default="38,10,88", help="runs of each kind: ST,AT,KD")
    args = ap.parse_args()
    started = time.perf_counter()
    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    study = dict(zip(("ST", "AT", "KD"), (int(v) for v in args.study.split(","))))

    if args.data_dir:
        raw = load_raw("cifar10", args.data_dir)
    else:
        raw = make_synthetic(train_per_class=args.images // 10 + 500, test_per_class=1000)
    val_per_class = 500 if len(raw.train_labels) >= args.images + 5000 else 0
    train_subset = args.images if args.images < len(raw.train_labels) - 10 * val_per_class else None
    bundle = build_bundle(
        raw,
        val_per_class=val_per_class,
        split_seed=0,
        train_subset=train_subset,
        stats_subset=min(DataConfig().stats_subset, args.images),
        heldout_subset=None,
        device=device,
    )
    nc, split = bundle.num_classes, bundle.train

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(
        f"device {device} ({gpu}); cpu {cpu_name()}; torch {torch.__version__}; "
        f"cudnn tf32 {torch.backends.cudnn.allow_tf32}"
    )
    print(
        f"settings: {args.arch}, batch {args.batch}, PGD-10 eps 8/255 step 2/255, {len(split)} training images "
        f"({'CIFAR-10' if args.data_dir else 'synthetic'}), ours: {precision_name(amp)} (run.amp={args.amp}, "
        f"native bf16 {bf16_is_native(device)}), channels_last, compile {args.compile}; reference: DataLoader+PIL "
        f"per-image transforms, fp32, eager, timed over {args.reference_batches} batches and scaled"
    )

    pgd = training.adversarial_objective(AdversaryConfig(), amp)
    rows = {}
    for kind, objective in (("ST", training.standard_objective()), ("AT", pgd)):
        model = new_model(args, nc, device)
        if kind == "AT":
            syncs = count_host_syncs(args, copy.deepcopy(model), split, objective, amp, device)
        ours = ours_epoch(args, model, split, objective, amp, device)
        ref = reference_epoch(args, kind, split, nc, device)
        rows[kind] = (ours, ref)
        print(f"{kind} epoch: ours {ours:8.2f} s | reference {ref:8.2f} s | {ref / ours:6.2f}x")
        if kind == "AT":
            at_model = model

    teacher = copy.deepcopy(at_model).eval()
    targets, teacher_pass = timed(lambda: averaged_teacher_logits(teacher, split, args.n_augment, "eval", 0), device)
    kd = training.distillation_objective(targets, "l1", 1.0)
    ours = ours_epoch(args, new_model(args, nc, device, seed=1), split, kd, amp, device)
    ref = reference_epoch(args, "KD", split, nc, device, teacher=teacher)
    rows["KD"] = (ours, ref)
    print(
        f"KD epoch: ours {ours:8.2f} s | reference (teacher on every batch) {ref:8.2f} s | {ref / ours:6.2f}x; "
        f"teacher-logit pass ({args.n_augment} augmentations) {teacher_pass:.2f} s once per run"
    )
    if syncs is not None:
        print(
            f"host synchronisations in a 20-step AT epoch of ours (sync_every=0; 1 expected, the epoch-end read): {syncs}"
        )

    ours_rate, ref_rate = attack_rates(args, at_model, bundle, device)
    print(
        f"APGD-CE + APGD-DLR ({args.attack_iter} iterations, 1 restart): ours {ours_rate:8.1f} examples/s | "
        f"library directly (batch 250) {ref_rate:8.1f} examples/s | {ours_rate / ref_rate:5.2f}x; "
        f"the 10,000 test images take {10000 / ours_rate / 60:.1f} min"
    )

    stats_s, monitor_s, ckpt_s = per_epoch_evaluation(args, at_model, bundle, device)
    paper = preset("paper")
    every, n_ckpt = paper.monitor.robust_every, len(paper.run.checkpoint_epochs)
    extra = args.epochs * stats_s + (args.epochs // every) * monitor_s + n_ckpt * ckpt_s
    print(
        f"per run besides training: logit statistics {stats_s:.2f} s/epoch, PGD monitor {monitor_s:.2f} s every "
        f"{every} epochs, checkpoint logits {ckpt_s:.2f} s x {n_ckpt}: {extra / 60:.1f} min per run"
    )

    hours = {k: (args.epochs * rows[k][0] + extra + (teacher_pass if k == "KD" else 0)) / 3600 for k in rows}
    ref_hours = {k: (args.epochs * rows[k][1] + extra) / 3600 for k in rows}
    print(f"\nper {args.epochs}-epoch run (ours and reference: training plus the same per-epoch logging)")
    print("                             paper (Titan Xp)   ours      reference")
    for k in rows:
        print(f"  {k}                         {PAPER_HOURS[k]:6.2f} h       {hours[k]:7.2f} h  {ref_hours[k]:7.2f} h")
    total = {
        name: sum(study[k] * h[k] for k in study)
        for name, h in (("paper", PAPER_HOURS), ("ours", hours), ("reference", ref_hours))
    }
    print(
        f"whole study ({study['ST']} ST + {study['AT']} AT + {study['KD']} KD = {sum(study.values())} runs): "
        f"paper {total['paper']:.0f} GPU-h | ours {total['ours']:.1f} GPU-h | reference {total['reference']:.1f} GPU-h "
        f"| ours vs paper {total['paper'] / total['ours']:.1f}x"
    )
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
