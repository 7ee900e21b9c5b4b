"""The one place that imports AutoAttack.

Two packages ship the same attacks with different call conventions: the official
``autoattack`` (github fra31/auto-attack, positional ``bs=``, ``attacks_to_run=``, warnings
through ``logger.log('Warning: ...')``) and the registry repackaging ``pyautoattack``
(keyword-only ``batch_size=``, ``attacks=``, warnings through a ``logging.Logger``).
Everything else in the project talks to the small interface below, so it never needs to
know which one is installed.

The library's checks that hint at gradient masking or a misused model (zero gradients,
randomised or dynamic defence, probabilities instead of logits, too few classes, Square
beating the white-box attacks) are collected by a :class:`WarningCollector` instead of
being printed or dropped, so the caller can return them and log them as a run artifact.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import logging
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = [
    "AutoAttackUnavailable",
    "AutoAttackWarning",
    "Backend",
    "WarningCollector",
    "APGD",
    "StandardAutoAttack",
    "load_backend",
    "make_apgd",
    "make_standard_autoattack",
    "run_model_checks",
    "run_standard_autoattack",
    "STANDARD_ATTACKS",
]

log = logging.getLogger("robustlogits.autoattack")

# Tried in this order: the reference implementation wins when both are installed.
_CANDIDATES = ("autoattack", "pyautoattack")

INSTALL_HINT = (
    "AutoAttack is not installed. Install the registry package with "
    "`pip install pyautoattack`, or the official one with "
    "`pip install git+https://github.com/fra31/auto-attack`."
)

# Order used by AutoAttack's version='standard' for Linf/L2.
STANDARD_ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")


class AutoAttackUnavailable(ImportError):
    """Neither AutoAttack package can be imported; the message says how to install one."""


class AutoAttackWarning(UserWarning):
    """A warning raised by AutoAttack's own checks (possible gradient masking etc.)."""


@dataclass(frozen=True)
class Backend:
    """Handles on the installed AutoAttack package, whichever one it is."""

    name: str  # import name: 'autoattack' or 'pyautoattack'
    version: str
    package: ModuleType
    AutoAttack: type
    APGDAttack: type
    checks: ModuleType

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.package.__file__))


@functools.cache
def load_backend() -> Backend:
    """Import the first AutoAttack package that works; cached because imports are slow."""
    errors = []
    for name in _CANDIDATES:
        try:
            package = importlib.import_module(name)
            front = importlib.import_module(f"{name}.autoattack")
            apgd = importlib.import_module(f"{name}.autopgd_base")
            checks = importlib.import_module(f"{name}.checks")
            front_cls, apgd_cls = front.AutoAttack, apgd.APGDAttack
        except (ImportError, AttributeError) as exc:  # missing, broken, or an unrelated package
            errors.append(f"{name}: {exc}")
            continue
        version = getattr(package, "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(name)
            except Exception:
                version = "unknown"
        backend = Backend(
            name=name,
            version=str(version),
            package=package,
            AutoAttack=front_cls,
            APGDAttack=apgd_cls,
            checks=checks,
        )
        log.debug("using AutoAttack backend %s", backend.label)
        return backend
    raise AutoAttackUnavailable(INSTALL_HINT + " (tried: " + "; ".join(errors) + ")")


# The packages' checks point to a `flags_doc.md` that ships in neither wheel: name where it lives.
FLAGS_DOC_URL = "https://github.com/fra31/auto-attack/blob/master/flags_doc.md"
FLAGS_DOC_REFERENCE = re.compile(r"See \S*flags_doc\.md")


class WarningCollector:
    """Stands in for the library's logger and records its warnings, in order, once each.

    It quacks like both loggers the two packages use: ``log(str)`` (official, warnings are
    prefixed 'Warning:') and ``debug/info/warning/error`` (``logging.Logger``, pyautoattack).
    Warnings raised with ``warnings.warn`` from inside the package (when a check gets no
    logger) are caught by :meth:`capture`; warnings from anywhere else pass through.
    """

    def __init__(self, source: str = "autoattack"):
        self.source = source
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._package_dirs: tuple[str, ...] = ()

    # -- recording -------------------------------------------------------------
    def add(self, message: str) -> None:
        message = FLAGS_DOC_REFERENCE.sub(f"See {FLAGS_DOC_URL}", " ".join(str(message).split()))
        if not message:
            return
        if message not in self._counts:
            # shown once, by emit() when the run is done (a second, earlier copy only confused users)
            log.debug("%s: %s", self.source, message)
            self._counts[message] = 0
        self._counts[message] += 1

    @property
    def messages(self) -> list[str]:
        """Unique warnings, first-seen order, with a repeat count when seen more than once."""
        return [f"{self.source}: {m}" + (f" (x{n})" if n > 1 else "") for m, n in self._counts.items()]

    def emit(self, stacklevel: int = 2) -> None:
        """Re-raise every collected warning as an :class:`AutoAttackWarning`."""
        for message in self.messages:
            warnings.warn(message, AutoAttackWarning, stacklevel=stacklevel + 1)

    # -- logger protocol of the official package ------------------------------------
    def log(self, message: str) -> None:
        text = str(message)
        if text.lstrip().lower().startswith("warning:"):
            self.add(text.split(":", 1)[1])
        else:
            log.debug("%s: %s", self.source, text)

    # -- logging.Logger protocol of pyautoattack -------------------------------------
    @staticmethod
    def _fmt(msg: Any, args: tuple) -> str:
        return str(msg) % args if args else str(msg)

    def debug(self, msg: Any, *args: Any, **_: Any) -> None:
        log.debug("%s: %s", self.source, self._fmt(msg, args))

    info = debug

    def warning(self, msg: Any, *args: Any, **_: Any) -> None:
        self.add(self._fmt(msg, args))

    warn = warning
    error = warning
    critical = warning

    # -- python warnings raised from inside the package -------------------------------
    def watch_package(self, backend: Backend) -> WarningCollector:
        self._package_dirs = (backend.directory,)
        self.source = backend.name
        return self

    @contextlib.contextmanager
    def capture(self) -> Iterator[WarningCollector]:
        """Record package warnings raised by ``warnings.warn``; re-raise all others unchanged."""
        caught: list = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                yield self
        finally:  # also on error: a warning may explain the failure
            for w in caught:
                filename = os.path.abspath(w.filename or "")
                if self._package_dirs and filename.startswith(self._package_dirs):
                    self.add(str(w.message))
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _kwargs_accepted(fn: Callable, kwargs: dict) -> dict:
    """Drop keyword arguments an older release of the package does not know."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _new_apgd(backend: Backend, model, *, loss, eps, n_iter, n_restarts, seed, device, logger):
    kwargs = dict(
        n_iter=n_iter,
        norm="Linf",
        n_restarts=n_restarts,
        eps=float(eps),
        seed=seed,
        loss=loss,
        eot_iter=1,
        rho=0.75,
        verbose=False,
        device=device,
        logger=logger,
    )
    return backend.APGDAttack(model, **_kwargs_accepted(backend.APGDAttack.__init__, kwargs))


@dataclass
class APGD:
    """One configured untargeted Linf APGD attack from the library."""

    attack: Any
    loss: str
    collector: WarningCollector

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adversarial points for the batch; points it could not break come back unchanged.

        The library re-seeds torch's global RNG with the attack's seed on every call, so a
        batch's result depends only on its content and the seed, not on earlier batches.
        Runs under ``no_grad`` as ``run_standard_evaluation`` does: the attack enables grad
        only around the model call, and outside it its bookkeeping on the iterate would
        otherwise be recorded by autograd (about 10-20% slower on a small CNN).
        """
        self.attack.loss = self.loss
        with self.collector.capture(), torch.no_grad():
            return self.attack.perturb(x, y)


def make_apgd(
    model: torch.nn.Module,
    *,
    loss: str,
    eps: float,
    n_iter: int = 100,
    n_restarts: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    collector: WarningCollector | None = None,
) -> APGD:
    """Build APGD-CE or untargeted APGD-DLR with AutoAttack's settings (rho=.75, 1 EOT step).

    A fresh object per (loss, n_iter) is needed because the library derives its step-size
    checkpoints from ``n_iter`` in the constructor; changing ``n_iter`` later would keep the
    100-iteration schedule.
    """
    if loss not in ("ce", "dlr"):
        raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
    backend = load_backend()
    collector = (collector or WarningCollector()).watch_package(backend)
    attack = _new_apgd(
        backend,
        model,
        loss=loss,
        eps=eps,
        n_iter=n_iter,
        n_restarts=n_restarts,
        seed=seed,
        device=device,
        logger=collector,
    )
    return APGD(attack=attack, loss=loss, collector=collector)


def run_model_checks(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: Sequence[str] = ("apgd-ce", "apgd-dlr"),
    collector: WarningCollector | None = None,
    n_target_classes: int = 9,
) -> int:
    """Run the checks AutoAttack runs before attacking, on one batch; returns the class count.

    These are what ``run_standard_evaluation`` does first; calling them here keeps them
    when the attacks themselves are driven batch by batch.
    """
    backend = load_backend()
    collector = (collector or WarningCollector()).watch_package(backend)
    checks = backend.checks
    with collector.capture():
        checks.check_randomized(model, x, y, bs=x.shape[0], logger=collector)
        n_cls = checks.check_range_output(model, x, logger=collector)
        checks.check_dynamic(model, x, False, logger=collector)
        checks.check_n_classes(n_cls, list(attacks), n_target_classes, n_target_classes, logger=collector)
    return int(n_cls)


def _new_autoattack(backend: Backend, model, *, eps, seed, device, attacks, collector):
    """Construct the library's AutoAttack; ``attacks=None`` means version='standard'."""
    init = backend.AutoAttack.__init__
    params = inspect.signature(init).parameters
    kwargs: dict[str, Any] = dict(norm="Linf", eps=float(eps), seed=seed, device=device)
    if attacks is None:
        kwargs["version"] = "standard"
    else:
        kwargs["version"] = "custom"
        key = "attacks_to_run" if "attacks_to_run" in params else "attacks"
        kwargs[key] = list(attacks)
    if "verbose" in params:
        kwargs["verbose"] = False
    aa = backend.AutoAttack(model, **_kwargs_accepted(init, kwargs))
    # Its progress lines are debug noise (the official one print()s them); checks still log.
    aa.verbose = False
    aa.logger = collector
    for name in ("apgd", "apgd_targeted"):
        sub = getattr(aa, name, None)
        if sub is not None and hasattr(sub, "logger"):
            sub.logger = collector
    return aa


def _call_run_standard_evaluation(aa, x, y, batch_size):
    run = aa.run_standard_evaluation
    params = inspect.signature(run).parameters
    key = "bs" if "bs" in params else "batch_size"
    kwargs = {key: int(batch_size)}
    if "return_labels" in params:
        kwargs["return_labels"] = False
    out = run(x, y, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class StandardAutoAttack:
    """The library's standard AutoAttack, run one attack at a time.

    Calling ``run_standard_evaluation`` with a single attack on the points still robust is
    exactly the library's own cascade (same seed per batch, same batch split), but it tells
    us which attack broke each point, which the one-shot call does not.
    """

    def __init__(self, aa: Any, backend: Backend, collector: WarningCollector):
        self.aa = aa
        self.backend = backend
        self.collector = collector
        self.attacks: list[str] = list(aa.attacks_to_run)

    def run(self, attack: str, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        if attack not in self.attacks:
            raise ValueError(f"unknown attack {attack!r}; have {self.attacks}")
        self.aa.attacks_to_run = [attack]
        try:
            with self.collector.capture():
                return _call_run_standard_evaluation(self.aa, x, y, batch_size)
        finally:
            self.aa.attacks_to_run = list(self.attacks)

    def final_checks(self, accuracy: dict[str, float]) -> None:
        """The library's end-of-run check that Square did not beat the white-box attacks."""
        with self.collector.capture():
            self.backend.checks.check_square_sr(dict(accuracy), logger=self.collector)


def make_standard_autoattack(
    model: torch.nn.Module,
    *,
    eps: float,
    seed: int = 0,
    device: torch.device | str = "cpu",
    n_classes: int | None = None,
    collector: WarningCollector | None = None,
) -> StandardAutoAttack:
    """AutoAttack ``version='standard'`` (APGD-CE, APGD-T, FAB-T, Square), Linf.

    With fewer than 10 classes the standard 9 target classes do not exist and the library
    would index out of range; the targets are then capped at ``n_classes - 1`` and a warning
    records the deviation.
    """
    backend = load_backend()
    collector = (collector or WarningCollector()).watch_package(backend)
    aa = _new_autoattack(backend, model, eps=eps, seed=seed, device=device, attacks=None, collector=collector)
    if n_classes is not None:
        for name in ("apgd_targeted", "fab"):
            sub = getattr(aa, name)
            if sub.n_target_classes > n_classes - 1:
                collector.add(
                    f"{name}: {n_classes} classes, so target classes capped at {n_classes - 1} "
                    f"instead of {sub.n_target_classes} (deviation from the standard version)"
                )
                sub.n_target_classes = n_classes - 1
    return StandardAutoAttack(aa, backend, collector)


def run_standard_autoattack(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    device: torch.device | str = "cpu",
    seed: int = 0,
    batch_size: int = 250,
    attacks: Sequence[str] | None = None,
    n_iter: int | None = None,
    n_restarts: int | None = None,
    collector: WarningCollector | None = None,
) -> torch.Tensor:
    """One plain ``run_standard_evaluation`` call: the library as its authors run it.

    ``attacks=None`` is version='standard'; a list is version='custom' with the library's
    own defaults (5 APGD restarts) unless ``n_iter``/``n_restarts`` are given. Used as the
    reference point in tests and the benchmark; it gives no per-attack attribution.
    """
    backend = load_backend()
    collector = (collector or WarningCollector()).watch_package(backend)
    aa = _new_autoattack(backend, model, eps=eps, seed=seed, device=device, attacks=attacks, collector=collector)
    if n_iter is not None or n_restarts is not None:
        aa.apgd = _new_apgd(
            backend,
            model,
            loss="ce",
            eps=eps,
            n_iter=aa.apgd.n_iter if n_iter is None else n_iter,
            n_restarts=aa.apgd.n_restarts if n_restarts is None else n_restarts,
            seed=seed,
            device=device,
            logger=collector,
        )
    with collector.capture():
        return _call_run_standard_evaluation(aa, x, y, batch_size)
