"""`dagster-taskiq-sync dashboard` on the session's endpoint, workers and instance, seen through a real
headless browser (Debian's chromium): a running step, dead letters (hostile ones shown as text),
peeks that take nothing away, and a redrive only with the flag, the token and the page's own origin."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dagster import serialize_value

from dagster_taskiq_sync._dagster.names import KnownExecutionState
from dagster_taskiq_sync.config.worker_config import settings_from_yaml
from dagster_taskiq_sync.ops import dashboard as board
from dagster_taskiq_sync.wire.bridge import Bridge
from dagster_taskiq_sync.wire.deliveries import DEAD_LETTER_REASON_ATTRIBUTE
from dagster_taskiq_sync.wire.messages import StepMessage, encode

from ..helpers import CLI, BackgroundRun, queue_counts, sqs_client, wait_for
from ..jobs import gated

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE_REASON = "<script>document.title='pwned'</script>"
HOSTILE_BODY = '<img src=x onerror="document.title=1">'


def need_chromium() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI") == "true":  # CI installs it: a missing browser is a broken CI, not a skip
        pytest.fail(f"chromium is not installed at {CHROMIUM}; .ci/run installs Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium); CI=true makes this a failure")


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless chromium run that downloads nothing (no sync, no component updates, no QUIC)."""
    command = [
        need_chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


class Tags(HTMLParser):
    """The elements a DOM holds and its text, as a browser built them."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []
        self.hrefs: list[str] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.hrefs += [v for k, v in attrs if k == "href" and v]

    def handle_data(self, data):
        self.text.append(data)


def get(url: str, **headers) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post(url: str, form: dict, **headers) -> tuple[int, str]:
    body = "&".join(f"{k}={urllib.request.quote(v)}" for k, v in form.items()).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/x-www-form-urlencoded", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def state(url: str) -> dict:
    return json.loads(get(url + "state.json")[1])


def queue_with_dead_letters(endpoint, queue: str) -> str:
    """``queue`` and ``queue``-dlq with a redrive policy, as `queues create` makes them (without a CLI start)."""
    client = sqs_client(endpoint.url)
    dlq = client.create_queue(QueueName=f"{queue}-dlq")["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "5"})
    client.create_queue(QueueName=queue, Attributes={"RedrivePolicy": policy})
    return queue


@pytest.fixture(scope="module")
def hostile_dlq(endpoint):
    """A queue whose dead-letter queue holds three forged dead letters with HTML in their reason and body."""
    queue = queue_with_dead_letters(endpoint, f"dash-{uuid.uuid4().hex[:6]}")
    client = sqs_client(endpoint.url)
    url = client.get_queue_url(QueueName=f"{queue}-dlq")["QueueUrl"]
    for i in range(3):
        client.send_message(
            QueueUrl=url,
            MessageBody=f"{HOSTILE_BODY} {i}",
            MessageAttributes={DEAD_LETTER_REASON_ATTRIBUTE: {"DataType": "String", "StringValue": HOSTILE_REASON}},
        )
    return queue


@pytest.fixture(scope="module")
def page(workers, run_config_file, hostile_dlq, tmp_path_factory):
    """`dagster-taskiq-sync dashboard` (read-only) on the shared queue and the hostile one; yields its URL."""
    log = tmp_path_factory.mktemp("dashboard") / "dashboard.log"
    command = [CLI, "dashboard", "-y", str(run_config_file), "--port", "0", "--refresh", "1"]
    command += ["--dagster-url", "http://dagster.example:3000", "-q", "dagster", "-q", hostile_dlq]
    with open(log, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            line = proc.stdout.readline()
            assert line.startswith("dashboard at http://127.0.0.1:"), (line, log.read_text())
            yield line.split()[2]
        finally:
            proc.terminate()
            code = proc.wait(30)
    assert code == 0, log.read_text()


def test_the_page_shows_a_running_step_linked_to_dagster_and_hostile_dead_letters_as_text(
    page, instance, executor_config, endpoint, hostile_dlq, tmp_path
):
    # Given a real dead letter: a step message for a run that does not exist, dead-lettered by a worker
    ghost_run = str(uuid.uuid4())
    client = sqs_client(endpoint.url)
    # The page shows up to 10 dead letters per queue, and a peek gets the ones SQS hands out (moto:
    # the oldest): dead letters other tests of this process left in the shared queue's DLQ would
    # hide the ghost (a loaded full run saw it), so the test starts from an empty one.
    client.purge_queue(QueueUrl=client.get_queue_url(QueueName="dagster-dlq")["QueueUrl"])
    message = StepMessage(ghost_run, "ghost_step", 1, serialize_value(KnownExecutionState()))
    client.send_message(
        QueueUrl=client.get_queue_url(QueueName="dagster")["QueueUrl"], MessageBody=encode(message, "dagster").decode()
    )
    # ... and a step a worker holds open until this test releases it
    gate = tmp_path / "gate"
    gate.mkdir()
    run = BackgroundRun(
        gated,
        instance,
        {"execution": {"config": executor_config}, "ops": {"waits_for_release": {"config": {"gate_dir": str(gate)}}}},
    )
    try:
        run_id = run.run_id()

        last: dict = {}

        def step_and_ghost_shown():
            last.update(state(page))
            steps = [s for w in last["workers"] or () for s in w["steps"]]
            running = any(s["run_id"] == run_id and s["step_key"] == "waits_for_release" for s in steps)
            return running and any(d["run_id"] == ghost_run for d in last["dead_letters"])

        try:
            wait_for(step_and_ghost_shown, timeout=90, interval=0.2, what="the running step and the dead letter")
        except AssertionError as exc:  # say what the page showed instead
            shown = {k: last.get(k) for k in ("workers", "dead_letters", "notes", "queues")}
            raise AssertionError(f"{exc}; run {run_id}, ghost {ghost_run}; /state.json had {shown}") from None
        # When a real browser loads the page
        dom = chromium(tmp_path, "--dump-dom", page).stdout
        chromium(tmp_path, f"--screenshot={tmp_path / 'dashboard.png'}", "--window-size=1200,900", page)
    finally:
        (gate / "release").touch()
    assert run.wait(120).success
    seen = Tags(dom)
    text = " ".join(seen.text)
    # Then it shows the step running, on a worker of the shared pool, linked to the Dagster UI's run page
    assert "waits_for_release" in text and "since" in text
    assert f"http://dagster.example:3000/runs/{run_id}" in seen.hrefs
    assert any(name in text for name in ("w1@", "w2@"))
    # ... the worker's dead letter with its reason (the run is unknown) and what the message was
    assert "step ghost_step (attempt 1)" in text and f"http://dagster.example:3000/runs/{ghost_run}" in seen.hrefs
    # ... and the forged dead letters' HTML as text: no element was made from it, nothing ran
    assert HOSTILE_REASON in text and HOSTILE_BODY in text
    assert "script" not in seen.tags and "img" not in seen.tags
    assert "<title>dagster-taskiq-sync</title>" in dom
    png = (tmp_path / "dashboard.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    if os.environ.get("DASHBOARD_SCREENSHOT"):  # how docs/dashboard.png is made
        Path(os.environ["DASHBOARD_SCREENSHOT"]).write_bytes(png)
    # Clean up the shared dead-letter queue: the ghost's copy goes, others stay visible (visibility 0)
    dlq_url = client.get_queue_url(QueueName="dagster-dlq")["QueueUrl"]

    def ghost_deleted() -> bool:
        answer = client.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        for m in answer.get("Messages", []):
            if ghost_run in m["Body"]:
                client.delete_message(QueueUrl=dlq_url, ReceiptHandle=m["ReceiptHandle"])
                return True
        return False

    wait_for(ghost_deleted, timeout=30, what="the ghost's dead letter to clean up")


def test_peeking_takes_no_dead_letter_and_a_read_only_page_refuses_a_redrive(page, endpoint, hostile_dlq):
    # Given the dashboard has peeked the dead-letter queue for several rounds
    first = state(page)["taken_at"]
    wait_for(lambda: state(page)["taken_at"] >= first + 2, timeout=30, what="two more collector rounds")
    shown = [d for d in state(page)["dead_letters"] if d["queue"] == hostile_dlq]
    assert len(shown) == 3 and all(d["reason"] == HOSTILE_REASON for d in shown)
    row = next(q for q in state(page)["queues"] if q["queue"] == hostile_dlq)
    client = sqs_client(endpoint.url)
    attrs = client.get_queue_attributes(
        QueueUrl=client.get_queue_url(QueueName=hostile_dlq)["QueueUrl"], AttributeNames=["All"]
    )
    assert row["max_message_size"] == int(attrs["Attributes"]["MaximumMessageSize"])
    assert row["dead_letter_depth"] == 3
    # Then every message is still there and visible (none held back by a peek)
    assert queue_counts(endpoint.url, f"{hostile_dlq}-dlq") == (3, 0)
    # When a same-origin POST asks a read-only dashboard to redrive, with any token
    origin = page.rstrip("/")
    status, body = post(page + "redrive", {"queue": hostile_dlq, "token": "x" * 32}, Origin=origin)
    # Then it is refused and nothing moved
    assert status == 403 and "without --allow-redrive" in body
    assert get(page + f"redrive?queue={hostile_dlq}")[0] == 404
    assert queue_counts(endpoint.url, f"{hostile_dlq}-dlq") == (3, 0)
    assert queue_counts(endpoint.url, hostile_dlq) == (0, 0)
    # When the dead-letter queue gets a redrive policy of its own (a receive would count toward it)
    dlq_url = client.get_queue_url(QueueName=f"{hostile_dlq}-dlq")["QueueUrl"]
    target = client.get_queue_attributes(
        QueueUrl=client.get_queue_url(QueueName="dagster-dlq")["QueueUrl"], AttributeNames=["QueueArn"]
    )
    policy = json.dumps({"deadLetterTargetArn": target["Attributes"]["QueueArn"], "maxReceiveCount": "50"})
    client.set_queue_attributes(QueueUrl=dlq_url, Attributes={"RedrivePolicy": policy})
    try:
        # Then the page stops peeking it and says why
        def not_peeked():
            doc = state(page)
            said = any("has a redrive policy of its own" in n and hostile_dlq in n for n in doc["notes"])
            return said and not any(d["queue"] == hostile_dlq for d in doc["dead_letters"])

        wait_for(not_peeked, timeout=30, interval=0.2, what="the note on the dead-letter queue's own redrive policy")
    finally:
        client.set_queue_attributes(QueueUrl=dlq_url, Attributes={"RedrivePolicy": ""})
    assert queue_counts(endpoint.url, f"{hostile_dlq}-dlq") == (3, 0)


class Browser:
    """A headless chromium driven over the DevTools protocol (aiohttp's websocket client), for
    what --dump-dom cannot do: fill in a form and submit it, as an operator's browser would."""

    def __init__(self, tmp_path: Path) -> None:
        profile = tmp_path / "cdp-profile"
        command = [need_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
        command += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
        command += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        wait_for(lambda: port_file.exists() and port_file.read_text().count("\n") >= 1, timeout=60, what="chromium")
        port = port_file.read_text().split()[0]
        targets = wait_for(
            lambda: [t for t in json.loads(get(f"http://127.0.0.1:{port}/json/list")[1]) if t["type"] == "page"]
        )
        self.ws_url = targets[0]["webSocketDebuggerUrl"]

    def run(self, steps) -> list:
        """Evaluate each (expression, wait_until) in the page; a step waits until its result is truthy."""
        import aiohttp

        async def drive() -> list:
            results, ids = [], iter(range(1, 10_000))
            async with aiohttp.ClientSession() as session, session.ws_connect(self.ws_url, max_msg_size=0) as ws:

                async def call(method: str, **params):
                    call_id = next(ids)
                    await ws.send_json({"id": call_id, "method": method, "params": params})
                    while True:
                        answer = await ws.receive_json(timeout=30)
                        if answer.get("id") == call_id:
                            return answer.get("result", {})

                for expression, until in steps:
                    deadline = time.monotonic() + 30
                    while True:
                        value = await call("Runtime.evaluate", expression=expression, returnByValue=True)
                        value = value.get("result", {}).get("value")
                        if until is None or (isinstance(value, str) and until in value) or time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0.1)
                    results.append(value)
            return results

        return asyncio.run(drive())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class OtherSite:
    """Another site on another port of this host, serving one page (a CSRF attacker's)."""

    def __init__(self, page: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SUBMIT = "document.querySelector('form').submit(); 'sent'"
BODY = "document.readyState == 'complete' ? document.body.innerText : ''"


def test_redrive_needs_the_token_a_post_and_the_pages_own_origin_also_in_a_real_browser(
    endpoint, run_config_file, tmp_path
):
    queue = f"redrive-{uuid.uuid4().hex[:6]}"
    queue_with_dead_letters(endpoint, queue)
    client = sqs_client(endpoint.url)
    dlq_url = client.get_queue_url(QueueName=f"{queue}-dlq")["QueueUrl"]
    for i in range(2):
        client.send_message(QueueUrl=dlq_url, MessageBody=f"dead {i}")
    token = "t0ken-" + uuid.uuid4().hex
    options = board.DashboardOptions(port=0, refresh=60, redrive_token=token, queues=(queue,))

    def untouched() -> bool:
        return queue_counts(endpoint.url, f"{queue}-dlq") == (2, 0) and queue_counts(endpoint.url, queue) == (0, 0)

    with Bridge() as bridge:
        server = board.start(settings_from_yaml(str(run_config_file)), options, bridge)
        url, origin = server.url + "/", server.url
        # Another site's page that posts the dashboard's form; it even knows the token, so the
        # same-origin check alone must stop it
        other = OtherSite(
            f'<form method="post" action="{url}redrive"><input name="queue" value="{queue}">'
            f'<input name="token" value="{token}"></form>'.encode()
        )
        browser = Browser(tmp_path)
        try:
            # GET shows a form and changes nothing, even with the token in the query
            status, form = get(url + f"redrive?queue={queue}&token={token}")
            assert status == 200 and 'method="post"' in form and token not in form
            # A POST without a token, with a wrong one, from another origin or from no origin: refused
            assert post(url + "redrive", {"queue": queue}, Origin=origin)[0] == 403
            assert post(url + "redrive", {"queue": queue, "token": token[:-1] + "x"}, Origin=origin)[0] == 403
            status, body = post(url + "redrive", {"queue": queue, "token": token}, Origin="http://evil.example")
            assert status == 403 and "Cross-origin" in body
            assert post(url + "redrive", {"queue": queue, "token": token}, Referer="http://evil.example/x")[0] == 403
            assert post(url + "redrive", {"queue": queue, "token": token})[0] == 403
            assert untouched()
            # When the other site's page submits its form in the operator's browser
            steps = [(f"location.href = '{other.url}'; 'go'", None), ("document.forms.length ? 'ready' : ''", "ready")]
            refused = browser.run([*steps, (SUBMIT, None), (BODY, "Cross-origin")])[-1]
            # Then the dashboard refuses it and nothing moved
            assert "Cross-origin request" in refused, refused
            assert untouched()
            # When the operator opens the page, follows "redrive…", types the token and submits
            link = "document.querySelector('a[href^=\"/redrive\"]')"
            moved = browser.run(
                [
                    (f"location.href = '{url}'; 'go'", None),
                    (f"{link} ? 'ready' : ''", "ready"),
                    (f"{link}.click(); 'clicked'", None),
                    ("document.querySelector('input[name=token]') ? 'ready' : ''", "ready"),
                    (f"document.querySelector('input[name=token]').value = '{token}'; 'typed'", None),
                    (SUBMIT, None),
                    (BODY, "Moved"),
                ]
            )[-1]
            # Requests never made the dashboard read SQS: only its collector does, once per refresh (60 s here)
            assert server.collector.rounds == 1
        finally:
            browser.close()
            other.close()
            server.stop()
    # Then the browser's own request passes the same-origin check and the messages are back
    assert "Moved 2 message(s)" in moved, moved
    assert queue_counts(endpoint.url, f"{queue}-dlq") == (0, 0) and queue_counts(endpoint.url, queue) == (2, 0)
