"""bin/soak's report, soak.md: the verdict and its figures, then each section's details (violations,
failed runs, re-runs, finished attempts called lost, the longest stall, drops, state rows, chaos)."""

from __future__ import annotations


def report_md(r: dict, t0: float) -> str:
    out = _summary(r)
    if r["violations"]:
        out += ["## Violations", ""]
        for v in r["violations"]:
            out.append(f"- **{v['kind']}**: {v['what']}")
        out.append("")
    out += _failed_runs(r)
    out += _reruns(r)
    out += _called_lost(r)
    out += _stall(r, t0)
    msgs = r["messages"]
    out += ["", "## Messages dropped by workers (with their reason)", ""]
    for k, v in sorted(msgs["drops_by_reason"].items(), key=lambda kv: -kv[1]):
        out.append(f"- {k}: {v}")
    if not msgs["drops_by_reason"]:
        out.append("None.")
    out += ["", "## State rows left", "", f"By kind: {r['state_rows']['by_kind'] or 'none'}."]
    for row in r["state_rows"]["per_attempt_rows"][:20]:
        out.append(f"- `{row['key']}`: `{row['value'][:200]}`")
    out += _chaos_events(r)
    out += ["", f"Runs by job: {r['runs']['by_job']}; statuses: {r['runs']['statuses']}.", ""]
    return "\n".join(out) + "\n"


def _summary(r: dict) -> list[str]:
    mode = "--quick" if r["quick"] else f"--duration {r['duration_minutes']:g}"
    ok = "PASS" if not r["violations"] else f"FAIL ({len(r['violations'])} violation(s))"
    runs, msgs = r["runs"], r["messages"]
    return [
        f"# Chaos soak: {ok}",
        "",
        f"`bin/soak {mode} --seed {r['seed']}`: {r['soak_seconds']:.0f} s of runs ({r['runs_at_once']} at once, each a "
        "`dagster job execute` process) against workers "
        + ", ".join(
            f"`{n}` (`-q {' -q '.join(w['queues'])} -c {w['concurrency']}`, {w['incarnations']} incarnation(s))"
            for n, w in r["workers"].items()
        )
        + ", on a PostgreSQL instance and a local SQS endpoint behind a pausable proxy. Chaos: "
        + ", ".join(f"{v} x {k}" for k, v in sorted(r["chaos"]["counts"].items()))
        + ". Settings: "
        + ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        + ".",
        "",
        "| figure | value |",
        "|---|---|",
        f"| runs started / succeeded / failed | {runs['started']} / {runs['succeeded']} / {runs['failed']} |",
        f"| failures explained (allowed cause) | {sum(f['explained'] for f in r['failures'])} of {len(r['failures'])}: "
        f"{sum(f['explained'] and not f.get('documented_fail_fast') for f in r['failures'])} a step's worker SIGKILLed "
        f"mid-step (no RetryPolicy, or its retries used up), {sum(bool(f.get('documented_fail_fast')) for f in r['failures'])} "
        "started while SQS was paused (documented fail-fast at run start) |",
        f"| step messages sent (attempts) | {msgs['sent']} |",
        f"| ... started on a worker / dropped with a reason / of a failed run only | {msgs['started']} / "
        f"{msgs['dropped_with_reason']} / {msgs['of_failed_runs_only']} |",
        f"| messages lost | **{msgs['lost']}** |",
        f"| messages in dead-letter queues | **{r['dead_lettered']}** |",
        f"| queues at the end (visible, in flight) | {', '.join(f'{k}: {tuple(v)}' for k, v in msgs['queues_at_end'].items())} |",
        f"| steps whose user code ran more than once | {len(r['reruns'])} ({sum(not x['allowed'] for x in r['reruns'])} not allowed) |",
        f"| longest stall | {r['longest_stall']['seconds'] if r['longest_stall'] else 0:.1f} s |",
        f"| state rows left under `dagster-taskiq-sync/` | {r['state_rows']['total']} "
        f"({', '.join(f'{k}: {v}' for k, v in r['state_rows']['by_kind'].items()) or 'none'}) after "
        f"{r['step_attempts_sent']} step attempts |",
        f"| violations | **{len(r['violations'])}** |",
        "",
    ]


def _failed_runs(r: dict) -> list[str]:
    out = ["## Failed runs", ""]
    if not r["failures"]:
        out.append("None.")
    for f in r["failures"]:
        label = (
            "explained (documented fail-fast at run start)"
            if f.get("documented_fail_fast")
            else "explained"
            if f["explained"]
            else "**not explained**"
        )
        out.append(f"- run #{f['seq']} `{f.get('run')}` ({f['job']}, {f.get('status', 'no run')}): {label}")
        for s in f["steps"]:
            cause = s["caused_by"]
            if isinstance(cause, dict):
                cause = (
                    f"{cause['kind']} of {cause.get('worker')} (incarnation {cause.get('incarnation')}, pid "
                    f"{cause.get('pid')}) at +{cause['at']} s" + (f"; {cause['note']}" if cause.get("note") else "")
                )
            out.append(
                f"  - step `{s['step']}` at +{s['at']} s (RetryPolicy max_retries {s['retry_policy']}, "
                f"{s['attempts_with_user_code']} attempt(s) ran user code): {s['error']}  \n"
                f"    caused by: {cause}"
            )
        if not f["steps"]:
            out.append(f"  - {f['why']}")
    return out


def _reruns(r: dict) -> list[str]:
    out = ["", "## Steps whose user code ran more than once", ""]
    if not r["reruns"]:
        out.append("None.")
    for x in r["reruns"]:
        out.append(
            f"- run #{x['seq']} step `{x['step']}`: {x['starts']} starts, "
            f"{'allowed' if x['allowed'] else '**not allowed**'}: {x['why']}"
        )
    return out


def _called_lost(r: dict) -> list[str]:
    out = [
        "",
        "## Finished step attempts reported as lost",
        "",
        "Redelivered messages of attempts whose outcome was already in the run's event log (their delete "
        'failed during an outage), dropped by a worker as "already started ... (lost)": the drop is right, '
        'the word "lost" (and the note it writes in the run\'s own log) is not.',
        "",
    ]
    if not r["finished_attempts_called_lost"]:
        out.append("None.")
    for x in r["finished_attempts_called_lost"]:
        out.append(
            f"- run #{x['seq']} step `{x['step']}` (attempt {x['attempt']}): ended at +{x['ended_at']} s, "
            f"dropped at +{x['dropped_at']} s by {x['by']}: {x['why']}"
            + (f"; the run's log says: {x['run_log_says']}" if x["run_log_says"] else "")
        )
    return out


def _stall(r: dict, t0: float) -> list[str]:
    stall = r["longest_stall"]
    out = ["", "## Longest stall", ""]
    if stall:
        out.append(
            f"{stall['seconds']:.1f} s with runs pending and no step event, from +{stall['from'] - t0:.1f} s "
            f"to +{stall['to'] - t0:.1f} s. Chaos then: "
            + (
                "; ".join(
                    f"{e['kind']} at +{e['at']} s ({e['seconds']} s"
                    + (f", {e['worker']}" if e.get("worker") else "")
                    + ")"
                    for e in stall["chaos"]
                )
                or "none"
            )
            + "."
        )
    return out


def _chaos_events(r: dict) -> list[str]:
    out = ["", "## Chaos events", "", "| at (s) | event | seconds | detail |", "|---:|---|---:|---|"]
    for e in r["chaos"]["events"]:
        detail = ""
        if e["kind"] == "kill":
            detail = (
                f"{e['worker']} incarnation {e['incarnation']} (pid {e['pid']}, {len(e.get('pids', [])) - 1} "
                f"child processes, gone after {e.get('children_gone_after', float('nan')):.1f} s); "
                f"ready again after {e.get('back_after', float('nan')):.1f} s; killed mid-step: "
                f"{', '.join(e.get('killed_steps', [])) or 'none'}"
                + (f"; ORPHANS: {e['orphans']}" if e.get("orphans") else "")
            )
        out.append(f"| {e['at']} | {e['kind']} | {e['seconds']} | {detail} |")
    return out
