"""The supported dagster / taskiq ranges: checked at import, equal to setup.cfg's promise."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

from dagster_taskiq_sync.errors import UnsupportedVersionError
from dagster_taskiq_sync.versions import SKIP_ENV, SUPPORTED, check_versions, unsupported

pytestmark = pytest.mark.compat  # the tier bin/matrix runs on every env

ROOT = Path(__file__).resolve().parents[2]


def lookup(**versions):
    return lambda dist: versions.get(dist)


def test_the_ranges_are_the_ones_setup_cfg_promises():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    requires = cfg["options"]["install_requires"]
    for dist, (low, high) in SUPPORTED.items():
        assert re.search(rf"^{re.escape(dist)}>={re.escape(low)},<{re.escape(high)}$", requires, re.M), (
            f"setup.cfg install_requires has no line '{dist}>={low},<{high}'"
        )


def test_python_classifiers_cover_every_python_the_matrix_runs():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    classifiers = cfg["metadata"]["classifiers"]
    tox = (ROOT / "tox.ini").read_text()
    pythons = re.search(r"envlist = py\{([\d,]+)\}", tox).group(1).split(",")
    assert cfg["options"]["python_requires"] == f">={pythons[0][0]}.{pythons[0][1:]}"
    for py in pythons:
        assert f"Programming Language :: Python :: {py[0]}.{py[1:]}" in classifiers


def test_the_installed_versions_are_supported():
    check_versions()  # the environment running this suite


@pytest.mark.parametrize(
    "versions",
    [
        {"dagster": "1.11.0", "taskiq": "0.12.0"},
        {"dagster": "1.13.29", "taskiq": "0.13.2"},
        {"dagster": "1!0+dev", "taskiq": "0.12.1"},  # a Dagster source checkout names no release
    ],
)
def test_supported_versions_pass(versions):
    assert unsupported(versions) == []
    check_versions(lookup(**versions))


@pytest.mark.parametrize(
    ("versions", "clause"),
    [
        (
            {"dagster": "1.10.20", "taskiq": "0.13.0"},
            "dagster 1.10.20 is installed but this release supports dagster >=1.11,<1.14",
        ),
        ({"dagster": "1.14.0", "taskiq": "0.13.0"}, "dagster 1.14.0 is installed"),
        ({"dagster": "1.14.0rc1", "taskiq": "0.13.0"}, "dagster 1.14.0rc1 is installed"),
        (
            {"dagster": "1.13.1", "taskiq": "0.11.4"},
            "taskiq 0.11.4 is installed but this release supports taskiq >=0.12,<0.14",
        ),
        ({"dagster": "1.13.1"}, "taskiq is not installed"),
    ],
)
def test_an_unsupported_version_is_one_sentence_naming_it_and_the_fix(versions, clause, monkeypatch):
    monkeypatch.delenv(SKIP_ENV, raising=False)
    with pytest.raises(UnsupportedVersionError) as raised:
        check_versions(lookup(**versions))
    message = str(raised.value)
    assert clause in message
    assert message.count(". ") == 1 and message.endswith("at your own risk.")
    assert "pip install 'dagster>=1.11,<1.14' 'taskiq>=0.12,<0.14'" in message
    assert isinstance(raised.value, ImportError)  # what `import dagster_taskiq_sync` raises


def test_the_check_can_be_skipped_to_try_a_newer_minor(monkeypatch):
    monkeypatch.setenv(SKIP_ENV, "1")
    check_versions(lookup(dagster="1.14.0", taskiq="0.13.0"))
