"""The README's Benchmark figures are bin/bench's, never typed by hand: its summary block is the
one rendered from docs/benchmark.json, its prose quotes no figure the generated results lack, and
each storage's results carry where they were measured through ``--include``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from benchmarks.bench import report_results
from benchmarks.bench_results import Measurement, Results
from benchmarks.bench_summary import (
    BEGIN,
    END,
    current_block,
    invocation_ended,
    invocation_started,
    provenance,
    replace_block,
    summary,
    writes_readme,
)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# Measured figures: decimals, ratios (2x, 1.5x), percentages and quantities with a unit of time,
# size or memory. Plain integers (concurrency 4, chain-20, 3 repeats) describe the method; dotted
# versions and addresses (127.0.0.1) are not figures.
FIGURE = re.compile(
    r"(?<![\w.])(?<![A-Za-z]-)\d+(?:\.\d+)?(?:x\b|\s?%|\s?(?:s|ms|KB|MB|MiB|GB)\b)?(?!\w|\.\d|-[A-Za-z])"
)


def _figures(text: str) -> set[str]:
    return {m.group(0).replace(" ", "") for m in FIGURE.finditer(text) if not m.group(0).isdigit()}


def _benchmark_section(readme: str) -> str:
    return readme.split("\n## Benchmark\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_block_is_the_one_bin_bench_renders_from_docs_benchmark_json():
    # Given the results bin/bench last wrote, when the block is rendered as --report-only does,
    # then README.md holds exactly it: a hand-edited figure or a stale README fails here.
    rendered = summary(report_results([str(ROOT / "docs" / "benchmark.json")]))
    assert current_block(README.read_text()) == rendered, (
        "README.md's Benchmark summary is not the one docs/benchmark.json gives: regenerate it with "
        "`bin/bench --report-only --include docs/benchmark.json` (never edit it by hand)"
    )


def test_the_benchmark_prose_quotes_no_figure_the_generated_results_lack():
    readme = README.read_text()
    section = _benchmark_section(readme)
    block = current_block(readme)
    prose = section.replace(block, "")
    generated = _figures(block) | _figures((ROOT / "docs" / "benchmark.md").read_text())
    quoted = _figures(prose) - generated
    assert quoted == set(), (
        f"README.md's Benchmark prose quotes {sorted(quoted)}, which neither its generated block nor "
        "docs/benchmark.md holds: move the figure into bin/bench's report or drop it"
    )


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
    block = summary(results)
    assert "| chain-3 | sqlite | 1.25 |" in block and "| chain-3 | postgres | 2.50 |" in block


def test_an_older_results_file_says_unknown_instead_of_guessing(tmp_path):
    raw = _results("sqlite", ["--quick"], 1.0).raw()
    del raw["invocations"]  # as docs/benchmark.json before provenance was recorded
    (tmp_path / "old.json").write_text(json.dumps(raw))
    line = provenance(report_results([str(tmp_path / "old.json")]), "sqlite")
    assert line == "sqlite: command unknown; commit unknown; date unknown; load average unknown; machine unknown"


def test_the_block_is_replaced_between_its_markers_and_nothing_else():
    readme = f"# x\n\nbefore\n{BEGIN}\nold figures\n{END}\nafter\n"
    assert replace_block(readme, f"{BEGIN}\nnew\n{END}") == f"# x\n\nbefore\n{BEGIN}\nnew\n{END}\nafter\n"
    with pytest.raises(ValueError, match="needs exactly one"):
        replace_block("# a README without the markers\n", f"{BEGIN}\n{END}")
    with pytest.raises(ValueError, match="needs exactly one"):
        replace_block(f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", f"{BEGIN}\n{END}")


def test_only_a_full_run_into_docs_rewrites_the_readme_and_ci_runs_quick_only(tmp_path):
    assert writes_readme(ROOT / "docs", quick=False, root=ROOT)
    assert writes_readme(Path("docs"), quick=False, root=Path("."))
    assert not writes_readme(ROOT / "docs", quick=True, root=ROOT)  # --quick's figures are smoke figures
    assert not writes_readme(tmp_path, quick=False, root=ROOT)
    # CI's runs of the bench are --quick without --out docs, so CI never dirties README.md or docs/.
    calls = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("bin/bench")]
    assert calls and all("--quick" in c and "--out" not in c for c in calls), calls
