"""Training throughput: our loop (uint8 data on device, batched augmentation, channels_last) in
both precisions (bf16 autocast and fp32) against a naive reference loop (DataLoader over PIL
images with per-image torchvision transforms, fp32) measured in the same run, for an ST step and
a PGD-AT step, and which precision `run.amp=auto` picks on this machine.

    python benchmarks/bench_train.py --arch cnn-small --images 2048
    python benchmarks/bench_train.py --arch resnet18 --images 512 --pgd-steps 10

Prints images/s for each, the ratios, and how far `auto`'s choice is from the faster precision
(the goal: within 10% everywhere; bf16 wins on AMX / AVX-512-BF16 CPUs and Ampere+ GPUs, fp32 on
AVX2-only CPUs). Real CIFAR-10 is used when --data-dir points at it, synthetic images otherwise
(throughput does not depend on pixel values).

Then where a batch's time goes, each part timed alone: the reference's data (PIL crop/flip,
ToTensor, collate) and its fp32 NCHW step, our batched augmentation and our step in fp32 NCHW,
fp32 channels-last and bf16. The ratio ours/reference is (its data + its step) / (our
augmentation + our step), so this says which part a machine's ratio comes from. To see an
AVX2-only CPU's kernels on a newer one, cap oneDNN and ATen (every line then names the cap):

    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_train.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.nn import functional as F

from robustlogits.config import AdversaryConfig, OptimConfig
from robustlogits.core.data import build_bundle, load_raw, make_synthetic
from robustlogits.core.device import bf16_is_native, cpu_name, precision_name, resolve_amp
from robustlogits.core.models import build_model
from robustlogits.core.perturb import LinfPGD
from robustlogits.core.training import adversarial_objective, fit, make_state, standard_objective


def ours(arch, bundle, adversarial, pgd_steps, amp, channels_last, device, epochs=2):
    model = build_model(arch, bundle.num_classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optim = OptimConfig(epochs=epochs, batch_size=128, lr=0.01)
    adv = AdversaryConfig(steps=pgd_steps, step_size=2.5 * (8 / 255) / pgd_steps)
    objective = adversarial_objective(adv, amp) if adversarial else standard_objective()
    results = []
    fit(
        make_state(model, optim, device, 0),
        bundle.train,
        objective,
        optim,
        amp=amp,
        channels_last=channels_last,
        on_epoch_end=results.append,
        progress=False,
    )
    return results[-1].images_per_second  # the first epoch warms up


def reference(arch, images, labels, adversarial, pgd_steps, device, batches):
    """What a straightforward PyTorch script does: PIL images, per-image transforms, fp32."""
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    class PilDataset(Dataset):
        def __init__(self):
            self.images = [Image.fromarray(im.transpose(1, 2, 0)) for im in images]
            self.transform = transforms.Compose(
                [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
            )

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return self.transform(self.images[i]), int(labels[i])

    model = build_model(arch, int(labels.max()) + 1).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    attack = LinfPGD(8 / 255, 2.5 * (8 / 255) / pgd_steps, pgd_steps)
    loader = DataLoader(PilDataset(), batch_size=128, shuffle=True, num_workers=0, drop_last=True)
    seen, started = 0, None
    for epoch in range(2):
        if epoch == 1:
            seen, started = 0, time.perf_counter()
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if adversarial:
                x = attack(model, x, y)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
    return seen / (time.perf_counter() - started)


def _ms_per_batch(fn, batches: int) -> float:
    """Median of `batches` timed calls after 3 untimed ones (oneDNN picks and caches its kernels,
    the allocator settles): one slow call on a shared machine does not move it."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(batches):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1e3


def breakdown(arch, images, labels, adversarial, pgd_steps, device, batches=15, batch_size=128) -> dict[str, float]:
    """Milliseconds per batch of each part of the two loops, timed alone on the same images."""
    from PIL import Image
    from torchvision import transforms

    from robustlogits.core.data import augment, to_float
    from robustlogits.core.perturb import autocast

    pil = [Image.fromarray(im.transpose(1, 2, 0)) for im in images[:batch_size]]
    transform = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    uint8 = torch.from_numpy(images[:batch_size]).to(device)
    y = torch.from_numpy(labels[:batch_size]).long().to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    attack = LinfPGD(8 / 255, 2.5 * (8 / 255) / pgd_steps, pgd_steps)

    def step_fn(amp: bool, channels_last: bool):
        model = build_model(arch, int(labels.max()) + 1).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        perturb = LinfPGD(8 / 255, 2.5 * (8 / 255) / pgd_steps, pgd_steps, amp=amp) if adversarial else None
        x = to_float(uint8, channels_last)

        def step():
            inputs = perturb(model, x, y, generator) if perturb is not None else x
            with autocast(device, amp):
                loss = F.cross_entropy(model(inputs).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    def reference_step():
        model = build_model(arch, int(labels.max()) + 1).to(device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = to_float(uint8)

        def step():
            inputs = attack(model, x, y) if adversarial else x
            loss = F.cross_entropy(model(inputs), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    return {
        "reference data": _ms_per_batch(lambda: torch.stack([transform(im) for im in pil]), batches),
        "reference step fp32 NCHW": _ms_per_batch(reference_step(), batches),
        "our augmentation": _ms_per_batch(lambda: to_float(augment(uint8, generator, 4), True), batches),
        "our step fp32 NCHW": _ms_per_batch(step_fn(False, False), batches),
        "our step fp32 channels-last": _ms_per_batch(step_fn(False, True), batches),
        "our step bf16 channels-last": _ms_per_batch(step_fn(True, True), batches),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn-small")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.data_dir:
        raw = load_raw("cifar10", args.data_dir)
    else:
        raw = make_synthetic(train_per_class=args.images // 10 + 1, test_per_class=1)
    bundle = build_bundle(
        raw,
        val_per_class=0,
        split_seed=0,
        train_subset=args.images,
        stats_subset=10,
        heldout_subset=None,
        device=device,
    )
    images = bundle.train.images.cpu().numpy()
    labels = bundle.train.labels.cpu().numpy()
    auto = resolve_amp("auto", device)
    print(
        f"machine: {cpu_name()}, {torch.get_num_threads()} threads, device {device}, torch {torch.__version__}, "
        f"arch {args.arch}, {len(images)} images, batch 128"
    )
    print(f"run.amp=auto chooses {precision_name(auto)} here (native bf16: {bf16_is_native(device)})")
    for adversarial in (False, True):
        kind = f"AT (PGD-{args.pgd_steps})" if adversarial else "ST"
        bf16 = ours(args.arch, bundle, adversarial, args.pgd_steps, True, True, device)
        fp32 = ours(args.arch, bundle, adversarial, args.pgd_steps, False, True, device)
        ref = reference(args.arch, images, labels, adversarial, args.pgd_steps, device, None)
        chosen = bf16 if auto else fp32
        print(
            f"{kind:12s} ours bf16: {bf16:8.1f} img/s | ours fp32: {fp32:8.1f} img/s | "
            f"reference DataLoader+PIL fp32: {ref:8.1f} img/s"
        )
        print(
            f"{'':12s} auto ({precision_name(auto)}) = {chosen / max(bf16, fp32):5.2f}x the faster precision | "
            f"bf16/fp32 {bf16 / fp32:5.2f}x | auto/reference {chosen / ref:5.2f}x"
        )
        parts = breakdown(args.arch, images, labels, adversarial, args.pgd_steps, device)
        ref_total = parts["reference data"] + parts["reference step fp32 NCHW"]
        print(f"{'':12s} where a batch of 128 goes (ms, each part alone; reference total {ref_total:.1f}):")
        for name, ms in parts.items():
            share = f"{ms / ref_total:5.1%} of the reference batch"
            print(f"{'':14s}{name:30s} {ms:8.1f} ms  {share}")
        for label, step in (("fp32 NCHW", "our step fp32 NCHW"), ("fp32 channels-last", "our step fp32 channels-last")):
            print(f"{'':14s}reference / ours ({label}): {ref_total / (parts['our augmentation'] + parts[step]):5.2f}x")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
