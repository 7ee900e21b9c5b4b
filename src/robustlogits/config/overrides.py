"""Config values from text: `section.field=value` overrides coerced to each field's declared type,
and the dotted-name view of a config that runs log as their params."""

from __future__ import annotations

import dataclasses
import types
import typing

from robustlogits.core.errors import UserError


def flatten(cfg) -> dict[str, object]:
    """Dotted-name view of a (nested) dataclass: what gets logged as MLflow params."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for key, inner in flatten(value).items():
                out[f"{f.name}.{key}"] = inner
        else:
            out[f.name] = value
    return out


# Knobs added after results were computed, each with the value that reproduces what ran before it
# existed. Keys leave a knob out while it holds that value, so finished runs stay found (a preset's
# study resumes) and only a run that turns the knob gets a new key.
KEY_NEUTRAL = {"data.crop_pad": 4, "optim.nesterov": False, "model.whitening_eps": 5e-4}


def keyed_view(cfg) -> dict[str, object]:
    """`flatten` as keys see it: every value except knobs still at their neutral value."""
    return {k: v for k, v in flatten(cfg).items() if k not in KEY_NEUTRAL or v != KEY_NEUTRAL[k]}


def apply_overrides(cfg, overrides: typing.Iterable[str]):
    """Apply ``section.field=value`` strings, coercing each value to the field's declared type."""
    for item in overrides:
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        set_value(cfg, key.strip(), raw.strip())
    return cfg


def set_value(cfg, dotted: str, raw) -> None:
    target = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not hasattr(target, part) or not dataclasses.is_dataclass(getattr(target, part)):
            raise UserError(f"unknown config section {part!r} in {dotted!r}; see `robustlogits config`")
        target = getattr(target, part)
    hints = typing.get_type_hints(type(target))
    name = parts[-1]
    if name not in hints or not any(f.name == name for f in dataclasses.fields(target)):
        raise UserError(f"unknown config key {dotted!r}; see `robustlogits config`")
    setattr(target, name, coerce(raw, hints[name], dotted))


def coerce(raw, hint, name: str = "value"):
    """Turn CLI text into the declared type (tuples as comma lists, 'none' for Optional)."""
    if not isinstance(raw, str):
        return raw
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin is tuple:
            items = [s for s in raw.replace(" ", "").strip("()[]").split(",") if s]
            elem = args[0]
            return tuple(coerce(s, elem, name) for s in items)
        if hint is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if hint is int:
            return int(raw)
        if hint is float:
            return _float(raw)
        return raw
    except ValueError:
        raise UserError(f"{name}: cannot read {raw!r} as {getattr(hint, '__name__', hint)}") from None


def _float(raw: str) -> float:
    """Accept fractions such as 8/255, which is how attack budgets are written."""
    if "/" in raw:
        num, den = raw.split("/", 1)
        return float(num) / float(den)
    return float(raw)
