"""Operating a fleet: metrics exposition, health probes, scale-in protection, the deploy/ kit.

Everything here is fast and local: real HTTP on 127.0.0.1 (the worker's health server, and
recording servers standing in for the ECS agent and the Kubernetes API server), no SQS.
Waits have deadlines only so a broken build fails instead of hanging; nothing asserts timing.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dagster_taskiq_sync.metrics import (
    ORCHESTRATOR_METRICS,
    SQS_METRICS,
    WORKER_METRICS,
    NullMetrics,
    NullOrchestratorMetrics,
    OrchestratorMetrics,
    WorkerMetrics,
    metrics_reference_markdown,
)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds; the deadline only keeps a broken build from hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def exercise(metrics: NullMetrics) -> None:
    """Call every worker metrics method once, as a worker running one step of each outcome would."""
    metrics.step_received("dagster")
    metrics.step_started("dagster", "etl", waited=0.7)
    metrics.step_succeeded("dagster", "etl", 1.5)
    metrics.step_failed("dagster", "etl", 0.2)
    metrics.step_killed("dagster", "etl", 30.0)
    metrics.step_dropped_duplicate("dagster")
    metrics.message_dead_lettered("dagster", "malformed")
    metrics.visibility_extended(3)
    metrics.s3_offload_read(300_000)
    metrics.sqs_call("ReceiveMessage", 0.05)
    metrics.sqs_call("DeleteMessage", 0.01, error="AWS.SimpleQueueService.NonExistentQueue")
    metrics.step_child_recycled("max_tasks")
    metrics.track_slots(lambda: (2, 2, 1))


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


# --- metrics ---------------------------------------------------------------------------------


def test_given_every_method_called_when_scraped_then_every_declared_metric_is_exposed_with_its_type_and_labels():
    metrics = WorkerMetrics()
    exercise(metrics)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    found = families(body.decode())
    for spec in WORKER_METRICS + SQS_METRICS:
        # The parser names a counter family without its _total suffix.
        family = found[spec.full_name]
        assert family.type == spec.kind, spec.name
        sample_labels = {key for sample in family.samples for key in sample.labels if key != "le"}
        assert sample_labels == set(spec.labels), spec.name


def test_metric_names_follow_prometheus_conventions():
    for spec in WORKER_METRICS + SQS_METRICS + ORCHESTRATOR_METRICS:
        assert spec.exposed_name.startswith("dagster_taskiq_")
        assert (spec.kind == "counter") == spec.exposed_name.endswith("_total"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith("_seconds"), spec.name
        if "bytes" in spec.name:
            assert spec.exposed_name.endswith("_bytes_total"), spec.name


def test_exposed_values_are_what_the_worker_reported():
    metrics = WorkerMetrics()
    exercise(metrics)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families(metrics.render()[0].decode()).values() for s in f.samples}
    assert samples[("dagster_taskiq_worker_steps_killed_total", (("queue", "dagster"),))] == 1
    assert samples[("dagster_taskiq_worker_busy_slots", ())] == 2
    assert samples[("dagster_taskiq_worker_free_slots", ())] == 2
    assert samples[("dagster_taskiq_worker_prefetched_messages", ())] == 1
    assert samples[("dagster_taskiq_worker_visibility_extensions_total", ())] == 3
    assert samples[("dagster_taskiq_worker_s3_offload_read_bytes_total", ())] == 300_000
    assert samples[("dagster_taskiq_worker_step_duration_seconds_count", (("job", "etl"), ("queue", "dagster")))] == 3
    assert samples[("dagster_taskiq_worker_step_queue_wait_seconds_sum", (("job", "etl"), ("queue", "dagster")))] == 0.7
    assert samples[("dagster_taskiq_sqs_call_errors_total",
                    (("action", "DeleteMessage"), ("error", "AWS.SimpleQueueService.NonExistentQueue")))] == 1
    # Step duration buckets cover 50 ms .. 1 h.
    les = {s.labels["le"] for f in families(metrics.render()[0].decode()).values() for s in f.samples
           if s.name == "dagster_taskiq_worker_step_duration_seconds_bucket"}
    assert {"0.05", "3600.0", "+Inf"} <= les


def test_labels_from_open_ended_input_stay_bounded():
    metrics = WorkerMetrics()
    metrics.message_dead_lettered("dagster", "a reason nobody declared")
    metrics.step_child_recycled("cosmic rays")
    botocore = pytest.importorskip("botocore.exceptions")
    error = botocore.ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "SendMessage")
    metrics.sqs_call("SendMessage", 1.0, error=error)
    metrics.sqs_call("SendMessage", 1.0, error=TimeoutError("read timed out on a very long and specific URL"))
    text = metrics.render()[0].decode()
    assert 'reason="other"' in text and "nobody declared" not in text and "cosmic" not in text
    assert 'error="ThrottlingException"' in text and 'error="TimeoutError"' in text


def test_each_worker_has_its_own_registry_and_the_global_one_is_untouched():
    first, second = WorkerMetrics(), WorkerMetrics()  # two workers in one process must not collide
    first.step_received("dagster")
    assert "dagster_taskiq_worker_steps_received_total" in first.render()[0].decode()
    assert 'queue="dagster"' not in second.render()[0].decode()
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("dagster_taskiq_")]


def test_null_metrics_has_every_method_with_the_same_signature_and_does_nothing():
    for real, null in ((WorkerMetrics, NullMetrics), (OrchestratorMetrics, NullOrchestratorMetrics)):
        public = {name for name, _ in inspect.getmembers(real, inspect.isfunction) if not name.startswith("_")}
        for name in public:
            assert inspect.signature(getattr(real, name)) == inspect.signature(getattr(null, name)), name
    exercise(NullMetrics())  # the worker calls these unconditionally
    assert NullMetrics().render()[0] == b""


def test_orchestrator_in_flight_series_disappears_when_its_run_ends():
    metrics = OrchestratorMetrics()
    metrics.step_sent("dagster", 0.02)
    metrics.step_send_failed("dagster")
    metrics.steps_in_flight("run-1", "etl", 3)
    metrics.sqs_call("SendMessageBatch", 0.03)
    found = families(metrics.render()[0].decode())
    for spec in ORCHESTRATOR_METRICS + SQS_METRICS:
        assert found[spec.full_name].type == spec.kind
    assert 'run_id="run-1"' in metrics.render()[0].decode()
    metrics.run_finished("run-1", "etl")
    metrics.run_finished("run-1", "etl")  # twice is harmless
    assert 'run_id="run-1"' not in metrics.render()[0].decode()


def test_a_scraper_asking_for_openmetrics_gets_it():
    metrics = WorkerMetrics()
    exercise(metrics)
    body, content_type = metrics.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


# --- health server ---------------------------------------------------------------------------


def get(url: str, accept: str | None = None, method: str = "GET") -> tuple[int, str, str]:
    """(status, content type, body) of one real HTTP request."""
    request = urllib.request.Request(url, method=method, headers={"Accept": accept} if accept else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


class Switch:
    """A live() or ready() check the test flips."""

    def __init__(self) -> None:
        self.ok, self.reason = True, ""

    def __call__(self) -> tuple[bool, str]:
        return self.ok, self.reason

    def fail(self, reason: str) -> None:
        self.ok, self.reason = False, reason


@pytest.fixture
def health():
    from dagster_taskiq_sync.health_server import HealthServer

    metrics = WorkerMetrics()
    exercise(metrics)
    live, ready = Switch(), Switch()
    server = HealthServer(0, live=live, ready=ready, metrics=metrics).start()
    yield server, live, ready
    server.stop()


def test_metrics_are_scraped_over_http(health):
    server, _, _ = health
    status, content_type, body = get(server.url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    assert families(body)["dagster_taskiq_worker_steps_started"].samples[0].value == 1
    status, content_type, body = get(server.url + "/metrics", accept="application/openmetrics-text")
    assert status == 200 and content_type.startswith("application/openmetrics-text")


def test_probes_answer_ok_then_503_with_the_reason_when_a_check_flips(health):
    server, live, ready = health
    assert get(server.url + "/livez") == (200, "text/plain; charset=utf-8", "ok\n")
    assert get(server.url + "/readyz") == (200, "text/plain; charset=utf-8", "ok\n")

    ready.fail("draining: SIGTERM received, finishing 2 running step(s)")
    assert get(server.url + "/readyz")[::2] == (503, "draining: SIGTERM received, finishing 2 running step(s)\n")
    assert get(server.url + "/livez")[0] == 200  # not ready is never a reason to restart

    live.fail("worker thread worker-thread:1 died")
    assert get(server.url + "/livez")[::2] == (503, "worker thread worker-thread:1 died\n")

    ready.ok = live.ok = True
    assert get(server.url + "/readyz")[0] == get(server.url + "/livez")[0] == 200


def test_a_check_that_raises_answers_503_and_the_server_keeps_serving():
    from dagster_taskiq_sync.health_server import HealthServer

    def broken() -> tuple[bool, str]:
        raise RuntimeError("bridge portal is gone")

    with HealthServer(0, live=broken, ready=broken, metrics=WorkerMetrics()) as server:
        status, _, body = get(server.url + "/livez")
        assert status == 503 and "RuntimeError: bridge portal is gone" in body
        assert get(server.url + "/metrics")[0] == 200


def test_unknown_paths_are_404_and_head_works(health):
    server, _, _ = health
    status, _, body = get(server.url + "/")
    assert status == 404 and "/metrics, /livez, /readyz" in body
    assert get(server.url + "/readyz", method="HEAD")[::2] == (200, "")


def test_a_port_in_use_is_one_sentence_naming_the_flag_and_the_fix(health):
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.health_server import HealthServer

    server, _, _ = health
    with pytest.raises(ConfigError) as caught:
        HealthServer(server.port, live=Switch(), ready=Switch(), metrics=WorkerMetrics()).start()
    message = str(caught.value)
    assert message.startswith(f"--metrics-port {server.port} is already in use on 127.0.0.1; pick another port")
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_host_that_is_not_this_machine_names_metrics_host():
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.health_server import HealthServer

    with pytest.raises(ConfigError, match=r"^--metrics-host '192\.0\.2\.1' is not an address of this machine; .*0\.0\.0\.0"):
        HealthServer(0, "192.0.2.1", live=Switch(), ready=Switch(), metrics=WorkerMetrics()).start()


def test_stop_joins_the_thread_and_frees_the_port():
    from dagster_taskiq_sync.health_server import HealthServer

    server = HealthServer(0, live=Switch(), ready=Switch(), metrics=WorkerMetrics()).start()
    port, thread = server.port, server._thread
    assert get(server.url + "/livez")[0] == 200
    server.stop()
    assert thread is not None and not thread.is_alive()
    with HealthServer(port, live=Switch(), ready=Switch(), metrics=WorkerMetrics()) as again:
        assert get(again.url + "/livez")[0] == 200
    server.stop()  # a second stop is harmless


# --- scale-in protection ---------------------------------------------------------------------


class Recorder:
    """A local HTTP(S) server standing in for the ECS agent or the Kubernetes API server: it records
    every call and answers with ``self.answer`` (status, JSON body)."""

    def __init__(self, tls: tuple[str, str] | None = None) -> None:
        self.calls: list[dict] = []
        self.answer: tuple[int, dict] = (200, {})
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                recorder.calls.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                       "body": json.loads(raw) if raw else None})
                status, body = recorder.answer
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_PUT = do_PATCH = do_GET = _record

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        scheme = "http"
        if tls:
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def bodies(self) -> list:
        return [call["body"] for call in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


def ecs(recorder: Recorder, **options):
    from dagster_taskiq_sync.scale_in import protector_from_flag

    options.setdefault("idle_delay", 0)
    return protector_from_flag("ecs", env={"ECS_AGENT_URI": recorder.url + "/api/task-1"}, **options)


def test_ecs_protection_follows_busy_and_idle_through_the_agent_endpoint(recorder):
    protector = ecs(recorder).start()
    assert protector.flush(10)  # start clears whatever a previous container left
    protector.set_busy(True)
    assert protector.flush(10)
    protector.set_busy(False)
    assert protector.flush(10)
    protector.stop()
    assert [(c["method"], c["path"]) for c in recorder.calls] == [("PUT", "/api/task-1/task-protection/v1/state")] * 3
    assert recorder.calls[1]["headers"]["Content-Type"] == "application/json"
    assert recorder.bodies() == [
        {"ProtectionEnabled": False},
        {"ProtectionEnabled": True, "ExpiresInMinutes": 60},
        {"ProtectionEnabled": False},
    ]


def test_ecs_protection_is_renewed_while_the_worker_stays_busy(recorder):
    protector = ecs(recorder, expires_minutes=1, renew_interval=0.05).start()
    protector.set_busy(True)
    # A step that outlives ExpiresInMinutes stays protected: the PUT is repeated while busy.
    assert wait_until(lambda: recorder.bodies().count({"ProtectionEnabled": True, "ExpiresInMinutes": 1}) >= 3)
    protector.stop()
    assert recorder.bodies()[-1] == {"ProtectionEnabled": False}


def test_a_worker_idle_for_a_moment_between_steps_stays_protected(recorder):
    protector = ecs(recorder, idle_delay=3600).start()
    assert protector.flush(10)
    for busy in (True, False, True, False, True):  # one step ends, the next starts
        protector.set_busy(busy)
    assert protector.flush(10)
    assert recorder.bodies() == [{"ProtectionEnabled": False}, {"ProtectionEnabled": True, "ExpiresInMinutes": 60}]
    protector.stop()  # stopping clears at once, whatever the idle delay
    assert recorder.bodies()[-1] == {"ProtectionEnabled": False} and len(recorder.calls) == 3


def test_agent_failures_never_reach_the_worker_and_are_logged_once_per_kind(recorder, caplog):
    caplog.set_level("DEBUG", logger="dagster_taskiq_sync.scale_in")
    recorder.answer = (200, {"failure": {"Arn": "arn:aws:ecs:task/1", "Reason": "TASK_NOT_VALID",
                                         "Detail": "The task is not part of a service"}})
    protector = ecs(recorder, retry_initial=0.01, retry_max=0.02).start()
    protector.set_busy(True)  # returns at once and never raises, whatever the agent says
    assert wait_until(lambda: len(recorder.calls) >= 4)
    recorder.answer = (400, {"error": {"Code": "AccessDeniedException", "Message": "not authorized to perform: "
                                                                                   "ecs:UpdateTaskProtection"}})
    seen = len(recorder.calls)
    assert wait_until(lambda: len(recorder.calls) >= seen + 3)
    recorder.answer = (200, {"protection": {"ProtectionEnabled": True, "TaskArn": "arn:aws:ecs:task/1"}})
    assert protector.flush(10)
    protector.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings
    assert "TASK_NOT_VALID" in warnings[0] and "ecs:UpdateTaskProtection" in warnings[1]
    assert any("calls succeed again" in r.getMessage() for r in caplog.records if r.levelname == "INFO")


def test_an_unreachable_agent_does_not_hold_up_stop():
    from dagster_taskiq_sync.scale_in import ECSTaskProtection

    closed = Recorder()
    closed.close()  # nothing listens on this port any more
    protector = ECSTaskProtection(closed.url, idle_delay=0, retry_initial=0.01, timeout=1).start()
    protector.set_busy(True)
    assert not protector.flush(0.2)
    protector.stop(timeout=5)
    assert protector._thread is not None and not protector._thread.is_alive()


def test_ecs_without_the_agent_variable_is_one_sentence_naming_the_flag():
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.scale_in import protector_from_flag

    with pytest.raises(ConfigError, match=r"^--scale-in-protection ecs needs ECS_AGENT_URI, .* drop the flag\.$"):
        protector_from_flag("ecs", env={})
    with pytest.raises(ConfigError, match=r"^--scale-in-protection 'swarm' is not a platform .*ecs, k8s\.$"):
        protector_from_flag("swarm", env={})
    assert protector_from_flag(None).flush(0)  # no flag: a protector that does nothing


@pytest.fixture
def service_account(tmp_path):
    """A pod's service-account directory: token, namespace (and ca.crt for the TLS test)."""
    (tmp_path / "token").write_text("token-1\n")
    (tmp_path / "namespace").write_text("workers\n")
    return tmp_path


def k8s_env(service_account: Path, **extra) -> dict:
    from dagster_taskiq_sync.scale_in import K8S_SERVICEACCOUNT_DIR_ENV

    return {K8S_SERVICEACCOUNT_DIR_ENV: str(service_account), "POD_NAME": "worker-7d9f-abcde", **extra}


def test_k8s_deletion_cost_is_patched_on_the_pod_with_the_service_account_token(recorder, service_account):
    from dagster_taskiq_sync.scale_in import K8S_API_URL_ENV, protector_from_flag

    env = k8s_env(service_account, **{K8S_API_URL_ENV: recorder.url})
    protector = protector_from_flag("k8s", env=env, idle_delay=0).start()
    assert protector.flush(10)
    protector.set_busy(True)
    assert protector.flush(10)
    (service_account / "token").write_text("token-2\n")  # the kubelet rotates projected tokens
    protector.set_busy(False)
    assert protector.flush(10)
    protector.stop()
    assert {(c["method"], c["path"]) for c in recorder.calls} == {("PATCH", "/api/v1/namespaces/workers/pods/worker-7d9f-abcde")}
    assert {c["headers"]["Content-Type"] for c in recorder.calls} == {"application/merge-patch+json"}
    assert [c["headers"]["Authorization"] for c in recorder.calls] == ["Bearer token-1", "Bearer token-1", "Bearer token-2"]
    cost = "controller.kubernetes.io/pod-deletion-cost"
    assert recorder.bodies() == [
        {"metadata": {"annotations": {cost: None}}},  # null removes it
        {"metadata": {"annotations": {cost: "10000"}}},
        {"metadata": {"annotations": {cost: None}}},
    ]


def test_k8s_in_cluster_config_reaches_the_api_server_over_tls_verified_with_the_pod_ca(service_account):
    # The real thing: https://KUBERNETES_SERVICE_HOST:PORT, certificate checked against ca.crt.
    cert, key = self_signed_certificate(service_account, "127.0.0.1")
    (service_account / "ca.crt").write_bytes(Path(cert).read_bytes())
    api = Recorder(tls=(cert, key))
    try:
        from dagster_taskiq_sync.scale_in import protector_from_flag

        env = k8s_env(service_account, KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(api.port),
                      POD_NAMESPACE="batch")
        protector = protector_from_flag("k8s", env=env, idle_delay=0, busy_cost=500).start()
        protector.set_busy(True)
        assert protector.flush(10)
        protector.stop()
    finally:
        api.close()
    assert api.calls[-1]["path"] == "/api/v1/namespaces/batch/pods/worker-7d9f-abcde"  # POD_NAMESPACE wins
    assert api.bodies()[-1] == {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": None}}}
    assert {"metadata": {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "500"}}} in api.bodies()


def test_k8s_rbac_refusal_is_logged_with_the_api_servers_reason(recorder, service_account, caplog):
    from dagster_taskiq_sync.scale_in import K8S_API_URL_ENV, protector_from_flag

    recorder.answer = (403, {"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                             "message": 'pods "worker-7d9f-abcde" is forbidden: User "system:serviceaccount:'
                                        'workers:default" cannot patch resource "pods"'})
    env = k8s_env(service_account, **{K8S_API_URL_ENV: recorder.url})
    protector = protector_from_flag("k8s", env=env, idle_delay=0, retry_initial=0.01, retry_max=0.02).start()
    protector.set_busy(True)
    assert wait_until(lambda: len(recorder.calls) >= 3)
    protector.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0] and 'cannot patch resource "pods"' in warnings[0]


@pytest.mark.parametrize("env, missing", [
    ({}, r"needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, .* run the worker in a pod or drop the flag\.$"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "NO_TOKEN": "1"},
     r"needs the pod's service-account token at .*/token, which is missing; mount it"),
    ({"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "NO_NAMESPACE": "1"},
     r"cannot tell the pod's namespace: POD_NAMESPACE is not set and .*/namespace is missing"),
])
def test_k8s_outside_a_pod_is_one_sentence_naming_the_flag_and_what_is_missing(service_account, env, missing):
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.scale_in import protector_from_flag

    if env.pop("NO_TOKEN", None):
        (service_account / "token").unlink()
    if env.pop("NO_NAMESPACE", None):
        (service_account / "namespace").unlink()
    with pytest.raises(ConfigError, match=r"^--scale-in-protection k8s " + missing):
        protector_from_flag("k8s", env=k8s_env(service_account, **env))


def self_signed_certificate(directory: Path, ip: str) -> tuple[str, str]:
    """A certificate for ``ip`` (it is its own CA), written as PEM files: (cert, key)."""
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)
