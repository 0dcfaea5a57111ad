"""What the operator page looks like: a snapshot of queues, workers and dead letters as HTML.

Every value that comes from a queue, a message or the worker registry is text someone else wrote
(a worker name, a step key, a dead letter's reason and body): each goes through :func:`esc` (or,
in a link, :func:`urllib.parse.quote` first), so the page never carries markup it did not write.
The page has no script; it reloads itself with a meta refresh, and its one style sheet is allowed
by hash in the Content-Security-Policy (:data:`CSP`), so even a value that slipped past escaping
could run nothing.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from dagster_taskiq_sync.ops.dead_letters import DeadLetter
from dagster_taskiq_sync.ops.queue_depths import QueueStats
from dagster_taskiq_sync.storage.registry import WorkerRecord

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2430;background:#f5f6f8}
header{background:#1f2430;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}
header h1{font-size:17px;margin:0}header span{color:#b8bfcc}
main{padding:4px 20px 20px}h2{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;background:#fff;width:100%;box-shadow:0 1px 2px #0002}
th,td{text-align:left;padding:5px 9px;border-bottom:1px solid #e3e6eb;vertical-align:top}
th{background:#eef0f4;font-weight:600;font-size:12px;text-transform:uppercase;color:#4a5263}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#17803d}.warn{color:#b45309;font-weight:600}.bad{color:#b91c1c;font-weight:600}.dim{color:#6b7280}
.step{display:block;margin-bottom:3px}.step small{color:#4a5263}td.t{white-space:nowrap}
code{font:12px ui-monospace,monospace;background:#f0f1f4;padding:1px 3px;word-break:break-all}a code{white-space:nowrap}
ul.notes{color:#92400e}form p{margin:8px 0}input{font:inherit;padding:3px 6px}
"""
CSP = (
    "default-src 'none'; "
    f"style-src 'sha256-{base64.b64encode(hashlib.sha256(CSS.encode()).digest()).decode()}'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def esc(value: Any) -> str:
    """``value`` as HTML text (quotes too, so it is safe in an attribute)."""
    return html.escape(str(value), quote=True)


@dataclass
class Snapshot:
    """What the page shows, collected in one round (``dashboard.Collector``)."""

    taken_at: float
    endpoint: str
    queues: list[QueueStats] = field(default_factory=list)
    workers: list[WorkerRecord] | None = None  # None: the registry could not be read
    dead_letters: list[DeadLetter] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # SQS could not be read at all

    def as_dict(self) -> dict[str, Any]:
        return {
            "taken_at": self.taken_at,
            "endpoint": self.endpoint,
            "queues": [q.as_dict() for q in self.queues],
            "workers": None if self.workers is None else [_worker_dict(w, self.taken_at) for w in self.workers],
            "dead_letters": [d.as_dict() for d in self.dead_letters],
            "notes": self.notes,
            "error": self.error,
        }


@dataclass(frozen=True)
class PageOptions:
    refresh: float = 5.0
    dagster_url: str | None = None  # the Dagster UI; run ids link to {dagster_url}/runs/{run_id}
    allow_redrive: bool = False


def _worker_dict(worker: WorkerRecord, now: float) -> dict[str, Any]:
    return {
        "name": worker.name,
        "host": worker.host,
        "pid": worker.pid,
        "queues": worker.queues,
        "concurrency": worker.concurrency,
        "state": worker.state if worker.looks_alive(now) else "lost?",
        "heartbeat_age": round(worker.age(now), 1),
        "steps": running_steps(worker),
    }


def running_steps(worker: WorkerRecord) -> list[dict[str, Any]]:
    """The worker's running steps as {run_id, step_key, attempt, queue, since}; a record from a
    worker older than the ``steps`` field gives step keys only."""
    if worker.steps:
        return [{k: s.get(k) for k in ("run_id", "step_key", "attempt", "queue", "since")} for s in worker.steps]
    return [{"run_id": None, "step_key": key, "attempt": None, "queue": None, "since": None} for key in worker.running]


def _clock(ts: Any) -> str:
    try:
        moment = datetime.datetime.fromtimestamp(float(ts), datetime.timezone.utc)
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(value: int | None) -> str:
    if value is None:
        return "?"
    if value % 1024 == 0:
        return f"{value // 1024 // 1024} MiB" if value % (1024 * 1024) == 0 else f"{value // 1024} KiB"
    return f"{value} B"


def run_link(run_id: Any, options: PageOptions) -> str:
    """The run id, linked to the Dagster UI's run page when its URL is configured."""
    if not run_id:
        return '<span class="dim">-</span>'
    # The first 8 characters, as the Dagster UI shows run ids; the whole id in the title and link.
    text = f'<code title="{esc(run_id)}">{esc(str(run_id)[:8])}</code>'
    if not options.dagster_url:
        return text
    href = f"{options.dagster_url.rstrip('/')}/runs/{quote(str(run_id), safe='')}"
    return f'<a href="{esc(href)}" rel="noreferrer">{text}</a>'


def _queues(snapshot: Snapshot, options: PageOptions) -> str:
    rows = []
    for q in snapshot.queues:
        if q.error:
            rows.append(f'<tr><td>{esc(q.queue)}</td><td colspan="8" class="bad">{esc(q.error)}</td></tr>')
            continue
        if q.dead_letter_queue is None:
            dlq = '<span class="dim">none</span>'
        elif q.dead_letter_error:
            dlq = f'{esc(q.dead_letter_queue)}: <span class="bad">missing</span>'
        else:
            depth = q.dead_letter_depth or 0
            dlq = f'{esc(q.dead_letter_queue)}: <span class="{"bad" if depth else "ok"}">{depth}</span>'
            if depth and options.allow_redrive:
                dlq += f' <a href="/redrive?queue={esc(quote(q.queue, safe=""))}">redrive…</a>'
        live = "?" if q.workers is None else len(q.workers)
        free = "?" if q.free_slots is None else q.free_slots
        starved = q.workers is not None and not q.workers and (q.visible or q.delayed)
        pool = (  # a bulk lane's workers are its queue's (one set of slots); that row's replicas count it
            f'<td colspan="3" class="dim">bulk lane of {esc(q.lane_of)}: same workers and slots, replicas counted '
            "there</td>"
            if q.lane_of
            else f'<td class="n{" warn" if starved else ""}">{live}</td><td class="n">{free}</td>'
            f'<td class="n">{q.replicas_needed}</td>'
        )
        rows.append(
            f"<tr><td><b>{esc(q.queue)}</b><br><span class='dim'>{esc(q.sqs_name)}</span></td>"
            f'<td class="n">{q.visible}</td><td class="n">{q.in_flight}</td><td class="n">{q.delayed}</td>'
            f"<td>{dlq}</td><td class='n'>{_size(q.max_message_size)}</td>{pool}</tr>"
        )
    head = "<tr><th>queue</th><th>visible</th><th>in flight</th><th>delayed</th><th>dead-letter queue</th>"
    head += "<th>max message</th><th>live workers</th><th>free slots</th><th>replicas needed</th></tr>"
    return f'<table id="queues">{head}{"".join(rows)}</table>'


def _steps(worker: WorkerRecord, now: float, options: PageOptions) -> str:
    shown = []
    for step in running_steps(worker):
        key = step["step_key"]
        name = f"<b>{esc(key)}</b>" if key else "<b>whole run</b>"
        details = [f"run {run_link(step['run_id'], options)}"] if step.get("run_id") else []
        if step.get("attempt") not in (None, ""):
            details.append(f"attempt {esc(step['attempt'])}")
        if step.get("since"):
            try:
                details.append(f"since {_clock(step['since'])} ({_ago(now - float(step['since']))})")
            except (TypeError, ValueError):
                details.append("since ?")
        shown.append(f'<span class="step">{name} <small>{" · ".join(details)}</small></span>')
    return "".join(shown) or '<span class="dim">idle</span>'


def _workers(snapshot: Snapshot, options: PageOptions) -> str:
    if snapshot.workers is None:
        return '<p class="dim">Workers are unknown (see the notes below).</p>'
    if not snapshot.workers:
        return '<p class="dim">No worker is registered.</p>'
    now = snapshot.taken_at
    rows = []
    for w in sorted(snapshot.workers, key=lambda r: r.name):
        alive = w.looks_alive(now)
        state = w.state if alive else "lost?"
        css = "ok" if state == "running" else ("bad" if not alive else "warn")
        busy = len(running_steps(w))
        rows.append(
            f"<tr><td><b>{esc(w.name)}</b><br><span class='dim'>{esc(w.host)} pid {esc(w.pid)}</span></td>"
            f"<td>{esc(', '.join(map(str, w.queues)))}</td><td class='{css}'>{esc(state)}</td>"
            f'<td class="n">{busy} / {esc(w.concurrency)}</td><td class="n">{_ago(w.age(now))} ago</td>'
            f"<td>{_steps(w, now, options)}</td></tr>"
        )
    head = "<tr><th>worker</th><th>queues</th><th>state</th><th>slots used</th><th>heartbeat</th><th>running</th></tr>"
    return f'<table id="workers">{head}{"".join(rows)}</table>'


def _dead_letters(letters: Sequence[DeadLetter], options: PageOptions) -> str:
    if not letters:
        return '<p class="dim">No dead letters.</p>'
    rows = []
    for d in letters:
        excerpt = f"<br><code>{esc(d.excerpt)}</code>" if d.excerpt else ""
        rows.append(
            f"<tr><td>{esc(d.queue)}<br><span class='dim'>{esc(d.dead_letter_queue)}</span></td>"
            f"<td class='t'>{_clock(d.sent_at)}</td><td>{esc(d.what)}{excerpt}</td><td>{run_link(d.run_id, options)}</td>"
            f"<td>{esc(d.reason)}</td><td><code>{esc(d.message_id)}</code></td></tr>"
        )
    head = "<tr><th>queue</th><th>dead-lettered</th><th>message</th><th>run</th><th>reason</th>"
    head += "<th>message id</th></tr>"
    return f'<table id="dead-letters">{head}{"".join(rows)}</table>'


def _document(title: str, body: str, refresh: float | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh:g}">' if refresh else ""
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{meta}'
        f'<meta name="viewport" content="width=device-width"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )


def render_page(snapshot: Snapshot, options: PageOptions) -> str:
    """The whole page for one snapshot."""
    mode = "redrive allowed (token required)" if options.allow_redrive else "read-only"
    header = (
        f"<header><h1>dagster-taskiq-sync</h1><span>{esc(snapshot.endpoint)}</span>"
        f"<span>as of {_clock(snapshot.taken_at)}, every {options.refresh:g} s</span><span>{mode}</span></header>"
    )
    error = f'<p class="bad">{esc(snapshot.error)}</p>' if snapshot.error else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in snapshot.notes)
    body = (
        f"{header}<main>{error}<h2>Queues</h2>{_queues(snapshot, options)}"
        f"<h2>Workers</h2>{_workers(snapshot, options)}"
        f"<h2>Recent dead letters</h2>{_dead_letters(snapshot.dead_letters, options)}"
        f"{f'<ul class=notes>{notes}</ul>' if notes else ''}</main>"
    )
    return _document("dagster-taskiq-sync", body, refresh=options.refresh)


def render_redrive_form(queue: QueueStats) -> str:
    """The confirmation form for moving ``queue``'s dead letters back (no refresh: a token is typed)."""
    body = (
        f"<header><h1>Redrive {esc(queue.queue)}</h1></header><main>"
        f"<p>Move up to the {queue.dead_letter_depth or 0} message(s) in <b>{esc(queue.dead_letter_queue)}</b> "
        f"back to <b>{esc(queue.sqs_name)}</b>, as <code>dagster-taskiq-sync queues redrive</code> does.</p>"
        '<form method="post" action="/redrive">'
        f'<input type="hidden" name="queue" value="{esc(queue.queue)}">'
        '<p><label>Token <input type="password" name="token" autocomplete="off" required></label></p>'
        '<p><label>At most <input type="number" name="max" min="1" placeholder="all"> message(s)</label></p>'
        '<p><button type="submit">Redrive</button> <a href="/">back</a></p></form></main>'
    )
    return _document(f"redrive {queue.queue}", body)


def render_message(title: str, text: str, ok: bool) -> str:
    """A one-sentence answer page (a redrive's result, or why it was refused)."""
    body = (
        f'<header><h1>{esc(title)}</h1></header><main><p class="{"ok" if ok else "bad"}">{esc(text)}</p>'
        '<p><a href="/">back to the dashboard</a></p></main>'
    )
    return _document(title, body)
