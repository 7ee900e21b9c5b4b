"""The MLproject file and its entry points, both derived from the commands.

Every entry point takes its command's options, named as the command names them (`-P data_dir=...`,
`-P n_examples=500`). Options with a default (from the config dataclasses) are declared with it;
options whose default is "the command decides" (the preset's value, the model's own dataset, ...)
are named in a comment and not declared, so the launcher records no placeholder for them: `mlflow
run` passes a given one on as `--name value` and logs it under that name. Beside them, any config
key goes as an undeclared `-P section.field=value` and reaches the command as `--set
section.field=value` (train, distill, sweep), or as the command's own option when it is named
`<entry point>.<option>` (`-P attack.n_examples=500`).

`python -m robustlogits.cli.mlproject > MLproject` writes the file; a test keeps it in step.
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import dataclass

import typer
import typer.main

NOT_GIVEN = "default"  # an MLproject parameter left at this is not passed to the command
# entry point -> the command it runs (analyze: the `mode` parameter picks the subcommand)
ENTRY_POINTS = {
    "train": "train",
    "attack": "attack",
    "distill": "distill",
    "import": "import",
    "analyze": "analyze",
    "sweep": "sweep",
    "reproduce": "reproduce",
}
# entry point -> its script in entrypoints/ (`import` is a Python keyword, so not a module name)
SCRIPTS = {name: "import_model" if name == "import" else name for name in ENTRY_POINTS}
SKIPPED = ("set_", "help")  # `--set` is what undeclared dotted parameters become
MODE_DEFAULT = "theory"
# Commands whose options are shortcuts for config keys that `-P section.field=value` also sets:
# their parameters default to `default`, so the launcher never records a value the run did not use.
SHORTCUTS_FOR_CONFIG_KEYS = {"train": ("preset", "resume"), "distill": ("preset",)}  # (the ones that are not)


@dataclass
class Parameter:
    name: str  # the MLproject parameter: the option's Python name
    flag: str  # the command line option it becomes
    default: str | None  # None: required
    is_flag: bool = False  # a boolean option: true/false
    off_flag: str | None = None  # its "false" form, where it has one
    multiple: bool = False  # a repeatable option: several values separated by ';'


def _app_command():
    from robustlogits.cli import app

    return typer.main.get_command(app)


def _default_text(option) -> str | None:
    if option.required:
        return None
    value = option.default
    if callable(value) or value is None or value in ((), []):
        return NOT_GIVEN
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parameters(command) -> dict[str, Parameter]:
    out = {}
    for option in command.params:
        if option.param_type_name != "option" or option.name in SKIPPED or option.hidden:
            continue
        flag = next(o for o in option.opts if o.startswith("--"))
        off = option.secondary_opts[0] if option.is_flag and option.secondary_opts else None
        out[option.name] = Parameter(
            option.name, flag, _default_text(option), bool(option.is_flag), off, option.multiple
        )
    return out


def entry_point_commands(entry_point: str) -> dict:
    """The click commands an entry point can run: one, or (analyze) one per mode."""
    command = _app_command().commands[ENTRY_POINTS[entry_point]]
    if entry_point == "analyze":
        return dict(command.commands)
    return {entry_point: command}


def accepted_parameters(entry_point: str) -> dict[str, Parameter]:
    """Every option an entry point takes as `-P name=value`. Across analyze's modes, a parameter
    whose default differs between modes defaults to `default` (each mode's own)."""
    merged: dict[str, Parameter] = {}
    if entry_point == "analyze":
        merged["mode"] = Parameter("mode", "", MODE_DEFAULT)
    for command in entry_point_commands(entry_point).values():
        for name, parameter in _parameters(command).items():
            if name in merged and merged[name].default != parameter.default:
                merged[name] = Parameter(
                    name, parameter.flag, NOT_GIVEN, parameter.is_flag, parameter.off_flag, parameter.multiple
                )
            else:
                merged.setdefault(name, parameter)
    if entry_point in SHORTCUTS_FOR_CONFIG_KEYS:
        for name, parameter in merged.items():
            if name not in SHORTCUTS_FOR_CONFIG_KEYS[entry_point] and parameter.default is not None:
                parameter.default = NOT_GIVEN
    return merged


def declared_parameters(entry_point: str) -> dict[str, Parameter]:
    """What MLproject declares: the options with a real default, and the required ones. The launcher
    logs every declared parameter as a run param, so one declared with the placeholder `default`
    would show `training=default` in the run table beside the config key the run really used
    (`run.training=standard`). The others stay undeclared: `mlflow run` appends a given one as
    `--name value`, logs it under the name the user typed, and logs nothing when it is not given."""
    return {name: p for name, p in accepted_parameters(entry_point).items() if p.default != NOT_GIVEN}


def render() -> str:
    """The MLproject file."""
    lines = [
        "# Generated from the commands by `python -m robustlogits.cli.mlproject > MLproject`;",
        "# tests/test_architecture.py keeps it in step. Parameters are the commands' options with their",
        "# defaults; the options the command decides when not given are named in a comment (no placeholder",
        "# for the launcher to log); any config key also goes as -P section.field=value.",
        "name: robustlogits",
        "",
        "conda_env: conda.yaml",
        "",
        "entry_points:",
    ]
    for entry_point in ENTRY_POINTS:
        parameters = declared_parameters(entry_point)
        undeclared = [name for name in accepted_parameters(entry_point) if name not in parameters]
        lines += [f"  {entry_point}:"]
        if undeclared:
            also = textwrap.wrap(
                "also -P " + ", ".join(undeclared) + " (the command decides when not given)",
                104,
                initial_indent="    # ",
                subsequent_indent="    #   ",
                break_long_words=False,
            )
            lines += also
        lines += ["    parameters:"]
        for p in parameters.values():
            default = "" if p.default is None else f", default: {json.dumps(p.default)}"
            lines.append(f"      {p.name}: {{type: string{default}}}")
        words = [f"python entrypoints/{SCRIPTS[entry_point]}.py"]
        words += [f"--{name}\0{{{name}}}" for name in parameters]  # a flag and its value stay on one line
        wrapped = textwrap.wrap(
            " ".join(words), 110, initial_indent=" " * 6, subsequent_indent=" " * 6, break_long_words=False
        )
        lines += ["    command: >-", *(line.replace("\0", " ") for line in wrapped), ""]
    return "\n".join(lines).rstrip() + "\n"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(2)


def command_line(entry_point: str, argv: list[str]) -> list[str]:
    """`--name value` pairs as `mlflow run` passes them -> the command's own arguments."""
    if len(argv) % 2:
        _fail(f"MLproject parameters come in --name value pairs, got {argv}")
    given = {}
    for name, value in zip(argv[::2], argv[1::2]):
        given[name[2:] if name.startswith("--") else name] = value
    commands = entry_point_commands(entry_point)
    mode = given.pop("mode", MODE_DEFAULT) if entry_point == "analyze" else entry_point
    if mode not in commands:
        _fail(f"unknown {entry_point} mode {mode!r}; choose one of: {', '.join(commands)}")
    command = commands[mode]
    own = _parameters(command)
    takes_set = any(getattr(o, "name", None) == "set_" for o in command.params)
    declared = accepted_parameters(entry_point)
    prefix = f"{entry_point}."
    out = [] if entry_point != "analyze" else [mode]
    for key, value in given.items():
        if key.startswith(prefix) and key[len(prefix) :] in own:
            key = key[len(prefix) :]
        if key in own:
            p = own[key]
            if value == NOT_GIVEN:
                continue
            if p.is_flag:
                on = value.strip().lower() in ("true", "1", "yes", "on")
                out += [p.flag] if on else ([p.off_flag] if p.off_flag else [])
            elif p.multiple:
                out += [x for v in value.split(";") if v.strip() for x in (p.flag, v.strip())]
            else:
                out += [p.flag, value]
        elif key in declared:  # another analyze mode's parameter
            if value != NOT_GIVEN and value != declared[key].default:
                _fail(f"analyze mode {mode!r} takes no parameter {key!r}")
        elif "." in key and takes_set:
            out += ["--set", f"{key}={value}"]
        else:
            example = "-P run.training=adversarial" if takes_set else f"-P {next(iter(own), 'name')}=..."
            _fail(
                f"unknown MLproject parameter {key!r} for {entry_point}: use one it declares (see MLproject) or "
                f"a config key as the run logs it, e.g. {example} (`robustlogits config` lists every key)"
            )
    return out


def run_entry_point(entry_point: str, argv: list[str] | None = None) -> None:
    """What an entrypoints/ script does: translate the parameters, then run the command."""
    from robustlogits.cli import app

    args = command_line(entry_point, sys.argv[1:] if argv is None else argv)
    app(args=[ENTRY_POINTS[entry_point], *args], prog_name=f"mlflow run -e {entry_point}")


if __name__ == "__main__":
    sys.stdout.write(render())
