"""The dagster and taskiq versions this release supports, checked when the package is imported.

The executor relies on private Dagster step-delegation APIs (``_dagster/``) whose shape
changes between minors, so an unsupported minor would otherwise fail late and obscurely (an
``ImportError`` deep in Dagster, or a step erroring on a worker). The ranges equal
``install_requires`` in setup.cfg (``tests/unit/test_versions.py`` checks it), and each supported
minor is exercised by ``bin/matrix``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from importlib import metadata

from dagster_taskiq_sync.errors import UnsupportedVersionError

# distribution -> (lowest supported "major.minor", first unsupported "major.minor")
SUPPORTED: Mapping[str, tuple[str, str]] = {
    "dagster": ("1.11", "1.14"),
    "taskiq": ("0.12", "0.14"),
}

SKIP_ENV = "DAGSTER_TASKIQ_SYNC_SKIP_VERSION_CHECK"


def _minor(version: str) -> tuple[int, int] | None:
    """(major, minor) of a release version, or None for one that names no release (a source
    checkout such as dagster's "1!0+dev")."""
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def unsupported(installed: Mapping[str, str | None]) -> list[str]:
    """One clause per distribution whose installed version is outside ``SUPPORTED``."""
    problems = []
    for dist, (low, high) in SUPPORTED.items():
        version = installed.get(dist)
        if version is None:
            problems.append(f"{dist} is not installed (this release needs {dist} >={low},<{high})")
            continue
        minor = _minor(version)
        if minor is not None and not (_minor(low) <= minor < _minor(high)):  # type: ignore[operator]
            problems.append(f"{dist} {version} is installed but this release supports {dist} >={low},<{high}")
    return problems


def check_versions(version_of: Callable[[str], str | None] | None = None) -> None:
    """Raise ``UnsupportedVersionError`` (one sentence naming the versions and the fix) when the
    installed dagster or taskiq is outside the supported range."""
    if os.environ.get(SKIP_ENV) == "1":
        return
    lookup = version_of or _installed_version
    problems = unsupported({dist: lookup(dist) for dist in SUPPORTED})
    if problems:
        raise UnsupportedVersionError(
            "dagster-taskiq-sync cannot run here: "
            + "; ".join(problems)
            + ". Install a supported version (pip install 'dagster>=1.11,<1.14' 'taskiq>=0.12,<0.14'),"
            f" or set {SKIP_ENV}=1 to try this one at your own risk."
        )


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
