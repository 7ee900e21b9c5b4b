"""Precision chosen by the machine: `run.amp = auto` asks the hardware and times it, true/false force it."""

from __future__ import annotations

import pytest
import torch

from robustlogits.config import preset
from robustlogits.core import device as dev
from robustlogits.core.errors import UserError


@pytest.mark.parametrize(
    "setting, expected", [("true", True), ("false", False), (True, True), (False, False), ("1", True), ("off", False)]
)
def test_forced_settings_win_over_the_hardware(setting, expected, monkeypatch):
    monkeypatch.setattr(dev, "bf16_is_native", lambda device: not expected)
    assert dev.resolve_amp(setting, torch.device("cpu")) is expected


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_native_bf16(native, monkeypatch):
    monkeypatch.setattr(dev, "bf16_is_native", lambda device: native)
    assert dev.resolve_amp("auto", torch.device("cpu")) is native
    assert dev.precision_name(native) == ("bf16-autocast" if native else "fp32")


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu avx2 fma", False),
        ("fpu avx512f avx512_bf16", True),
        ("amx_bf16 amx_tile", True),
        ("avx512f avx512_vnni", False),
    ],
)
def test_cpuinfo_flags_decide_native_bf16(flags, native):
    assert dev.cpuinfo_has_native_bf16(f"processor : 0\nflags\t\t: {flags}\n") is native


@pytest.mark.parametrize("speedup, chosen", [(0.64, False), (1.10, False), (1.8, True)])
def test_auto_on_a_cpu_with_bf16_flags_takes_bf16_only_where_it_is_timed_faster(speedup, chosen, monkeypatch):
    """An Intel Xeon with AVX-512-BF16 and no AMX trained 1.3-1.6x slower in bf16: the flag is not enough."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(dev, "_cpu_flags_have_bf16", lambda: True)
    monkeypatch.setattr(dev, "cpu_bf16_speedup", lambda: speedup)
    dev.cpu_has_native_bf16.cache_clear(), dev.cpu_bf16_pays_off.cache_clear()
    try:
        assert dev.resolve_amp("auto", torch.device("cpu")) is chosen
    finally:
        dev.cpu_has_native_bf16.cache_clear(), dev.cpu_bf16_pays_off.cache_clear()


def test_a_cpu_without_bf16_flags_is_not_timed(monkeypatch):
    monkeypatch.setattr(dev, "_cpu_flags_have_bf16", lambda: False)
    monkeypatch.setattr(dev, "cpu_bf16_speedup", lambda: pytest.fail("timed a CPU that has no bf16"))
    dev.cpu_has_native_bf16.cache_clear(), dev.cpu_bf16_pays_off.cache_clear()
    try:
        assert dev.resolve_amp("auto", torch.device("cpu")) is False
    finally:
        dev.cpu_has_native_bf16.cache_clear(), dev.cpu_bf16_pays_off.cache_clear()


def test_the_precision_timing_measures_both_paths():
    speedup = dev.cpu_bf16_speedup(repeats=1)
    assert 0.01 < speedup < 100  # a ratio of two real timings, whichever way it goes on this CPU


def test_bad_amp_setting_is_one_clear_error():
    cfg = preset("test")
    cfg.run.amp = "maybe"
    with pytest.raises(UserError, match="run.amp must be one of auto, true, false"):
        cfg.validate()


def test_presets_default_to_auto_and_log_the_choice(monkeypatch):
    from mlflow.tracking import MlflowClient

    from robustlogits.jobs.train import run_training

    assert preset("smoke").run.amp == "auto" and preset("paper").run.amp == "auto"
    monkeypatch.setattr(dev, "bf16_is_native", lambda device: False)
    cfg = preset("test")
    cfg.run.amp = "auto"
    cfg.optim.epochs = 1
    cfg.run.checkpoint_epochs = (1,)
    params = MlflowClient().get_run(run_training(cfg, progress=False)).data.params
    assert params["run.amp"] == "auto" and params["run.precision"] == "fp32"


@pytest.mark.parametrize("native, forced", [(True, "true"), (False, "false")])
def test_auto_trains_exactly_as_the_setting_it_resolves_to(native, forced, monkeypatch):
    """Same seed: `auto` on a machine with (or without) native bf16 gives the same metrics as
    forcing bf16 (or fp32), so the choice changes speed only."""
    from mlflow.tracking import MlflowClient

    from robustlogits.jobs.train import run_training

    monkeypatch.setattr(dev, "bf16_is_native", lambda device: native)
    client, histories = MlflowClient(), {}
    for amp in ("auto", forced):
        cfg = preset("test")
        cfg.run.training = "adversarial"
        cfg.run.amp = amp
        cfg.optim.epochs = 1
        cfg.run.checkpoint_epochs = (1,)
        run = client.get_run(run_training(cfg, progress=False))
        histories[amp] = {
            k: v for k, v in run.data.metrics.items() if k not in ("epoch_seconds", "train_images_per_second")
        }
        assert run.data.params["run.precision"] == dev.precision_name(native)
    assert histories["auto"] == histories[forced]


def test_attacks_resolve_their_device_the_one_way(monkeypatch):
    """A study worker's device (ROBUSTLOGITS_DEVICE) reaches the attack too: `core.device` is the one
    place that resolves devices, for training, evaluation and attacks alike."""
    import numpy as np

    from robustlogits.core.attacks import evaluate_robustness
    from robustlogits.core.device import resolve_device
    from robustlogits.core.models import build_model

    monkeypatch.setenv("ROBUSTLOGITS_DEVICE", "cpu")
    assert resolve_device(None) == resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("ROBUSTLOGITS_DEVICE", "no-such-device")
    model = build_model("cnn-tiny", 10, "synthetic").eval()
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    with pytest.raises(UserError, match="unknown device 'no-such-device'"):
        evaluate_robustness(model, x, y, np.arange(4), n_iter=1, device=None, progress=False)


@pytest.mark.parametrize(
    "cap, allowed",
    [
        (None, True),
        ("ALL", True),
        ("avx512_core_amx", True),
        ("AVX512_CORE_BF16", True),
        ("AVX2", False),
        ("avx512_core", False),
        ("AVX512_CORE_VNNI", False),
        ("SSE41", False),
    ],
)
def test_an_isa_cap_below_bf16_makes_auto_train_in_fp32(cap, allowed, monkeypatch):
    """`ONEDNN_MAX_CPU_ISA=AVX2` makes oneDNN emulate bf16 on any CPU, as an AVX2-only machine does:
    `auto` must then pick fp32 even though the CPU's flags say bf16."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    monkeypatch.setattr(dev, "_cpu_flags_have_bf16", lambda: True)
    monkeypatch.setattr(dev, "cpu_bf16_speedup", lambda: 1.9)  # as on the AMX Xeon: bf16 pays where allowed
    dev.cpu_has_native_bf16.cache_clear(), dev.cpu_bf16_pays_off.cache_clear()
    try:
        assert dev.cpu_has_native_bf16() is allowed
        assert dev.resolve_amp("auto", torch.device("cpu")) is allowed
    finally:
        dev.cpu_has_native_bf16.cache_clear(), dev.cpu_bf16_pays_off.cache_clear()


def test_the_older_dnnl_variable_caps_too(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "avx2")
    assert dev.isa_cap() == "AVX2" and not dev.isa_cap_allows_bf16(dev.isa_cap())


def test_a_capped_cpu_is_named_as_capped_beside_every_timing(monkeypatch):
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    plain = dev.cpu_name()
    assert "capped" not in plain
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert dev.cpu_name() == f"{plain} (oneDNN capped to AVX2)"
