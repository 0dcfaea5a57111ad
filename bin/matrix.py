"""The compatibility matrix behind `bin/matrix`: run tox envs (dagster x taskiq x python) and write
what ran, with the installed versions and the pytest counts, to docs/matrix.md and docs/matrix.json.

Nothing in those files is typed by hand: each row is one env's run, with the commit and date it ran
on. A later invocation replaces the rows of the (env, tier) pairs it ran and keeps the others.

Interpreters: tox looks for python3.X on PATH. The ones this machine has besides python3 are
pyenv's; this script adds every ``$(pyenv root)/versions/*/bin`` to the PATH it gives tox, so no
one edits PATH. An env whose interpreter is missing is a failure, never a silent skip.

Exit status: 0 when every env ran, installed the versions its name promises, and passed at least
one test with no failures or errors; 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOX = ROOT / ".venv" / "bin" / "tox"
DOCS = ROOT / "docs"

PYTHONS = ("310", "311", "312", "313")
DAGSTERS = ("111", "112", "113")
TASKIQS = ("012", "013")
ENVS = tuple(f"py{p}-dagster{d}-taskiq{t}" for p in PYTHONS for d in DAGSTERS for t in TASKIQS)
# Every dagster minor, every Python and every taskiq minor at least once, both extremes included.
CORNERS = (
    "py310-dagster111-taskiq012",
    "py313-dagster113-taskiq013",
    "py311-dagster112-taskiq013",
    "py312-dagster113-taskiq012",
    "py313-dagster111-taskiq013",
)
TIERS = {
    # the compatibility tier: every private Dagster use, the wire contract, a real run on
    # CLI-started workers, the run launcher and eager mode (tests marked `compat`)
    "compat": ["-m", "compat", "-q"],
    # the whole suite, files spread over 4 processes (most of its time is waiting on workers)
    "full": ["-q", "-n", "4", "--dist", "loadfile"],
}
VERSIONS = (
    "import sys, json, importlib.metadata as m; print(json.dumps({'python': sys.version.split()[0], "
    "**{d: m.version(d) for d in ('dagster', 'taskiq', 'taskiq-aio-sqs')}}))"
)


def pyenv_bins() -> list[str]:
    """The bin directories of every pyenv interpreter on this machine."""
    root = os.environ.get("PYENV_ROOT")
    if not root and shutil.which("pyenv"):
        root = subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip()
    versions = Path(root or Path.home() / ".pyenv") / "versions"
    return sorted(str(p / "bin") for p in versions.glob("*") if (p / "bin").is_dir()) if versions.is_dir() else []


def factors(env: str) -> dict[str, str]:
    """What an env's name promises: {"python": "3.10", "dagster": "1.11", "taskiq": "0.12"}."""
    py, dagster, taskiq = env.split("-")
    return {
        "python": f"{py[2]}.{py[3:]}",
        "dagster": f"{dagster[7]}.{dagster[8:]}",
        "taskiq": f"{taskiq[6:7]}.{taskiq[7:]}",
    }


def junit_counts(path: Path) -> dict[str, float]:
    tests = failures = errors = skipped = 0
    seconds = 0.0
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        tests += int(suite.get("tests", 0))
        failures += int(suite.get("failures", 0))
        errors += int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
        seconds += float(suite.get("time", 0))
    passed = tests - failures - errors - skipped
    return {
        "tests": tests,
        "passed": passed,
        "failed": failures,
        "errors": errors,
        "skipped": skipped,
        "pytest_seconds": round(seconds, 1),
    }


def run_env(env: str, tier: str, path: str, extra: list[str]) -> dict:
    env_dir = ROOT / ".tox" / env
    logs = ROOT / ".tox" / "matrix-logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{env}-{tier}.log"
    junit = env_dir / "junit.xml"
    junit.unlink(missing_ok=True)
    row: dict = {"env": env, "tier": tier}
    want = factors(env)
    interpreter = shutil.which(f"python{want['python']}", path=path)
    if interpreter is None:
        return row | {"status": "failed", "why": f"no python{want['python']} on PATH or in pyenv"}
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.run(
            [str(TOX), "run", "-e", env, "--", *TIERS[tier], *extra],
            cwd=ROOT,
            env={**os.environ, "PATH": path},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    row["wall_seconds"] = round(time.monotonic() - started, 1)
    python = env_dir / "bin" / "python"
    if python.exists():
        got = json.loads(subprocess.run([str(python), "-c", VERSIONS], capture_output=True, text=True).stdout or "{}")
        row.update(got)
    if junit.exists():
        row.update(junit_counts(junit))
    why = []
    for dist, minor in want.items():
        if not str(row.get(dist, "")).startswith(minor + "."):
            why.append(f"{dist} {row.get(dist, 'not installed')} is not {minor}")
    if proc.returncode != 0:
        why.append(f"tox exited {proc.returncode} (log: {log.relative_to(ROOT)})")
    if not row.get("passed"):
        why.append("no test passed")
    row["status"] = "failed" if why else "passed"
    if why:
        row["why"] = "; ".join(why)
    return row


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
    )
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def write(rows: list[dict]) -> None:
    path = DOCS / "matrix.json"
    kept = json.loads(path.read_text())["rows"] if path.exists() else []
    ran = {(r["env"], r["tier"]) for r in rows}
    order = {env: i for i, env in enumerate(ENVS)}
    merged = [r for r in kept if (r["env"], r["tier"]) not in ran] + rows
    merged.sort(key=lambda r: (r["tier"] != "full", order.get(r["env"], 99)))
    path.write_text(json.dumps({"rows": merged}, indent=1) + "\n")
    lines = [
        "# Compatibility matrix",
        "",
        "Generated by `bin/matrix` from the runs themselves (tox env, installed versions, pytest's",
        "JUnit counts); do not edit. `compat` is the compatibility tier (`pytest -m compat`: every",
        "private Dagster use, the wire contract, a real run on CLI-started workers, the run launcher,",
        "eager mode); `full` is the whole suite. Skipped tests are counted apart, never as passed.",
        "",
        "| env | tier | result | python | dagster | taskiq | taskiq-aio-sqs | passed | failed | errors | skipped"
        " | pytest s | commit | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in merged:
        cells = [r["env"], r["tier"], r["status"] + (f" ({r['why']})" if r.get("why") else "")]
        cells += [str(r.get(k, "")) for k in ("python", "dagster", "taskiq", "taskiq-aio-sqs")]
        cells += [str(r.get(k, "")) for k in ("passed", "failed", "errors", "skipped", "pytest_seconds")]
        cells += [r.get("commit", ""), r.get("date", "")]
        lines.append("| " + " | ".join(cells) + " |")
    (DOCS / "matrix.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bin/matrix", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--corners", action="store_true", help=f"only the corner envs: {', '.join(CORNERS)}")
    group.add_argument("-e", "--env", action="append", choices=ENVS, metavar="ENV", help="one env (repeatable)")
    parser.add_argument("--tier", choices=sorted(TIERS), default="compat", help="compat (default) or full")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="envs run at once (default 1)")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/matrix.md and docs/matrix.json")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be 1 or more, not {args.jobs}")
    envs = list(CORNERS if args.corners else args.env or ENVS)
    path = os.pathsep.join([*pyenv_bins(), os.environ.get("PATH", "")])
    stamp = {"commit": commit(), "date": datetime.date.today().isoformat()}
    print(f"bin/matrix: {args.tier} tier on {len(envs)} env(s), {args.jobs} at a time", flush=True)
    rows = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_env, env, args.tier, path, args.pytest_args): env for env in envs}
        for future in concurrent.futures.as_completed(futures):
            row = future.result() | stamp
            rows.append(row)
            if not args.no_write:  # after each env, so an interrupted matrix keeps what it ran
                write(rows)
            counts = " ".join(f"{k}={row[k]}" for k in ("passed", "failed", "errors", "skipped") if k in row)
            print(
                f"  {row['env']:28} {row['status']:6} {counts} pytest {row.get('pytest_seconds', '-')} s,"
                f" wall {row.get('wall_seconds', '-')} s" + (f"  ({row['why']})" if row.get("why") else ""),
                flush=True,
            )
    failed = [r for r in rows if r["status"] != "passed"]
    for r in failed:
        log = ROOT / ".tox" / "matrix-logs" / f"{r['env']}-{r['tier']}.log"
        if log.exists():
            print(f"--- {r['env']}: last lines of {log.relative_to(ROOT)}", flush=True)
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]), flush=True)
    print(f"bin/matrix: {len(rows) - len(failed)} of {len(rows)} env(s) passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
