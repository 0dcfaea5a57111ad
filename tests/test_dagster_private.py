"""Every private Dagster name this package relies on exists on the pinned Dagster.

A rename in Dagster would otherwise fail late (a step erroring on a worker) or silently: a fork
server preload that no longer imports costs ~0.7 s per step again, with nothing failing.
"""

from __future__ import annotations

import importlib

import pytest

from dagster_taskiq_sync import _dagster_private


@pytest.mark.parametrize("module", _dagster_private.PRELOAD_MODULES)
def test_every_fork_server_preload_imports(module):
    importlib.import_module(module)


@pytest.mark.parametrize("name", _dagster_private.__all__)
def test_every_private_name_is_there(name):
    assert getattr(_dagster_private, name) is not None


def test_installers_change_nothing_until_called():
    from dagster._core.executor.step_delegating import step_delegating_executor as sde

    # Importing this package does not patch Dagster: other executors keep Dagster's own classes.
    assert (
        sde.ActiveExecution is _dagster_private.ActiveExecution
        or sde.ActiveExecution.__name__ == "_TaskiqActiveExecution"
    )
    _dagster_private.install_step_sort_key()
    assert sde.ActiveExecution.__name__ == "_TaskiqActiveExecution"
    _dagster_private.install_step_sort_key()  # idempotent
    assert sde.ActiveExecution.__mro__[1] is _dagster_private.ActiveExecution
