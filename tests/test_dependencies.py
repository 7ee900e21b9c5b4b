"""What keeps a fresh install working months later: only the public API of the dependencies that move
fastest, every package of the library in the wheel, and the lock that CI tested."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The dependencies whose private names change between releases (MLflow 3.18 renamed the three
# `mlflow.utils.validation._validate_*` functions the registry used to import).
WATCHED = ("mlflow", "torch", "torchvision", "optuna", "autoattack", "pyautoattack", "robustbench")
SCANNED = ("src", "analysis", "entrypoints", "benchmarks")


def _private(part: str) -> bool:
    """`_name` is private; dunders (`__version__`, `__name__`) are the language's, not the package's."""
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _watched(module: str) -> bool:
    return module.split(".")[0] in WATCHED


def private_uses(source: str, filename: str = "<string>") -> list[str]:
    """Every place a module imports, or reaches by attribute, a private name of a watched dependency:
    `from mlflow.x import _f`, `import torch._dynamo`, `from torch._C import y`, `torch._C._cpu`,
    `nn._reduction` where `nn` came from torch, `getattr(torch._C, ...)`."""
    tree = ast.parse(source, filename)
    bound: set[str] = set()  # local names that stand for a watched module or one of its objects
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _watched(alias.name):
                    if any(_private(p) for p in alias.name.split(".")):
                        found.append(f"{filename}:{node.lineno}: import {alias.name}")
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _watched(node.module):
            for alias in node.names:
                path = [*node.module.split("."), alias.name]
                if any(_private(p) for p in path):
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)

    def from_watched(expr: ast.expr) -> bool:
        while isinstance(expr, (ast.Attribute, ast.Call, ast.Subscript)):
            expr = expr.func if isinstance(expr, ast.Call) else expr.value
        return isinstance(expr, ast.Name) and expr.id in bound

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and from_watched(node.value):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        elif (  # getattr(torch.backends, "_x", ...), hasattr(...): the name as a string
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
            and from_watched(node.args[0])
        ):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def _scanned_files():
    for folder in SCANNED:
        yield from sorted((REPO / folder).rglob("*.py"))


def test_no_private_name_of_a_watched_dependency_is_used():
    offenders = [
        use for path in _scanned_files() for use in private_uses(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert offenders == [], "private API of a dependency (it changes without notice):\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "planted",
    [
        "from mlflow.utils.validation import _validate_model_name",
        "import torch._dynamo",
        "from torch._export.converter import TS2EPConverter",
        "import torch\nflags = torch._C._cpu",
        "import torch\nprobe = getattr(torch._C, 'x', None)",
        "from torch import nn\nr = nn._reduction",
        "import optuna as o\ns = o.storages._heartbeat",
        "from mlflow.tracking import MlflowClient\nc = MlflowClient()._tracking_client",
        "import autoattack\nautoattack._x",
        "import torch\nprobe = getattr(torch.backends.cpu, '_is_avx512_bf16_supported', None)",
        "import mlflow\nhasattr(mlflow.utils, '_validate')",
    ],
)
def test_the_private_api_check_fails_on_a_planted_use(planted):
    assert private_uses(planted), planted


@pytest.mark.parametrize(
    "allowed",
    [
        "import torch\nv = torch.__version__",
        "from mlflow.tracking import MlflowClient",
        "import numpy as np\nx = np._core",  # numpy is not among the watched packages
        "class A:\n    def f(self):\n        return self._private",
        "import torch\nv = getattr(torch, '__version__')",
        "import torch\nc = getattr(torch.backends, 'cpu', None)",
    ],
)
def test_the_private_api_check_passes_public_use(allowed):
    assert private_uses(allowed) == []


def test_the_documented_grep_finds_nothing():
    """The check a reviewer runs by hand, as written in the issue that asked for this."""
    pattern = re.compile(r"from (mlflow|torch|optuna|torchvision)[.a-z_]* import _")
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in _scanned_files()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert hits == []


# ---------------------------------------------------------------------------------------- packaging


def _modules_in_tree() -> set[str]:
    names = set()
    for top, root in (("robustlogits", REPO / "src" / "robustlogits"), ("analysis", REPO / "analysis")):
        for path in root.rglob("*.py"):
            parts = [top, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.add(".".join(parts))
    return names


def _modules_in_wheel(wheel: Path) -> set[str]:
    names = set()
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.endswith(".py") and name.split("/")[0] in ("robustlogits", "analysis"):
                parts = name[: -len(".py")].split("/")
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                names.add(".".join(parts))
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would build (no build isolation: setuptools is already here)."""
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [built] = out.glob("robustlogits-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_tree(wheel):
    """Packages are found, not listed: a new subpackage cannot be left out of the wheel."""
    missing = _modules_in_tree() - _modules_in_wheel(wheel)
    assert missing == set()
    assert "robustlogits.study.reproduce.claims" in _modules_in_wheel(wheel)


@pytest.mark.slow
def test_a_non_editable_install_imports_every_module_and_plans_the_test_study(wheel, tmp_path):
    """Installed from the wheel into a folder of its own, ahead of the editable install on the path,
    every module imports and `reproduce --scale test --dry-run` plans the study."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-compile",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    modules = sorted(m for m in _modules_in_tree() if not m.endswith("__main__"))  # that one runs the CLI
    script = (
        "import importlib, sys\n"
        f"target = {str(target)!r}\n"
        f"for name in {modules!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__file__.startswith(target), (name, module.__file__)\n"
        "print('imported', len(sys.modules))\n"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MPLBACKEND": "Agg"}
    work = tmp_path / "elsewhere"  # not the repository, whose folders would shadow the install
    work.mkdir()
    imported = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600
    )
    assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-3000:]
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "ROBUSTLOGITS_CACHE": str(tmp_path / "cache")}
    planned = subprocess.run(
        [sys.executable, "-m", "robustlogits.cli", "reproduce", "--scale", "test", "--dry-run"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    assert "plan" in (planned.stdout + planned.stderr).lower(), planned.stdout[-2000:]


# ---------------------------------------------------------------------------------------- the lock


def _lock() -> dict[str, str]:
    """The lock as scripts/lock.py reads it (the one reader, shared with scripts/check_latest.py)."""
    spec = importlib.util.spec_from_file_location("lock_script", REPO / "scripts" / "lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.locked_versions()


def test_the_lock_pins_every_direct_dependency():
    import tomllib
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {canonicalize_name(Requirement(d).name) for d in wanted} - {"robustlogits"}
    assert names - set(_lock()) == set()


def test_this_environment_is_the_locked_one():
    """The suite runs on what the lock pins (`.ci/run` installs through it), so the lock records
    versions the tests passed on. Outside CI (a developer's own environment) a difference is
    reported as a skip with the versions that differ, not a failure."""
    from importlib.metadata import PackageNotFoundError, version

    differ = []
    for name, pinned in _lock().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # an extra this environment lacks
        if installed != pinned:
            differ.append(f"{name} {installed} (lock: {pinned})")
    if differ and os.environ.get("CI") != "true":
        pytest.skip("this environment was not installed through requirements/lock.txt: " + ", ".join(differ[:8]))
    assert differ == [], "installed versions differ from requirements/lock.txt"
