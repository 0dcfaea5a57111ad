"""bin/bench's results say where they were measured, and carry it through ``--include``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.bench import report_results
from benchmarks.bench_results import Measurement, Results
from benchmarks.bench_summary import (
    invocation_ended,
    invocation_started,
    provenance,
)

ROOT = Path(__file__).resolve().parents[2]


def _results(storage: str, command: list[str], wall: float) -> Results:
    opts = argparse.Namespace(storages=(storage,), workloads=("chain-3",), contenders=("taskiq",), repeats=1)
    results = Results(opts)
    results.measurements[(storage, "chain-3", "taskiq")] = Measurement(storage, "chain-3", "taskiq", [wall])
    results.invocations[storage] = invocation_started(command, ROOT)
    invocation_ended(results.invocations[storage])
    return results


def test_each_storage_keeps_its_own_invocation_through_report_only(tmp_path):
    # Given a sqlite and a postgres invocation, each saved as bin/bench saves it,
    for storage, wall in (("sqlite", 1.25), ("postgres", 2.5)):
        raw = _results(storage, ["--storages", storage, "--workloads", "chain-3"], wall).raw()
        (tmp_path / f"{storage}.json").write_text(json.dumps(raw))
    # when one --report-only combines them,
    results = report_results([str(tmp_path / "sqlite.json"), str(tmp_path / "postgres.json")])
    # then both storages are reported, each with its own wall time and its own provenance line.
    assert results.opts.storages == ("sqlite", "postgres")
    assert [results.wall(s, "chain-3", "taskiq") for s in results.opts.storages] == [1.25, 2.5]
    for storage in ("sqlite", "postgres"):
        line = provenance(results, storage)
        assert f"`bin/bench --storages {storage} --workloads chain-3`" in line
        assert "unknown" not in line, line  # commit, dates, load at both ends, CPUs, Python
        assert re.search(
            r"load average \(1, 5, 15 min\) [\d.]+, [\d.]+, [\d.]+ at start, [\d.]+, [\d.]+, [\d.]+ at end", line
        )


def test_an_older_results_file_says_unknown_instead_of_guessing(tmp_path):
    raw = _results("sqlite", ["--quick"], 1.0).raw()
    del raw["invocations"]  # as docs/benchmark.json before provenance was recorded
    (tmp_path / "old.json").write_text(json.dumps(raw))
    line = provenance(report_results([str(tmp_path / "old.json")]), "sqlite")
    assert line == "sqlite: command unknown; commit unknown; date unknown; load average unknown; machine unknown"
