"""Tests for robustlogits.core.attacks / autoattack_adapter on tiny models and synthetic data.

Images are 3x8x8 with 10 classes whose means differ slightly, so a linear model is accurate
but breakable at eps=8/255; iterations are cut to 10 to keep the file fast on 2 CPU cores.
"""

from __future__ import annotations

import csv
import logging
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robustlogits.core import autoattack_adapter as adapter
from robustlogits.core.attacks import (
    AttackBoundsError,
    AttackResult,
    check_bounds,
    evaluate_robustness,
)
from robustlogits.core.data import stratified_indices
from robustlogits.core.errors import UserError

N_CLASSES = 10
N = 300
EPS = 8 / 255
FAST = dict(n_iter=10, progress=False)


def make_data(n: int = N, spread: float = 0.04, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    means = 0.5 + spread * torch.randn(N_CLASSES, 3, 8, 8, generator=g)
    y = torch.arange(n) % N_CLASSES
    x = (means[y] + 0.1 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1)
    return x, y


class Linear(nn.Module):
    def __init__(self, n_out: int = N_CLASSES):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, n_out)

    def forward(self, x):
        return self.fc(x.flatten(1))


class IgnoresInput(nn.Module):
    """Same logits for every image; favours the last class."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.arange(N_CLASSES, dtype=torch.float32))

    def forward(self, x):
        return self.bias.expand(x.shape[0], N_CLASSES)


class Probabilities(nn.Module):
    """Returns softmax output instead of logits, which AutoAttack warns about."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x).softmax(1)


def train(model: nn.Module, x, y, steps: int = 100) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors here are tiny: threads only add contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def linear(data):
    x, y = data
    return train(Linear(), x, y)


@pytest.fixture(scope="module")
def result(linear, data):
    x, y = data
    return evaluate_robustness(linear, x, y, eps=EPS, batch_size=64, **FAST)


# ---- accuracies ---------------------------------------------------------------------------


def test_adversarial_accuracy_not_above_natural(result):
    assert result.natural_accuracy > 0.9
    assert result.natural_accuracy >= result.accuracy_after_apgd_ce >= result.adversarial_accuracy
    # the attack has to actually do something on this model, and DLR adds to CE
    assert result.adversarial_accuracy < result.natural_accuracy - 0.1
    assert result.adversarial_accuracy < result.accuracy_after_apgd_ce
    assert result.n_examples == N


@pytest.mark.parametrize("suite", ["apgd-ce-dlr", "standard"])
def test_undefended_model_at_large_eps_drops_to_zero(linear, data, suite):
    x, y = data
    r = evaluate_robustness(linear, x[:100], y[:100], eps=0.25, suite=suite, **FAST)
    assert r.natural_accuracy > 0.9
    assert r.adversarial_accuracy <= 0.02
    expected = (
        {"clean", "apgd-ce", "apgd-dlr", ""} if suite == "apgd-ce-dlr" else {"clean", "", *adapter.STANDARD_ATTACKS}
    )
    assert set(r.broken_by) <= expected
    if suite == "standard":
        assert r.config["attacks"] == ",".join(adapter.STANDARD_ATTACKS)
        assert r.config["n_iter"] == 100  # the library's standard settings, not ours


def test_model_that_ignores_its_input_keeps_its_accuracy(data):
    x, y = data
    with pytest.warns(adapter.AutoAttackWarning, match="zero gradient"):
        r = evaluate_robustness(IgnoresInput(), x, y, eps=0.5, **FAST)
    assert r.natural_accuracy == pytest.approx(0.1)  # always predicts the last class
    assert r.adversarial_accuracy == r.natural_accuracy
    assert np.array_equal(r.robust, r.label == N_CLASSES - 1)
    assert any("zero gradient" in w for w in r.warnings)


def test_probability_output_warning_is_surfaced(linear, data):
    x, y = data
    with pytest.warns(adapter.AutoAttackWarning, match="probability distribution"):
        r = evaluate_robustness(Probabilities(linear), x[:50], y[:50], eps=EPS, **FAST)
    assert any("probability distribution" in w for w in r.warnings)
    assert r.metrics()["n_warnings"] >= 1


def test_same_robust_points_as_library_called_directly(linear, data, result):
    """Our batch-wise cascade is the library's own, given the same batch size."""
    x, y = data
    x_adv = adapter.run_standard_autoattack(
        linear, x, y, eps=EPS, attacks=["apgd-ce", "apgd-dlr"], n_iter=10, n_restarts=1, batch_size=64
    )
    with torch.no_grad():
        robust_lib = (linear(x_adv).argmax(1) == y).numpy()
    assert np.array_equal(result.robust, robust_lib)


# ---- per-example records ----------------------------------------------------------------


def test_per_example_record_agrees_with_metrics(linear, tmp_path):
    x_all, y_all = make_data(n=500, seed=1)
    idx = stratified_indices(np.asarray(y_all), 120, seed=3)
    x, y = x_all[idx], y_all[idx]
    r = evaluate_robustness(linear, x, y, indices=idx, eps=EPS, **FAST)

    assert np.array_equal(r.index, idx)
    assert np.array_equal(r.label, y.numpy())
    assert r.clean_logits.shape == r.adv_logits.shape == (120, N_CLASSES)
    with torch.no_grad():
        np.testing.assert_allclose(r.clean_logits, linear(x).numpy(), rtol=1e-5, atol=1e-5)

    clean_ok = r.clean_logits.argmax(1) == r.label
    assert r.natural_accuracy == pytest.approx(clean_ok.mean())
    assert np.array_equal(r.broken_by == "clean", ~clean_ok)
    assert r.accuracy_after_apgd_ce == pytest.approx(np.isin(r.broken_by, ["", "apgd-dlr"]).mean())
    assert r.adversarial_accuracy == pytest.approx(r.robust.mean())
    assert np.array_equal(r.robust, r.broken_by == "")
    assert np.array_equal(r.robust, r.adv_logits.argmax(1) == r.label)
    # where nothing broke the point, the "adversarial" logits are the clean ones
    np.testing.assert_array_equal(r.adv_logits[r.robust], r.clean_logits[r.robust])

    m = r.metrics()
    for key in ("natural_accuracy", "accuracy_after_apgd_ce", "adversarial_accuracy", "n_examples", "seconds"):
        assert isinstance(m[key], float)
    assert m["accuracy_after_apgd_dlr"] == m["adversarial_accuracy"]
    assert r.seconds > 0

    table = r.per_example_table()
    assert all(len(col) == 120 for col in table.values())
    assert {"index", "label", "robust", "broken_by", "clean_logit_0", "adv_logit_9"} <= set(table)

    csv_path, npz_path = r.save(tmp_path)
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 120
    assert [int(row["index"]) for row in rows] == list(idx)
    assert sum(int(row["robust"]) for row in rows) == int(r.robust.sum())
    assert float(rows[0]["adv_logit_3"]) == float(r.adv_logits[0, 3])
    back = AttackResult.load(npz_path)
    assert back.metrics() == m
    assert np.array_equal(back.broken_by, r.broken_by)
    np.testing.assert_array_equal(back.adv_logits, r.adv_logits)


def test_perturbations_stay_in_bounds_uint8_input(linear, data):
    x, y = data
    x8 = (x * 255).round().to(torch.uint8)
    r = evaluate_robustness(linear, x8, y, eps=EPS, keep_adversarial=True, **FAST)
    clean = x8.float() / 255
    adv = r.adv_images
    assert adv.shape == clean.shape and adv.dtype == torch.float32
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((adv - clean).abs().amax()) <= EPS + 1e-6
    broken = torch.from_numpy(~r.robust & (r.broken_by != "clean"))
    assert broken.any()
    assert torch.equal(adv[~broken], clean[~broken])
    with torch.no_grad():
        np.testing.assert_allclose(linear(adv).numpy(), r.adv_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "make_adv, match",
    [
        (lambda x: x + 2 * EPS * torch.sign(0.5 - x), "outside the Linf ball"),
        (lambda x: x.clone().index_fill_(0, torch.tensor([0]), 1.5), r"leave \[0,1\]"),
        (lambda x: x.clone().index_fill_(0, torch.tensor([1]), float("nan")), "non-finite"),
    ],
)
def test_check_bounds_rejects(make_adv, match):
    x = torch.rand(4, 3, 8, 8) * 0.5 + 0.25
    check_bounds(x.clamp(0, 1), x, EPS)
    with pytest.raises(AttackBoundsError, match=match):
        check_bounds(make_adv(x), x, EPS)


def test_attack_leaving_the_ball_is_an_error(linear, data, monkeypatch):
    x, y = data
    monkeypatch.setattr(adapter.APGD, "perturb", lambda self, xb, yb: (xb + 3 * EPS).clamp(0, 1))
    with pytest.raises(AttackBoundsError):
        evaluate_robustness(linear, x[:20], y[:20], eps=EPS, **FAST)


# ---- side effects -----------------------------------------------------------------------


def test_model_mode_dtype_and_rng_restored(data):
    x, y = data
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, N_CLASSES))
    model = train(model.double(), x.double(), y, steps=20).train()
    model[2].eval()  # mixed modes must survive
    model[4].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)

    r = evaluate_robustness(model, x[:40], y[:40], eps=EPS, **FAST)

    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert r.n_examples == 40
    assert model.training and model[1].training and not model[2].training
    assert not model[4].weight.requires_grad and model[1].weight.requires_grad
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype
        assert torch.equal(v, before[k]), k  # bit-exact, BN statistics included


def test_the_attack_runs_on_channels_last_weights_and_gives_the_layout_back(data):
    x, y = data
    conv = nn.Conv2d(3, 8, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, N_CLASSES))
    seen = []
    conv.register_forward_pre_hook(lambda m, _: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    evaluate_robustness(model, x[:20], y[:20], eps=EPS, **FAST)
    assert seen and all(seen)  # every forward of the attack: a layout CPUs run faster
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)


# ---- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-0.01), "eps must be >= 0"),
        (dict(eps=8), "pixel units"),
        (dict(n_classes=100), "outputs 10 logits but the dataset has 100"),
        (dict(suite="full"), "unknown suite"),
        (dict(n_iter=0), "n_iter"),
        (dict(n_restarts=0), "n_restarts"),
        (dict(batch_size=0), "batch_size"),
        (dict(indices=np.arange(5)), "indices"),
    ],
)
def test_bad_arguments(linear, data, kwargs, match):
    x, y = data
    with pytest.raises(UserError, match=match):
        evaluate_robustness(linear, x[:30], y[:30], **{**FAST, **kwargs})


def test_model_with_fewer_classes_than_labels(data):
    x, y = data
    with pytest.raises(UserError, match="labels go up to 9 but the model outputs only 5"):
        evaluate_robustness(Linear(n_out=5), x[:30], y[:30], **FAST)


def test_two_class_model_cannot_use_dlr(data):
    x, _ = data
    with pytest.raises(UserError, match="at least 3 classes"):
        evaluate_robustness(Linear(n_out=2), x[:30], torch.arange(30) % 2, **FAST)


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (torch.rand(10, 3, 8, 8) * 2, torch.zeros(10, dtype=torch.long), r"in \[0,1\]"),
        (torch.rand(10, 3, 8, 8), torch.zeros(9, dtype=torch.long), "vector of 10"),
        (torch.rand(10, 3, 8, 8), torch.zeros(10), "integer class ids"),
        (torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long), "no images"),
        (torch.zeros(10, 3, 8, 8, dtype=torch.int32), torch.zeros(10, dtype=torch.long), "uint8 or floating"),
    ],
)
def test_bad_images_or_labels(linear, images, labels, match):
    with pytest.raises(UserError, match=match):
        evaluate_robustness(linear, images, labels, **FAST)


# ---- adapter --------------------------------------------------------------------------------


def test_missing_library_gives_install_hint(monkeypatch):
    for name in list(sys.modules):
        if name.split(".")[0] in ("autoattack", "pyautoattack"):
            monkeypatch.delitem(sys.modules, name)
    for name in ("autoattack", "pyautoattack"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    adapter.load_backend.cache_clear()
    try:
        with pytest.raises(adapter.AutoAttackUnavailable, match="pip install pyautoattack"):
            adapter.load_backend()
        with pytest.raises(ImportError):
            adapter.make_apgd(Linear(), loss="ce", eps=EPS)
    finally:
        adapter.load_backend.cache_clear()


def test_collector_understands_both_logger_styles():
    c = adapter.WarningCollector("lib")
    c.log("Warning: it seems to be a randomized defense!")  # official package
    c.log("initial accuracy: 90%")  # progress line, not a warning
    c.warning("there are %d points with zero gradient!", 3)  # pyautoattack (logging.Logger)
    c.warning("there are %d points with zero gradient!", 3)
    c.debug("running apgd-ce")
    assert c.messages == [
        "lib: it seems to be a randomized defense!",
        "lib: there are 3 points with zero gradient! (x2)",
    ]
    with pytest.warns(adapter.AutoAttackWarning):
        c.emit()


# A stand-in for the official package (not on the registry): the registry code underneath,
# the official calling conventions on top (attacks_to_run=, verbose=, bs=, return_labels=,
# and checks that report through logger.log('Warning: ...')).
_OFFICIAL_SHIM = {
    "__init__.py": "__version__ = 'shim'\nfrom .autoattack import AutoAttack\n",
    "autopgd_base.py": "from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted\n",
    "checks.py": """
from pyautoattack import checks as _c

class _ToLog:
    def __init__(self, logger):
        self.logger = logger
    def warning(self, msg, *args):
        self.logger.log('Warning: ' + (msg % args if args else msg))

def _wrap(fn):
    def inner(*args, logger=None, **kwargs):
        return fn(*args, logger=None if logger is None else _ToLog(logger), **kwargs)
    return inner

check_randomized = _wrap(_c.check_randomized)
check_range_output = _wrap(_c.check_range_output)
check_dynamic = _wrap(_c.check_dynamic)
check_n_classes = _wrap(_c.check_n_classes)
check_square_sr = _wrap(_c.check_square_sr)
""",
    "autoattack.py": """
import pyautoattack

CALLS = []

class AutoAttack(pyautoattack.AutoAttack):
    def __init__(self, model, norm='Linf', eps=.3, seed=None, verbose=True,
                 attacks_to_run=[], version='standard', is_tf_model=False,
                 device='cuda', log_path=None):
        if version != 'custom' and attacks_to_run != []:
            raise ValueError('attacks_to_run needs version=custom')
        super().__init__(model, attacks=attacks_to_run or None, device=device, eps=eps,
                         norm=norm, seed=seed, version=version)
        self.verbose = verbose

    def run_standard_evaluation(self, x_orig, y_orig, bs=250, return_labels=False):
        CALLS.append(bs)
        x_adv, y_adv = super().run_standard_evaluation(x_orig, y_orig, batch_size=bs)
        return (x_adv, y_adv) if return_labels else x_adv
""",
}


@pytest.fixture
def official_shim(tmp_path, monkeypatch):
    pkg = tmp_path / "autoattack"
    pkg.mkdir()
    for name, text in _OFFICIAL_SHIM.items():
        (pkg / name).write_text(text)
    for name in [m for m in sys.modules if m == "autoattack" or m.startswith("autoattack.")]:
        monkeypatch.delitem(sys.modules, name)  # a real official install is put back afterwards
    monkeypatch.syspath_prepend(str(tmp_path))
    adapter.load_backend.cache_clear()
    yield
    for name in [m for m in sys.modules if m == "autoattack" or m.startswith("autoattack.")]:
        del sys.modules[name]
    adapter.load_backend.cache_clear()


def test_adapter_prefers_and_drives_official_package(official_shim, linear, data, result):
    x, y = data
    backend = adapter.load_backend()
    assert backend.name == "autoattack" and backend.version == "shim"

    with pytest.warns(adapter.AutoAttackWarning, match="probability distribution"):
        r = evaluate_robustness(Probabilities(linear), x[:50], y[:50], eps=EPS, **FAST)
    assert r.config["backend"] == "autoattack shim"
    assert any(w.startswith("autoattack: it seems that the output is a probability") for w in r.warnings)

    same = evaluate_robustness(linear, x, y, eps=EPS, batch_size=64, **FAST)
    assert np.array_equal(same.robust, result.robust)  # same attack code, same answer

    import autoattack.autoattack as shim

    x_adv = adapter.run_standard_autoattack(
        linear, x, y, eps=EPS, attacks=["apgd-ce", "apgd-dlr"], n_iter=10, n_restarts=1, batch_size=64
    )
    assert shim.CALLS == [64]
    with torch.no_grad():
        assert np.array_equal((linear(x_adv).argmax(1) == y).numpy(), result.robust)

    std = evaluate_robustness(linear, x[:60], y[:60], eps=0.25, suite="standard", **FAST)
    assert std.adversarial_accuracy <= 0.02 and len(shim.CALLS) > 1


def test_zero_eps_changes_nothing(linear, data):
    x, y = data
    r = evaluate_robustness(linear, x[:60], y[:60], eps=0.0, **FAST)
    assert r.adversarial_accuracy == r.natural_accuracy
    np.testing.assert_array_equal(r.adv_logits, r.clean_logits)


def test_library_warnings_are_shown_once_and_point_to_a_real_document(caplog):
    c = adapter.WarningCollector("lib")
    with caplog.at_level(logging.INFO):
        c.warning(
            "there are 3 points with zero gradient! This might lead to unreliable evaluation with "
            "current attack. See flags_doc.md for details."
        )
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]  # emit() shows it, once
    assert c.messages == [
        "lib: there are 3 points with zero gradient! This might lead to unreliable "
        f"evaluation with current attack. See {adapter.FLAGS_DOC_URL} for details."
    ]
    with pytest.warns(adapter.AutoAttackWarning) as shown:
        c.emit()
    assert len(shown) == 1
