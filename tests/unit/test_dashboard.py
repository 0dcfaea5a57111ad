"""The dashboard's rules without an endpoint: what it escapes, how it links, which tokens it takes,
and which requests may redrive (an in-process server on loopback, a recording redriver)."""

from __future__ import annotations

import http.client
import time
from html.parser import HTMLParser
from urllib.parse import urlencode

import pytest

from dagster_taskiq_sync.errors import ConfigError
from dagster_taskiq_sync.ops.dashboard import REDRIVE_LIMIT, DashboardOptions, DashboardServer
from dagster_taskiq_sync.ops.dashboard_guard import MIN_TOKEN_CHARS, TOKEN_ENV, load_token, token_matches
from dagster_taskiq_sync.ops.dashboard_page import PageOptions, Snapshot, render_page, render_redrive_form
from dagster_taskiq_sync.ops.dead_letters import DeadLetter
from dagster_taskiq_sync.ops.queue_depths import QueueStats, WorkerSlots
from dagster_taskiq_sync.ops.redrive import RedriveResult
from dagster_taskiq_sync.storage.registry import WorkerRecord

EVIL = "<img src=x onerror=alert(1)>\"'&"
TOKEN = "s3cret-token-0123456789"
PAGE_TAGS = set(
    "html head meta title style body header h1 h2 main p span b br small code a table tr th td ul li".split()
)


class Elements(HTMLParser):
    def __init__(self, page: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attributes: list[tuple[str, str | None]] = []
        self.text = ""
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes += attrs

    def handle_data(self, data):
        self.text += data


def hostile_snapshot() -> Snapshot:
    """Every field a queue, a message or the registry can fill, filled with markup."""
    now = time.time()
    worker = WorkerRecord(
        name=f"w{EVIL}",
        host=EVIL,
        pid=1,
        queues=[EVIL],
        concurrency=2,
        running=[EVIL],
        steps=[{"run_id": f'r"{EVIL}/../x', "step_key": EVIL, "attempt": EVIL, "queue": EVIL, "since": now - 5}],
        ts=now,
    )
    queue = QueueStats(queue=EVIL, sqs_name=EVIL, dead_letter_queue=EVIL, dead_letter_depth=1, max_message_size=262144)
    queue.workers = [WorkerSlots(worker.name, "running", 2, 1, 1)]
    letter = DeadLetter(EVIL, EVIL, EVIL, now, 2, reason=EVIL, what=EVIL, run_id=EVIL, excerpt=EVIL)
    broken = QueueStats(queue="broken", sqs_name="broken", error=EVIL)
    return Snapshot(now, EVIL, [queue, broken], [worker], [letter], notes=[EVIL], error=EVIL)


def test_every_value_from_a_message_or_the_registry_is_text_on_the_page():
    page = render_page(hostile_snapshot(), PageOptions(dagster_url="http://ui:3000", allow_redrive=True))
    seen = Elements(page)
    # No element was made from the values: only the page's own tags
    assert seen.tags <= PAGE_TAGS
    assert "img" not in seen.tags and "onerror" not in {name for name, _ in seen.attributes}
    # ... and each shows as the text it is: worker, host, queue, step key, attempt, run id, reason, excerpt, notes
    assert seen.text.count(EVIL) >= 12
    assert EVIL not in page  # never raw
    # Links carry the run id percent-encoded: it cannot leave /runs/ or the attribute
    hrefs = [value for name, value in seen.attributes if name == "href"]
    assert "http://ui:3000/runs/r%22%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%22%27%26%2F..%2Fx" in hrefs
    assert all(h.startswith(("http://ui:3000/runs/", "/redrive?queue=")) for h in hrefs)


def test_a_bulk_lanes_row_points_at_its_queues_workers_and_replicas():
    workers = [WorkerSlots("w@h", "running", 2, 0, 2)]
    queue = QueueStats("q", "q", visible=3, workers=workers, replicas_needed=3, lane="q-bulk")
    lane = QueueStats("q-bulk", "q-bulk", visible=3, workers=workers, replicas_needed=None, lane_of="q")
    page = render_page(Snapshot(time.time(), "e", [queue, lane]), PageOptions())
    assert "bulk lane of q: same workers and slots, replicas counted there" in page
    assert ">None<" not in page


def test_run_ids_link_to_the_dagster_ui_only_when_its_url_is_given():
    snapshot = hostile_snapshot()
    snapshot.dead_letters = [DeadLetter("q", "q-dlq", "m", None, 1, "why", "step s (attempt 1)", "abc-123", "")]
    assert 'href="http://ui:3000/base/runs/abc-123"' in render_page(
        snapshot, PageOptions(dagster_url="http://ui:3000/base/")
    )
    assert "/runs/abc-123" not in render_page(snapshot, PageOptions())


def test_the_redrive_form_never_holds_the_token_and_read_only_pages_offer_no_redrive():
    snapshot = hostile_snapshot()
    assert "/redrive" not in render_page(snapshot, PageOptions(allow_redrive=False))
    form = render_redrive_form(snapshot.queues[0])
    assert 'method="post"' in form and 'type="password"' in form and "img" not in Elements(form).tags


def test_redrive_tokens_come_from_a_file_or_the_environment_and_are_long_enough(tmp_path):
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    assert load_token(False, None, {TOKEN_ENV: TOKEN}) is None  # read-only: no token in use
    assert load_token(True, str(secret), {}) == TOKEN
    assert load_token(True, None, {TOKEN_ENV: TOKEN}) == TOKEN
    with pytest.raises(ConfigError, match="without --allow-redrive"):
        load_token(False, str(secret), {})
    with pytest.raises(ConfigError, match="--allow-redrive needs a token"):
        load_token(True, None, {})
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match=f"has 3 characters; use at least {MIN_TOKEN_CHARS}") as short:
        load_token(True, str(tmp_path / "short"), {})
    assert "abc" not in str(short.value).replace("characters", "")  # the token itself is never shown
    with pytest.raises(ConfigError, match="--dagster-url 'localhost:3000' is not the Dagster UI's address"):
        DashboardOptions.from_flags(allow_redrive=False, token_file=None, env={}, dagster_url="localhost:3000")


def test_token_comparison():
    assert token_matches(TOKEN, TOKEN)
    assert (
        not token_matches(TOKEN[:-1], TOKEN) and not token_matches("", TOKEN) and not token_matches(TOKEN + "x", TOKEN)
    )


class FakeCollector:
    def __init__(self) -> None:
        self.latest = Snapshot(time.time(), "http://sqs", [QueueStats("jobs", "jobs", dead_letter_queue="jobs-dlq")])

    def alive(self):
        return True, "ok"

    def stop(self):
        self.stopped = True


class Redriver:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, queue: str, limit: int) -> RedriveResult:
        self.calls.append((queue, limit))
        return RedriveResult("jobs", "jobs-dlq", moved=3, failed=0, left=0)


@pytest.fixture
def serve():
    servers = []

    def start(token: str | None = TOKEN, host: str = "127.0.0.1"):
        redriver = Redriver()
        options = DashboardOptions(host=host, port=0, redrive_token=token)
        server = DashboardServer(options, FakeCollector(), redriver if token else None)  # type: ignore[arg-type]
        servers.append(server.start())
        return server, redriver

    yield start
    for server in servers:
        server.stop()


def ask(server, method: str, path: str, form: dict | None = None, **headers) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    body = urlencode(form) if form is not None else None
    if form is not None:
        headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    connection.request(method, path, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})
    answer = connection.getresponse()
    return answer.status, answer.read().decode()


def test_only_a_same_origin_post_with_the_token_redrives(serve):
    server, redriver = serve()
    origin = f"http://127.0.0.1:{server.port}"
    good = {"queue": "jobs", "token": TOKEN}
    # GET never redrives, whatever it carries
    assert ask(server, "GET", "/redrive?queue=jobs&token=" + TOKEN)[0] == 200
    # wrong or missing token, another origin, no origin at all, an unknown queue, a bad max: refused
    assert ask(server, "POST", "/redrive", {"queue": "jobs"}, Origin=origin)[0] == 403
    assert ask(server, "POST", "/redrive", {"queue": "jobs", "token": TOKEN + "x"}, Origin=origin)[0] == 403
    assert ask(server, "POST", "/redrive", good, Origin="http://evil.example")[0] == 403
    assert ask(server, "POST", "/redrive", good, Origin="null", Referer="http://evil.example/page")[0] == 403
    assert ask(server, "POST", "/redrive", good)[0] == 403
    assert ask(server, "POST", "/redrive", {**good, "queue": "other"}, Origin=origin)[0] == 400
    assert ask(server, "POST", "/redrive", {**good, "max": "-1"}, Origin=origin)[0] == 400
    assert ask(server, "POST", "/", good, Origin=origin)[0] == 405
    huge = {"queue": "jobs", "token": TOKEN, "pad": "x" * DashboardServer.MAX_BODY_BYTES}
    assert ask(server, "POST", "/redrive", huge, Origin=origin)[0] == 413  # refused from its Content-Length
    # a rebound DNS name is not this server, even with the right origin and token
    assert (
        ask(
            server,
            "POST",
            "/redrive",
            good,
            Host=f"evil.example:{server.port}",
            Origin=f"http://evil.example:{server.port}",
        )[0]
        == 421
    )
    assert redriver.calls == []
    # the page's own form (Referer alone will do when a browser sends no Origin), with the token
    status, body = ask(server, "POST", "/redrive", good, Origin=origin)
    assert status == 200 and "Moved 3 message(s)" in body
    assert ask(server, "POST", "/redrive", {**good, "max": "5"}, Referer=origin + "/redrive?queue=jobs")[0] == 200
    assert redriver.calls == [("jobs", REDRIVE_LIMIT), ("jobs", 5)]


def test_host_names_a_browser_may_use():
    def known(bind: str, host: str) -> bool:
        return DashboardServer(DashboardOptions(host=bind, port=0), FakeCollector())._known_host(host)  # not started

    assert known("127.0.0.1", "127.0.0.1:8787") and known("127.0.0.1", "localhost:9000") and known("::1", "[::1]:8787")
    assert not known("127.0.0.1", "evil.example:8787") and not known("127.0.0.1", "")
    assert known("10.1.2.3", "10.1.2.3:8787") and not known("10.1.2.3", "dashboard.evil.example")
    assert known("0.0.0.0", "any.name.example:8787")  # a wildcard bind cannot know its names


def test_without_the_flag_nothing_redrives(serve):
    server, _ = serve(token=None)
    origin = f"http://127.0.0.1:{server.port}"
    status, body = ask(server, "POST", "/redrive", {"queue": "jobs", "token": TOKEN}, Origin=origin)
    assert status == 403 and "without --allow-redrive" in body
    assert ask(server, "GET", "/redrive?queue=jobs")[0] == 404


def test_answers_carry_a_strict_content_security_policy(serve):
    server, _ = serve()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    connection.request("GET", "/")
    answer = connection.getresponse()
    assert answer.status == 200 and answer.getheader("Content-Type") == "text/html; charset=utf-8"
    policy = answer.getheader("Content-Security-Policy")
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script" not in policy
    assert answer.getheader("X-Frame-Options") == "DENY" and answer.getheader("X-Content-Type-Options") == "nosniff"


def test_the_readme_states_the_dashboards_limits_and_defaults():
    from pathlib import Path

    from dagster_taskiq_sync.ops.dead_letters import PEEK_PER_QUEUE

    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    defaults = DashboardOptions()
    assert f"every `--refresh` seconds ({defaults.refresh:g})" in readme
    assert f'<meta http-equiv="refresh" content="{defaults.refresh:g}">' in render_page(
        hostile_snapshot(), defaults.page
    )
    assert f"[--port {defaults.port}] [--host {defaults.host}]" in readme
    assert f"up to {PEEK_PER_QUEUE} dead letters per queue" in readme
    assert f"at least {MIN_TOKEN_CHARS} characters" in readme and f"at most {REDRIVE_LIMIT} per click" in readme
    assert f"`{TOKEN_ENV}`" in readme


def test_the_commands_defaults_are_the_dashboards():
    from dagster_taskiq_sync.cli import dashboard

    flags = {p.name: p.default for p in dashboard.params}
    defaults = DashboardOptions()
    assert (flags["host"], flags["port"], flags["refresh"]) == (defaults.host, defaults.port, defaults.refresh)


def test_what_a_worker_records_of_a_step_and_of_a_whole_run_and_what_the_page_makes_of_it():
    from types import SimpleNamespace

    from dagster_taskiq_sync.ops.dashboard_page import running_steps
    from dagster_taskiq_sync.wire.messages import RunMessage, StepMessage, TaskKind
    from dagster_taskiq_sync.worker.request import Request

    step, whole = (Request(SimpleNamespace(queue="q", message_id="m"), SimpleNamespace()) for _ in range(2))
    step.message = StepMessage("run-1", "emit_one", 2, "{}")
    whole.message = RunMessage(TaskKind.RUN, "run-2", "launch")
    entries = [step.registry_entry(), whole.registry_entry()]
    assert [(e["run_id"], e["step_key"], e["attempt"], e["queue"]) for e in entries] == [
        ("run-1", "emit_one", 2, "q"),
        ("run-2", None, None, "q"),
    ]
    worker = WorkerRecord("w@h", "h", 1, ["q"], 2, running=["emit_one", "run run-2"], steps=entries, ts=time.time())
    page = render_page(Snapshot(time.time(), "e", workers=[worker]), PageOptions(dagster_url="http://ui"))
    assert "emit_one" in page and "whole run" in page and 'href="http://ui/runs/run-2"' in page
    # a record from a worker that predates `steps` still shows its step keys
    older = WorkerRecord.from_json(
        '{"name": "old@h", "host": "h", "pid": 1, "queues": ["q"], "concurrency": 1, "running": ["a_step"]}'
    )
    assert older is not None and [s["step_key"] for s in running_steps(older)] == ["a_step"]
    assert (
        WorkerRecord.from_json(
            '{"name": "x", "queues": [], "host": "h", "pid": 1, "concurrency": 1, "steps": "junk"}'
        ).steps
        == []
    )


@pytest.mark.parametrize(
    "args, env, expected",
    [
        (
            ["--allow-redrive"],
            {},
            "Error: --allow-redrive needs a token and DAGSTER_TASKIQ_SYNC_DASHBOARD_TOKEN gives none",
        ),
        (["--allow-redrive"], {TOKEN_ENV: "short"}, "has 5 characters; use at least 16"),
        (["--redrive-token-file", "TOKEN_FILE"], {}, "is given without --allow-redrive"),
        (["--dagster-url", "localhost:3000"], {}, "is not the Dagster UI's address"),
        (["--refresh", "0"], {}, "Invalid value for '--refresh'"),
    ],
)
def test_the_command_refuses_bad_flags_with_one_sentence_before_serving(args, env, expected, monkeypatch, tmp_path):
    from click.testing import CliRunner

    from dagster_taskiq_sync import cli
    from dagster_taskiq_sync.ops import dashboard

    def must_not_serve(*a, **k):
        raise AssertionError("the dashboard started: this input should have been refused first")

    monkeypatch.setattr(dashboard, "start", must_not_serve)
    (tmp_path / "token").write_text(TOKEN)
    args = [str(tmp_path / "token") if a == "TOKEN_FILE" else a for a in args]
    env = {TOKEN_ENV: None, **env}  # None: unset in the runner
    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2 mixes stderr into stdout by default
    except TypeError:
        runner = CliRunner()
    result = runner.invoke(cli.main, ["dashboard", *args], env=env, catch_exceptions=False)
    assert result.exit_code in (1, 2) and expected in result.stderr, result.stderr
    assert TOKEN not in result.stderr and "short" not in result.stderr.replace("characters", "")
