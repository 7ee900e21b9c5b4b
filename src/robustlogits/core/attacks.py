"""Adversarial accuracy as the paper defines it (section 3), with per-example records.

"Adversarial accuracy" is APGD-CE on the test points, then untargeted APGD-DLR on the
points that survived: the first two attacks of the original AutoAttack, Linf, 1 restart.
The attacks come from the AutoAttack package (see :mod:`robustlogits.core.autoattack_adapter`);
this module drives the cascade batch by batch so it can keep, for every example, its clean
and adversarial logits and which attack broke it, which the library's one-shot call does not
return. With the same batch size the cascade is the library's own (the library re-seeds every
batch), and the tests check that the robust points are identical.

``suite='standard'`` runs the library's full standard AutoAttack instead (APGD-CE, APGD-T,
FAB-T, Square with the library's own settings), for comparison.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from robustlogits.core import autoattack_adapter as aa_adapter
from robustlogits.core.device import resolve_device
from robustlogits.core.errors import UserError

__all__ = [
    "AttackBoundsError",
    "AttackResult",
    "SUITES",
    "check_bounds",
    "evaluate_robustness",
]

log = logging.getLogger("robustlogits.core.attacks")

SUITES = ("apgd-ce-dlr", "standard")
# AutoAttack's own default: on CPU the batch size barely changes throughput, and matching
# it keeps batches (and thus the per-batch random starts) the same as the library's.
DEFAULT_CPU_BATCH_SIZE = 250
# Largest batch tried on CUDA before halving; beyond this APGD gains nothing on one GPU.
MAX_CUDA_BATCH_SIZE = 2048
BOUNDS_TOLERANCE = 1e-6


class AttackBoundsError(RuntimeError):
    """An attack returned points outside the eps ball or the [0,1] image box."""


# ---------------------------------------------------------------------------------------
# result


@dataclass
class AttackResult:
    """Metrics plus one row per example; arrays are aligned and in input order."""

    natural_accuracy: float
    accuracy_after_apgd_ce: float
    adversarial_accuracy: float
    n_examples: int
    seconds: float
    warnings: list[str]
    index: np.ndarray  # int64 [N]: test-set index of each example
    label: np.ndarray  # int64 [N]
    clean_logits: np.ndarray  # float32 [N, C]
    adv_logits: np.ndarray  # float32 [N, C]; equals clean_logits where no attack succeeded
    robust: np.ndarray  # bool [N]
    broken_by: np.ndarray  # str [N]: 'clean', an attack name, or '' if robust
    accuracy_after: dict[str, float] = field(default_factory=dict)  # 'clean' then each attack
    config: dict[str, Any] = field(default_factory=dict)
    adv_images: torch.Tensor | None = None  # float32 [N, ...] when keep_adversarial=True

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics; names are safe as MLflow metric keys."""
        out = {
            "natural_accuracy": float(self.natural_accuracy),
            "accuracy_after_apgd_ce": float(self.accuracy_after_apgd_ce),
            "adversarial_accuracy": float(self.adversarial_accuracy),
            "n_examples": float(self.n_examples),
            "seconds": float(self.seconds),
            "examples_per_second": float(self.n_examples / self.seconds) if self.seconds > 0 else float("nan"),
            "n_warnings": float(len(self.warnings)),
        }
        for name, acc in self.accuracy_after.items():
            if name != "clean":
                out["accuracy_after_" + name.replace("-", "_")] = float(acc)
        return out

    def params(self) -> dict[str, str]:
        """The settings the attack actually ran with, as strings (MLflow params)."""
        return {k: str(v) for k, v in self.config.items()}

    def per_example_table(self) -> dict[str, np.ndarray]:
        """Columns for one row per example; logits are split into one column per class."""
        cols: dict[str, np.ndarray] = {
            "index": self.index,
            "label": self.label,
            "clean_pred": self.clean_logits.argmax(1),
            "adv_pred": self.adv_logits.argmax(1),
            "robust": self.robust,
            "broken_by": self.broken_by,
        }
        for k in range(self.clean_logits.shape[1]):
            cols[f"clean_logit_{k}"] = self.clean_logits[:, k]
        for k in range(self.adv_logits.shape[1]):
            cols[f"adv_logit_{k}"] = self.adv_logits[:, k]
        return cols

    def save(self, directory: str | Path, stem: str = "attack") -> list[Path]:
        """Write ``<stem>_per_example.csv`` (for people) and ``<stem>_result.npz`` (exact, loadable).

        Returns the written paths so the caller can log them as artifacts.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        csv_path = directory / f"{stem}_per_example.csv"
        npz_path = directory / f"{stem}_result.npz"
        cols = self.per_example_table()
        names = list(cols)
        with csv_path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            for i in range(self.n_examples):
                writer.writerow([_csv_cell(cols[n][i]) for n in names])
        meta = {
            "metrics": self.metrics(),
            "accuracy_after": self.accuracy_after,
            "config": self.config,
            "warnings": self.warnings,
            "natural_accuracy": self.natural_accuracy,
            "accuracy_after_apgd_ce": self.accuracy_after_apgd_ce,
            "adversarial_accuracy": self.adversarial_accuracy,
            "n_examples": self.n_examples,
            "seconds": self.seconds,
        }
        np.savez_compressed(
            npz_path,
            index=self.index,
            label=self.label,
            clean_logits=self.clean_logits,
            adv_logits=self.adv_logits,
            robust=self.robust,
            broken_by=self.broken_by.astype(str),
            meta=np.array(json.dumps(meta, default=str)),
        )
        return [csv_path, npz_path]

    @classmethod
    def load(cls, npz_path: str | Path) -> AttackResult:
        """Read back what :meth:`save` wrote (without adversarial images)."""
        with np.load(npz_path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            return cls(
                natural_accuracy=meta["natural_accuracy"],
                accuracy_after_apgd_ce=meta["accuracy_after_apgd_ce"],
                adversarial_accuracy=meta["adversarial_accuracy"],
                n_examples=meta["n_examples"],
                seconds=meta["seconds"],
                warnings=list(meta["warnings"]),
                index=z["index"],
                label=z["label"],
                clean_logits=z["clean_logits"],
                adv_logits=z["adv_logits"],
                robust=z["robust"],
                broken_by=z["broken_by"],
                accuracy_after=dict(meta["accuracy_after"]),
                config=dict(meta["config"]),
            )


def _csv_cell(v: Any) -> Any:
    if isinstance(v, (np.floating, float)):
        return repr(float(v))  # shortest round-trip text
    if isinstance(v, (np.bool_, bool)):
        return int(v)
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------------------------
# helpers


def check_bounds(x_adv: torch.Tensor, x: torch.Tensor, eps: float, tol: float = BOUNDS_TOLERANCE) -> None:
    """Raise unless every point is finite, in [0,1] and within eps of its clean point (Linf)."""
    if x_adv.shape != x.shape:
        raise AttackBoundsError(f"adversarial batch has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if x.shape[0] == 0:
        return
    x_adv = x_adv.detach().float()
    x = x.detach().float().to(x_adv.device)
    if not torch.isfinite(x_adv).all():
        raise AttackBoundsError(f"{int((~torch.isfinite(x_adv)).sum())} non-finite values in adversarial images")
    lo, hi = float(x_adv.min()), float(x_adv.max())
    if lo < -tol or hi > 1 + tol:
        raise AttackBoundsError(f"adversarial images leave [0,1]: min {lo:.8f}, max {hi:.8f}")
    dist = (x_adv - x).abs().reshape(x.shape[0], -1).amax(1)
    worst = float(dist.max())
    if worst > eps + tol:
        n_out = int((dist > eps + tol).sum())
        raise AttackBoundsError(
            f"{n_out} adversarial images outside the Linf ball: max |delta| {worst:.8f} > eps {eps:.8f}"
        )


def _as_images(images: Any) -> torch.Tensor:
    """uint8 in [0,255] or float in [0,1] -> float32 in [0,1] on CPU."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor):
        raise UserError(f"images must be a torch.Tensor or numpy array, got {type(images).__name__}")
    if images.ndim < 2:
        raise UserError(f"images must be [N, ...] (NCHW), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise UserError("no images to attack")
    if images.dtype == torch.uint8:
        return images.detach().cpu().float().div_(255.0)
    if not images.is_floating_point():
        raise UserError(f"images must be uint8 or floating point, got {images.dtype}")
    x = images.detach().cpu().float()
    if not torch.isfinite(x).all():
        raise UserError("images contain NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(
            f"float images must be in [0,1] pixel space (models normalise inside); got range [{lo:.4g}, {hi:.4g}]"
        )
    return x.contiguous()


def _as_labels(labels: Any, n: int) -> torch.Tensor:
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    labels = labels.detach().cpu()
    if labels.ndim != 1 or labels.shape[0] != n:
        raise UserError(f"labels must be a vector of {n} class ids, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UserError(f"labels must be integer class ids, got {labels.dtype}")
    labels = labels.long()
    if int(labels.min()) < 0:
        raise UserError("labels contain negative class ids")
    return labels


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom_type and isinstance(exc, oom_type)) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


class _Logits:
    """What the attacks call: the model, fp32 logits, and always a graph back to the input.

    A model whose output ignores its input would otherwise make ``autograd.grad`` fail; a
    zero-weight term keeps it attackable, with zero gradients that the library flags.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"model must return logits [B, C] for a batch of {x.shape[0]}, got {shape}")
        if out.dtype != torch.float32:
            out = out.float()
        if x.requires_grad and not out.requires_grad:
            out = out + 0.0 * x.reshape(x.shape[0], -1).sum(1, keepdim=True)
        return out


@contextlib.contextmanager
def _attack_mode(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, fp32 channels-last weights on ``device``, no weight grads; all put back exactly afterwards.

    Original tensors are kept (not cast back) so a float64 or bf16 model round-trips bit-exactly;
    per-module train flags are kept so mixed train/eval submodules survive. Channels-last conv
    weights are a layout only: on a 2-core AMD EPYC an fp32 input-gradient step runs about 1.3x
    faster with them, for `vgg-fast` and `vgg-fast-s` (`benchmarks/bench_attack_layout.py`).
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = []
    for m in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(m, kind).items():
                if t is not None:
                    saved.append((m, kind, name, t.data if kind == "_parameters" else t, t.requires_grad))
    try:
        model.eval()
        # casts floating tensors only; the layout applies to 4-d (conv) weights only
        model.to(device=device, dtype=torch.float32, memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for m, kind, name, original, requires_grad in saved:
            table = getattr(m, kind)
            current = table[name] if name in table else None  # a ScriptModule's table has no .get
            if current is None:
                continue
            if kind == "_parameters":
                if current.data is not original:
                    current.data = original
                current.requires_grad_(requires_grad)
            elif current is not original:
                table[name] = original
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _strict_fp32(device: torch.device) -> Iterator[None]:
    """No autocast and no TF32, so 'fp32' means fp32 on Ampere+ GPUs too."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pick_batch_size(fmodel: _Logits, x: torch.Tensor, device: torch.device) -> int:
    """Largest power-of-two batch (<= N) whose forward+input-gradient fits on the GPU."""
    n = x.shape[0]
    if device.type != "cuda":
        return min(DEFAULT_CPU_BATCH_SIZE, n)
    bs = min(n, MAX_CUDA_BATCH_SIZE)
    while True:
        try:
            xb = x[:bs].to(device).requires_grad_(True)
            loss = fmodel(xb).logsumexp(1).sum()
            torch.autograd.grad(loss, [xb])
            del xb, loss
            torch.cuda.synchronize(device)
            # APGD adds only ~10 input-sized tensors to this; a stage that still runs out of
            # memory restarts at half the size (see _run_stage).
            return bs
        except Exception as exc:  # noqa: BLE001 - only OOM is handled
            if not _is_oom(exc) or bs == 1:
                raise
            bs //= 2
            torch.cuda.empty_cache()


@torch.no_grad()
def _logits(fmodel: _Logits, x: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    out = [fmodel(x[i : i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out)


def _progress(total: int, desc: str, enabled: bool | None):
    from robustlogits.core.progress import Progress

    return Progress(total, desc, "ex", enabled)


# ---------------------------------------------------------------------------------------
# main entry point


def evaluate_robustness(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: np.ndarray | None = None,
    eps: float = 8 / 255,
    n_iter: int = 100,
    n_restarts: int = 1,
    seed: int = 0,
    suite: str = "apgd-ce-dlr",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = True,
    *,
    n_classes: int | None = None,
    keep_adversarial: bool = False,
) -> AttackResult:
    """Attack ``model`` on ``images`` and report accuracies plus one record per example.

    ``suite='apgd-ce-dlr'``: APGD-CE then untargeted APGD-DLR on the survivors (Linf, ``eps``,
    ``n_iter`` iterations, ``n_restarts`` restarts, ``seed``). ``suite='standard'``: the
    library's standard AutoAttack; ``n_iter``/``n_restarts`` are then the library's own.
    ``n_classes`` (the dataset's class count) guards against a model for another dataset.
    ``batch_size=None`` picks one: 250 on CPU, the largest that fits on CUDA. Results depend
    on the batch size because the library seeds each batch's random start identically.
    """
    # ---- validate before any work -----------------------------------------------------
    if suite not in SUITES:
        raise UserError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps):
        raise UserError(f"eps must be a finite number, got {eps!r}")
    if eps < 0:
        raise UserError(f"eps must be >= 0, got {eps}")
    if eps > 1:
        raise UserError(f"eps is in [0,1] pixel units (8/255 = {8 / 255:.5f}); got {eps}")
    if int(n_iter) != n_iter or n_iter < 1:
        raise UserError(f"n_iter must be a positive integer, got {n_iter}")
    if int(n_restarts) != n_restarts or n_restarts < 1:
        raise UserError(f"n_restarts must be a positive integer, got {n_restarts}")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise UserError(f"batch_size must be a positive integer, got {batch_size}")
    if n_classes is not None and n_classes < 2:
        raise UserError(f"n_classes must be at least 2, got {n_classes}")
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = _as_images(images)
    n = x.shape[0]
    y = _as_labels(labels, n)
    if indices is None:
        index = np.arange(n, dtype=np.int64)
    else:
        index = np.asarray(indices).reshape(-1)
        if index.shape[0] != n:
            raise UserError(f"indices has {index.shape[0]} entries for {n} images")
        index = index.astype(np.int64)
    dev = resolve_device(device)
    backend = aa_adapter.load_backend()  # fails early, with an install hint
    collector = aa_adapter.WarningCollector().watch_package(backend)
    eps = float(eps)

    try:
        result = _evaluate(
            model,
            x,
            y,
            index,
            eps,
            int(n_iter),
            int(n_restarts),
            seed,
            suite,
            batch_size,
            dev,
            progress,
            n_classes,
            keep_adversarial,
            backend,
            collector,
        )
    except BaseException:
        # a library warning may explain the failure; never let it replace the error itself
        with contextlib.suppress(Exception):
            collector.emit(stacklevel=2)
        raise
    collector.emit(stacklevel=2)
    return result


def _evaluate(
    model,
    x,
    y,
    index,
    eps,
    n_iter,
    n_restarts,
    seed,
    suite,
    batch_size,
    dev,
    progress,
    n_classes,
    keep_adversarial,
    backend,
    collector,
) -> AttackResult:
    n = x.shape[0]
    t0 = time.perf_counter()
    rng_devices = [dev.index] if dev.type == "cuda" else []
    with _attack_mode(model, dev), _strict_fp32(dev), torch.random.fork_rng(devices=rng_devices):
        fmodel = _Logits(model)
        bs = int(batch_size) if batch_size is not None else _pick_batch_size(fmodel, x, dev)

        # ---- clean pass and class-count checks ------------------------------------------
        clean = _logits(fmodel, x, dev, bs)
        n_cls = clean.shape[1]
        if n_classes is not None and n_cls != n_classes:
            raise UserError(f"model outputs {n_cls} logits but the dataset has {n_classes} classes")
        if int(y.max()) >= n_cls:
            raise UserError(f"labels go up to {int(y.max())} but the model outputs only {n_cls} logits")
        min_cls = 3 if suite == "apgd-ce-dlr" else 4
        if n_cls < min_cls:
            raise UserError(f"suite {suite!r} needs at least {min_cls} classes (DLR loss); model has {n_cls}")
        correct = clean.argmax(1) == y

        # ---- the attacks -----------------------------------------------------------------
        if suite == "apgd-ce-dlr":
            attacks = ["apgd-ce", "apgd-dlr"]
            aa_adapter.run_model_checks(fmodel, x[:bs].to(dev), y[:bs].to(dev), attacks=attacks, collector=collector)
            apgd = {
                name: aa_adapter.make_apgd(
                    fmodel,
                    loss=name.split("-")[1],
                    eps=eps,
                    n_iter=n_iter,
                    n_restarts=n_restarts,
                    seed=seed,
                    device=dev,
                    collector=collector,
                )
                for name in attacks
            }
            run_fns: dict[str, Callable] = {name: (lambda xb, yb, _a=a: _a.perturb(xb, yb)) for name, a in apgd.items()}
            used_iter, used_restarts = n_iter, n_restarts
            final_checks = None
        else:
            std = aa_adapter.make_standard_autoattack(
                fmodel, eps=eps, seed=seed, device=dev, n_classes=n_cls, collector=collector
            )
            attacks = list(std.attacks)
            run_fns = {name: (lambda xb, yb, _n=name: std.run(_n, xb, yb, batch_size=xb.shape[0])) for name in attacks}
            used_iter, used_restarts = int(std.aa.apgd.n_iter), int(std.aa.apgd.n_restarts)
            final_checks = std.final_checks

        robust = correct.clone()
        broken_by = np.where(correct.numpy(), "", "clean").astype(object)
        adv_logits = clean.clone()
        adv_images = x.clone() if keep_adversarial else None
        accuracy_after = {"clean": float(correct.double().mean())}
        for name in attacks:
            todo = torch.nonzero(robust).reshape(-1)
            if todo.numel() > 0:
                bs, broken, logits, advs = _run_stage(
                    name, run_fns[name], fmodel, x, y, todo, bs, dev, eps, progress, keep_adversarial
                )
                robust[broken] = False
                broken_by[broken.numpy()] = name
                adv_logits[broken] = logits
                if adv_images is not None:
                    adv_images[broken] = advs
            accuracy_after[name] = float(robust.double().mean())
        if final_checks is not None:
            final_checks(accuracy_after)
    seconds = time.perf_counter() - t0

    clean_np = clean.numpy().astype(np.float32)
    adv_np = adv_logits.numpy().astype(np.float32)
    robust_np = robust.numpy().astype(bool)
    label_np = y.numpy().astype(np.int64)
    if not np.array_equal(robust_np, adv_np.argmax(1) == label_np):
        raise RuntimeError("internal: robust flags disagree with the adversarial logits")

    config = {
        "suite": suite,
        "attacks": ",".join(attacks),
        "norm": "Linf",
        "eps": eps,
        "n_iter": used_iter,
        "n_restarts": used_restarts,
        "seed": seed,
        "batch_size": bs,
        "device": str(dev),
        "backend": backend.label,
        "n_classes": n_cls,
        "torch": torch.__version__,
        "host": platform.node(),
    }
    return AttackResult(
        natural_accuracy=accuracy_after["clean"],
        accuracy_after_apgd_ce=accuracy_after["apgd-ce"],
        adversarial_accuracy=float(robust_np.mean()),
        n_examples=n,
        seconds=seconds,
        warnings=collector.messages,
        index=index,
        label=label_np,
        clean_logits=clean_np,
        adv_logits=adv_np,
        robust=robust_np,
        broken_by=broken_by.astype(str),
        accuracy_after=accuracy_after,
        config=config,
        adv_images=adv_images,
    )


def _run_stage(
    name: str,
    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    fmodel: _Logits,
    x: torch.Tensor,
    y: torch.Tensor,
    todo: torch.Tensor,
    bs: int,
    device: torch.device,
    eps: float,
    progress: bool | None,
    keep_adversarial: bool,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One attack over the still-robust points, in consecutive batches like the library.

    On CUDA OOM the whole stage restarts with half the batch size, so the final result is
    what a run with that batch size from the start would give.
    Returns (batch size used, broken positions, their adversarial logits, their images).
    """
    while True:
        try:
            broken, logits, advs = [], [], []
            with _progress(todo.numel(), name, progress) as bar:
                for start in range(0, todo.numel(), bs):
                    idx = todo[start : start + bs]
                    xb, yb = x[idx].to(device), y[idx].to(device)
                    adv = attack(xb, yb).detach()
                    check_bounds(adv, xb, eps)
                    with torch.no_grad():
                        out = fmodel(adv).cpu()
                    hit = (out.argmax(1) != yb.cpu()).nonzero().reshape(-1)
                    broken.append(idx[hit])
                    logits.append(out[hit])
                    if keep_adversarial:
                        advs.append(adv[hit].cpu())
                    bar.update(idx.numel())
            return bs, torch.cat(broken), torch.cat(logits), (torch.cat(advs) if keep_adversarial else None)
        except Exception as exc:  # noqa: BLE001 - only OOM is retried
            if device.type != "cuda" or not _is_oom(exc) or bs == 1:
                raise
            bs = max(1, bs // 2)
            log.warning("%s: CUDA out of memory, restarting the stage with batch size %d", name, bs)
            torch.cuda.empty_cache()


def check_n_examples(n_examples: int | None, test) -> None:
    """Called before a run exists, so an impossible request fails without leaving anything behind."""
    if n_examples is not None and n_examples > len(test):
        raise UserError(f"n-examples {n_examples} is larger than the test split ({len(test)} images)")


def attack_split(
    model: torch.nn.Module,
    test,
    num_classes: int,
    *,
    n_examples: int | None = None,
    eps: float = 8 / 255,
    n_iter: int = 100,
    n_restarts: int = 1,
    seed: int = 0,
    suite: str = "apgd-ce-dlr",
    batch_size: int | None = None,
    device=None,
    progress: bool | None = None,
) -> AttackResult:
    """Attack a stratified, seeded subset (or all) of a test `Split`: the attack job's and a
    distillation's final attack are the same call."""
    from robustlogits.core.data import stratified_indices

    check_n_examples(n_examples, test)
    if n_examples is not None:
        test = test.subset(stratified_indices(test.labels.cpu().numpy(), n_examples, seed))
    return evaluate_robustness(
        model,
        test.images,
        test.labels,
        indices=test.indices,
        eps=eps,
        n_iter=n_iter,
        n_restarts=n_restarts,
        seed=seed,
        suite=suite,
        batch_size=batch_size,
        device=device,
        progress=progress,
        n_classes=num_classes,
    )
