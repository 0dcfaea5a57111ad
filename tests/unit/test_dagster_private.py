"""Every private Dagster name this package relies on exists on the pinned Dagster.

A rename in Dagster would otherwise fail late (a step erroring on a worker) or silently: a fork
server preload that no longer imports costs ~0.7 s per step again, with nothing failing.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from dagster_taskiq_sync._dagster import execution, names

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env


@pytest.mark.parametrize("module", names.PRELOAD_MODULES)
def test_every_fork_server_preload_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("name", names.__all__)
def test_every_private_name_is_there(name):
    assert getattr(names, name) is not None


def test_every_module_of_the_private_api_package_imports():
    package = Path(names.__file__).parent
    modules = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    assert {"names", "kv", "sqlite", "execution", "child", "event_writes"} <= set(modules)
    for module in modules:
        importlib.import_module(f"dagster_taskiq_sync._dagster.{module}")


def test_installers_change_nothing_until_called():
    from dagster._core.executor.step_delegating import step_delegating_executor as sde

    # Importing this package does not patch Dagster: other executors keep Dagster's own classes.
    assert sde.ActiveExecution is names.ActiveExecution or sde.ActiveExecution.__name__ == "_TaskiqActiveExecution"
    execution.install_step_sort_key()
    assert sde.ActiveExecution.__name__ == "_TaskiqActiveExecution"
    execution.install_step_sort_key()  # idempotent
    assert sde.ActiveExecution.__mro__[1] is names.ActiveExecution


def _private_dagster_imports(path):
    """(line, name) of every import of a private Dagster module or name in one Python file:
    ``import dagster._x``, ``from dagster._x import y``, ``from dagster import _x`` and
    ``importlib.import_module("dagster._x")``."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("dagster._")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("dagster._"):
                found.append((node.lineno, node.module))
            elif node.module == "dagster":
                found += [(node.lineno, f"dagster.{a.name}") for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            value = node.args[0].value
            if isinstance(value, str) and value.startswith("dagster._"):
                found.append((node.lineno, value))
    return found


# Where shipped code lives: the package and what users run (bin/ scripts, benchmarks, examples).
# tests/ may reach into Dagster to set up a fault; that is not a promise to users.
_SHIPPED = ("dagster_taskiq_sync", "benchmarks", "examples", "deploy", "bin")


def test_no_module_outside_the_private_api_package_imports_private_dagster():
    root = Path(__file__).resolve().parents[2]
    own = root / "dagster_taskiq_sync" / "_dagster"
    files = [p for top in _SHIPPED for p in (root / top).rglob("*.py") if own not in p.parents]
    assert len(files) > 30, "the scan found too few files to be looking in the right place"
    offenders = [
        f"{p.relative_to(root)}:{line} imports {name}" for p in files for line, name in _private_dagster_imports(p)
    ]
    assert offenders == [], "private Dagster names belong in dagster_taskiq_sync/_dagster/: " + "; ".join(offenders)


def test_the_scan_sees_every_form_of_private_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import dagster._core.events\n"
        "from dagster._serdes import serialize_value\n"
        "from dagster import _check as check, job\n"
        "import importlib\n"
        "importlib.import_module('dagster._cli.api')\n"
        "from dagster import asset\n"
    )
    assert [name for _, name in _private_dagster_imports(sample)] == [
        "dagster._core.events",
        "dagster._serdes",
        "dagster._check",
        "dagster._cli.api",
    ]
