"""Operating a fleet: metrics exposition, health probes, scale-in protection, the deploy/ kit.

Everything here is fast and local: real HTTP on 127.0.0.1 (the worker's health server, and
recording servers standing in for the ECS agent and the Kubernetes API server), no SQS.
Waits have deadlines only so a broken build fails instead of hanging; nothing asserts timing.
"""

from __future__ import annotations

import inspect
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from dagster_taskiq_sync.config.worker_config import worker_queues
from dagster_taskiq_sync.ops.metric_specs import (
    ORCHESTRATOR_METRICS,
    SQS_METRICS,
    WORKER_METRICS,
    metrics_reference_markdown,
)
from dagster_taskiq_sync.ops.metrics import NullMetrics, NullOrchestratorMetrics, OrchestratorMetrics, WorkerMetrics

from ..helpers import Recorder

ROOT = Path(__file__).resolve().parents[2]
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
    metrics.step_time_limited("dagster", "soft")
    metrics.run_time_limited("dagster", "hard")
    metrics.step_dropped_duplicate("dagster")
    metrics.message_dead_lettered("dagster", "malformed")
    metrics.visibility_extended(3)
    metrics.s3_offload_read(300_000)
    metrics.sqs_call("ReceiveMessage", 0.05)
    metrics.sqs_call("DeleteMessage", 0.01, error="AWS.SimpleQueueService.NonExistentQueue")
    metrics.step_child_recycled("max_tasks")
    metrics.track_slots(lambda: (2, 2, 1))
    metrics.track_readiness(lambda: (False, "draining"))


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
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families(metrics.render()[0].decode()).values()
        for s in f.samples
    }
    assert samples[("dagster_taskiq_worker_steps_killed_total", (("job", "etl"), ("queue", "dagster")))] == 1
    assert samples[("dagster_taskiq_worker_steps_failed_total", (("job", "etl"), ("queue", "dagster")))] == 1
    assert samples[("dagster_taskiq_worker_ready", ())] == 0  # exercise()'s readiness check says draining
    assert samples[("dagster_taskiq_worker_busy_slots", ())] == 2
    assert samples[("dagster_taskiq_worker_free_slots", ())] == 2
    assert samples[("dagster_taskiq_worker_prefetched_messages", ())] == 1
    assert samples[("dagster_taskiq_worker_visibility_extensions_total", ())] == 3
    assert samples[("dagster_taskiq_worker_s3_offload_read_bytes_total", ())] == 300_000
    assert samples[("dagster_taskiq_worker_step_duration_seconds_count", (("job", "etl"), ("queue", "dagster")))] == 3
    assert samples[("dagster_taskiq_worker_step_queue_wait_seconds_sum", (("job", "etl"), ("queue", "dagster")))] == 0.7
    assert (
        samples[
            (
                "dagster_taskiq_sqs_call_errors_total",
                (("action", "DeleteMessage"), ("error", "AWS.SimpleQueueService.NonExistentQueue")),
            )
        ]
        == 1
    )
    # Step duration buckets cover 50 ms .. 1 h.
    les = {
        s.labels["le"]
        for f in families(metrics.render()[0].decode()).values()
        for s in f.samples
        if s.name == "dagster_taskiq_worker_step_duration_seconds_bucket"
    }
    assert {"0.05", "3600.0", "+Inf"} <= les


def test_the_ready_gauge_is_read_from_the_readiness_check_at_each_scrape():
    metrics = WorkerMetrics()
    state = {"ready": True}

    def check() -> tuple[bool, str]:
        if state["ready"] is None:
            raise RuntimeError("broken check")
        return bool(state["ready"]), "ok" if state["ready"] else "SQS unreachable for queue dagster"

    metrics.track_readiness(check)
    seen = []
    for value in (True, False, None, True):
        state["ready"] = value
        seen.append(families(metrics.render()[0].decode())["dagster_taskiq_worker_ready"].samples[0].value)
    assert seen == [1, 0, 0, 1]  # a check that raises is not ready, as /readyz


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
    assert not [family.name for family in REGISTRY.collect() if family.name.startswith("dagster_taskiq_")]


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
    from dagster_taskiq_sync.ops.health_server import HealthServer

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
    from dagster_taskiq_sync.ops.health_server import HealthServer

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
    from dagster_taskiq_sync.ops.health_server import HealthServer

    server, _, _ = health
    with pytest.raises(ConfigError) as caught:
        HealthServer(server.port, live=Switch(), ready=Switch(), metrics=WorkerMetrics()).start()
    message = str(caught.value)
    assert message.startswith(f"--metrics-port {server.port} is already in use on 127.0.0.1; pick another port")
    assert message.count(". ") == 0 and message.endswith(".")


def test_a_host_that_is_not_this_machine_names_metrics_host():
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.ops.health_server import HealthServer

    with pytest.raises(
        ConfigError, match=r"^--metrics-host '192\.0\.2\.1' is not an address of this machine; .*0\.0\.0\.0"
    ):
        HealthServer(0, "192.0.2.1", live=Switch(), ready=Switch(), metrics=WorkerMetrics()).start()


def test_stop_joins_the_thread_and_frees_the_port():
    from dagster_taskiq_sync.ops.health_server import HealthServer

    server = HealthServer(0, live=Switch(), ready=Switch(), metrics=WorkerMetrics()).start()
    port, thread = server.port, server._thread
    assert get(server.url + "/livez")[0] == 200
    server.stop()
    assert thread is not None and not thread.is_alive()
    with HealthServer(port, live=Switch(), ready=Switch(), metrics=WorkerMetrics()) as again:
        assert get(again.url + "/livez")[0] == 200
    server.stop()  # a second stop is harmless


# --- scale-in protection ---------------------------------------------------------------------


@pytest.fixture
def recorder():
    server = Recorder()
    yield server
    server.close()


def ecs(recorder: Recorder, **options):
    from dagster_taskiq_sync.ops.scale_in import protector_from_flag

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
    recorder.answer = (
        200,
        {
            "failure": {
                "Arn": "arn:aws:ecs:task/1",
                "Reason": "TASK_NOT_VALID",
                "Detail": "The task is not part of a service",
            }
        },
    )
    protector = ecs(recorder, retry_initial=0.01, retry_max=0.02).start()
    protector.set_busy(True)  # returns at once and never raises, whatever the agent says
    assert wait_until(lambda: len(recorder.calls) >= 4)
    recorder.answer = (
        400,
        {"error": {"Code": "AccessDeniedException", "Message": "not authorized to perform: ecs:UpdateTaskProtection"}},
    )
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
    from dagster_taskiq_sync.ops.scale_in import ECSTaskProtection

    closed = Recorder()
    closed.close()  # nothing listens on this port any more
    protector = ECSTaskProtection(closed.url, idle_delay=0, retry_initial=0.01, timeout=1).start()
    protector.set_busy(True)
    assert not protector.flush(0.2)
    protector.stop(timeout=5)
    assert protector._thread is not None and not protector._thread.is_alive()


def test_ecs_without_the_agent_variable_is_one_sentence_naming_the_flag():
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.ops.scale_in import protector_from_flag

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
    from dagster_taskiq_sync.ops.scale_in import K8S_SERVICEACCOUNT_DIR_ENV

    return {K8S_SERVICEACCOUNT_DIR_ENV: str(service_account), "POD_NAME": "worker-7d9f-abcde", **extra}


def test_k8s_deletion_cost_is_patched_on_the_pod_with_the_service_account_token(service_account):
    from dagster_taskiq_sync.ops.scale_in import K8S_API_URL_ENV, protector_from_flag

    cert, key = self_signed_certificate(service_account, "127.0.0.1")
    (service_account / "ca.crt").write_bytes(Path(cert).read_bytes())
    recorder = Recorder(tls=(cert, key))
    try:
        env = k8s_env(service_account, **{K8S_API_URL_ENV: recorder.url})
        protector = protector_from_flag("k8s", env=env, idle_delay=0).start()
        assert protector.flush(10)
        protector.set_busy(True)
        assert protector.flush(10)
        (service_account / "token").write_text("token-2\n")  # the kubelet rotates projected tokens
        protector.set_busy(False)
        assert protector.flush(10)
        protector.stop()
    finally:
        recorder.close()
    assert {(c["method"], c["path"]) for c in recorder.calls} == {
        ("PATCH", "/api/v1/namespaces/workers/pods/worker-7d9f-abcde")
    }
    assert {c["headers"]["Content-Type"] for c in recorder.calls} == {"application/merge-patch+json"}
    assert [c["headers"]["Authorization"] for c in recorder.calls] == [
        "Bearer token-1",
        "Bearer token-1",
        "Bearer token-2",
    ]
    cost = "controller.kubernetes.io/pod-deletion-cost"
    assert recorder.bodies() == [
        {"metadata": {"annotations": {cost: None}}},  # null removes it
        {"metadata": {"annotations": {cost: "10000"}}},
        {"metadata": {"annotations": {cost: None}}},
    ]


def test_k8s_over_plain_http_never_sends_the_token_and_names_are_checked(recorder, service_account):
    # an http:// override is a local authenticating proxy (kubectl proxy): the token stays home
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.ops.scale_in import K8S_API_URL_ENV, protector_from_flag

    env = k8s_env(service_account, **{K8S_API_URL_ENV: recorder.url})
    protector = protector_from_flag("k8s", env=env, idle_delay=0).start()
    protector.set_busy(True)
    assert protector.flush(10)
    protector.stop()
    assert recorder.calls and all("Authorization" not in c["headers"] for c in recorder.calls)
    # a pod name that would steer the PATCH elsewhere is refused before any call
    for bad in ("../../../api/v1/namespaces/kube-system/pods/etcd", "worker?dryRun=All", "Worker_1"):
        with pytest.raises(ConfigError, match=r"POD_NAME .* is not a Kubernetes object name"):
            protector_from_flag("k8s", env={**env, "POD_NAME": bad})


def test_k8s_in_cluster_config_reaches_the_api_server_over_tls_verified_with_the_pod_ca(service_account):
    # The real thing: https://KUBERNETES_SERVICE_HOST:PORT, certificate checked against ca.crt.
    cert, key = self_signed_certificate(service_account, "127.0.0.1")
    (service_account / "ca.crt").write_bytes(Path(cert).read_bytes())
    api = Recorder(tls=(cert, key))
    try:
        from dagster_taskiq_sync.ops.scale_in import protector_from_flag

        env = k8s_env(
            service_account,
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(api.port),
            POD_NAMESPACE="batch",
        )
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
    from dagster_taskiq_sync.ops.scale_in import K8S_API_URL_ENV, protector_from_flag

    recorder.answer = (
        403,
        {
            "kind": "Status",
            "status": "Failure",
            "reason": "Forbidden",
            "code": 403,
            "message": 'pods "worker-7d9f-abcde" is forbidden: User "system:serviceaccount:'
            'workers:default" cannot patch resource "pods"',
        },
    )
    env = k8s_env(service_account, **{K8S_API_URL_ENV: recorder.url})
    protector = protector_from_flag("k8s", env=env, idle_delay=0, retry_initial=0.01, retry_max=0.02).start()
    protector.set_busy(True)
    assert wait_until(lambda: len(recorder.calls) >= 3)
    protector.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0] and 'cannot patch resource "pods"' in warnings[0]


@pytest.mark.parametrize(
    "env, missing",
    [
        (
            {},
            r"needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT, .* run the worker in a pod or drop the flag\.$",
        ),
        (
            {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "NO_TOKEN": "1"},
            r"needs the pod's service-account token at .*/token, which is missing; mount it",
        ),
        (
            {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443", "NO_NAMESPACE": "1"},
            r"cannot tell the pod's namespace: POD_NAMESPACE is not set and .*/namespace is missing",
        ),
    ],
)
def test_k8s_outside_a_pod_is_one_sentence_naming_the_flag_and_what_is_missing(service_account, env, missing):
    from dagster_taskiq_sync.errors import ConfigError
    from dagster_taskiq_sync.ops.scale_in import protector_from_flag

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
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


# --- the deploy/ kit -------------------------------------------------------------------------
#
# The manifests are parsed and checked against each other and against the CLI, so the kit
# cannot rot: probe paths and ports, grace periods, autoscaling targets, queue names, flags.

# Every `worker start` flag the kit uses, in one place.
KIT_FLAGS = {
    "-y",
    "-q",
    "-c",
    "--shutdown-timeout",
    "--heartbeat-interval",
    "--metrics-port",
    "--metrics-host",
    "--scale-in-protection",
    "--interactive-slots",
}
WORKER_START = ["dagster-taskiq-sync", "worker", "start"]
GRACE_MARGIN = 10  # seconds between --shutdown-timeout and the platform's SIGKILL, at least
FARGATE_MAX_STOP_TIMEOUT = 120


def load_all(path: Path) -> list:
    if path.suffix == ".json":
        return [json.loads(path.read_text())]
    import yaml

    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# One worker pool per queue: the default queue's, and one per routed queue of the run config's
# execution.config.routes (sized pools). On Kubernetes a pool's own objects carry its queue in a
# label; on ECS each pool is a task definition (and a scaling policy with the same file suffix).
POOLS = ("dagster", "dagster-big")
POOL_LABEL = "dagster-taskiq-sync/queue"
POOL_KINDS = ("Deployment", "PodDisruptionBudget", "ScaledObject")
WORKER_ALLOWANCE = 2 * 2**30  # memory a pod or task needs beyond its steps: the worker and its fork server


def k8s_docs() -> list[dict]:
    kustomization = load_all(DEPLOY / "kustomization.yaml")[0]
    return [doc for resource in kustomization["resources"] for doc in load_all(DEPLOY / resource)]


def k8s_objects(pool: str = "dagster") -> dict[str, dict]:
    """The Kubernetes objects one pool works with, by kind: the shared ones (service account, RBAC,
    KEDA's authentication) and the pool's own Deployment, disruption budget and scaler."""
    found: dict[str, dict] = {}
    for doc in k8s_docs():
        if doc["kind"] in POOL_KINDS and doc["metadata"].get("labels", {}).get(POOL_LABEL) != pool:
            continue
        assert doc["kind"] not in found, f"two {doc['kind']} objects for pool {pool}"
        found[doc["kind"]] = doc
    return found


def k8s_pools() -> list[str]:
    return [doc["metadata"]["labels"][POOL_LABEL] for doc in k8s_docs() if doc["kind"] == "Deployment"]


def ecs_task_definitions() -> dict[str, Path]:
    """Pool (the `-q` its command consumes) -> its task definition file."""
    found: dict[str, Path] = {}
    for path in sorted((DEPLOY / "ecs").glob("task-definition*.json")):
        pool = options(load_all(path)[0]["containerDefinitions"][0]["command"])["-q"]
        assert pool not in found, f"two task definitions for pool {pool}"
        found[pool] = path
    return found


def ecs_task(pool: str = "dagster") -> dict:
    return load_all(ecs_task_definitions()[pool])[0]


def ecs_scaling_policy(pool: str = "dagster") -> dict:
    path = ecs_task_definitions()[pool]
    return load_all(path.with_name(path.name.replace("task-definition", "scaling-policy")))[0]


def dockerfile() -> dict[str, list]:
    """Instructions of deploy/Dockerfile: name -> list of their arguments (JSON forms parsed)."""
    instructions: dict[str, list] = {}
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        instructions.setdefault(name.upper(), []).append(json.loads(rest) if rest.startswith("[") else rest)
    return instructions


def worker_container(pool: str = "dagster") -> dict:
    return k8s_objects(pool)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def ecs_container(pool: str = "dagster") -> dict:
    return ecs_task(pool)["containerDefinitions"][0]


def invocations() -> dict[str, list[str]]:
    """The `worker start` arguments each piece of the kit runs the worker with."""
    entrypoint = dockerfile()["ENTRYPOINT"][-1]
    assert entrypoint[-3:] == WORKER_START, entrypoint
    found = {"Dockerfile CMD": dockerfile()["CMD"][-1]}
    for pool in POOLS:
        container = worker_container(pool)
        assert "command" not in container, "the Deployment keeps the image's ENTRYPOINT (worker start)"
        ecs = ecs_container(pool)
        assert "entryPoint" not in ecs, "the task definition keeps the image's ENTRYPOINT (worker start)"
        found[f"Deployment args ({pool})"] = container["args"]
        found[f"ECS command ({pool})"] = ecs["command"]
    return found


def options(args: list[str]) -> dict[str, str]:
    """flag -> value for `worker start` arguments; Celery options after `--` under their own names
    (flags before `--` win, as in the CLI)."""
    found: dict[str, str] = {}
    before, after = _split(args)
    for part, prefix in ((before, ""), (after, "celery:")):
        items = list(part)
        while items:
            flag = items.pop(0)
            assert flag.startswith("-"), f"{flag!r} is not a flag (every kit argument is a flag and its value)"
            found.setdefault(prefix + flag, items.pop(0))
    return found


def _split(args: list[str]) -> tuple[list[str], list[str]]:
    if "--" in args:
        index = args.index("--")
        return args[:index], args[index + 1 :]
    return list(args), []


def config_file(container_path: str) -> Path:
    """The deploy/config file a path under /config is (the image copies deploy/config/ there, and
    Kubernetes mounts the ConfigMap generated from it)."""
    assert container_path.startswith("/config/"), container_path
    return DEPLOY / "config" / container_path[len("/config/") :]


def settings_of(args: list[str]):
    from dagster_taskiq_sync.cli import settings_from_yaml

    return settings_from_yaml(str(config_file(options(args)["-y"])))


def messages_per_worker(args: list[str]) -> int:
    """concurrency x prefetch multiplier: the most messages one worker holds."""
    opts = options(args)
    concurrency = int(opts.get("-c") or opts["celery:--concurrency"])
    prefetch = int(opts.get("celery:--prefetch-multiplier") or settings_of(args).prefetch_multiplier)
    return concurrency * prefetch


@pytest.mark.parametrize("pool", POOLS)
def test_every_manifest_in_deploy_parses(pool):
    paths = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(paths) >= 8
    for path in paths:
        assert load_all(path), path
    assert set(k8s_objects(pool)) == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "Deployment",
        "PodDisruptionBudget",
        "TriggerAuthentication",
        "ScaledObject",
    }


def test_the_image_runs_worker_start_as_a_non_root_user_and_stops_with_sigterm():
    instructions = dockerfile()
    assert instructions["FROM"][0].startswith("python:") and instructions["FROM"][0].endswith("-slim")
    assert instructions["ENTRYPOINT"][-1][-3:] == WORKER_START
    assert instructions["STOPSIGNAL"] == ["SIGTERM"]
    assert instructions["USER"][-1] not in ("root", "0")
    assert any("pip install dagster-taskiq-sync" in run for run in instructions["RUN"])
    assert "COPY deploy/config/ /config/" in [f"COPY {c}" for c in instructions["COPY"]]
    metrics_port = options(instructions["CMD"][-1])["--metrics-port"]
    assert instructions["EXPOSE"] == [metrics_port]


@pytest.mark.parametrize("pool", POOLS)
def test_probes_are_livez_and_readyz_on_the_metrics_port_the_worker_listens_on(pool):
    container = worker_container(pool)
    opts = options(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    def probe_port(probe: dict) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else port

    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "startupProbe", "readinessProbe"):
        assert probe_port(container[probe]) == int(opts["--metrics-port"]), probe
    # The kubelet and Prometheus come from outside the container's loopback.
    assert opts["--metrics-host"] == "0.0.0.0"
    annotations = k8s_objects(pool)["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == opts["--metrics-port"]

    ecs = ecs_container(pool)
    ecs_opts = options(ecs["command"])
    assert ecs_opts["--metrics-host"] == "0.0.0.0"
    assert f"http://127.0.0.1:{ecs_opts['--metrics-port']}/livez" in " ".join(ecs["healthCheck"]["command"])
    assert [p["containerPort"] for p in ecs["portMappings"]] == [int(ecs_opts["--metrics-port"])]


@pytest.mark.parametrize("pool", POOLS)
def test_the_platforms_wait_longer_than_the_worker_drains(pool):
    pod = k8s_objects(pool)["Deployment"]["spec"]["template"]["spec"]
    shutdown = float(options(worker_container(pool)["args"])["--shutdown-timeout"])
    assert pod["terminationGracePeriodSeconds"] >= shutdown + GRACE_MARGIN

    ecs = ecs_container(pool)
    ecs_shutdown = float(options(ecs["command"])["--shutdown-timeout"])
    assert ecs["stopTimeout"] >= ecs_shutdown + GRACE_MARGIN
    assert ecs["stopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT  # Fargate refuses more


@pytest.mark.parametrize("pool", POOLS)
def test_keda_scales_on_the_summed_backlog_of_the_queues_the_workers_consume_at_concurrency_times_prefetch(pool):
    args = worker_container(pool)["args"]
    settings = settings_of(args)
    triggers = k8s_objects(pool)["ScaledObject"]["spec"]["triggers"]
    # one trigger per queue the pool's workers consume: its queue and, with lanes, its bulk lane
    consumed = worker_queues(settings, [options(args)["-q"]])
    assert [t["metadata"]["queueURL"].rsplit("/", 1)[-1] for t in triggers] == [
        settings.sqs.queue_name(q) for q in consumed
    ]
    assert settings.lanes and len(consumed) == 2  # the kit runs with lanes
    for trigger in triggers:
        assert trigger["type"] == "aws-sqs-queue"
        metadata = trigger["metadata"]
        assert int(metadata["queueLength"]) == messages_per_worker(args)
        assert metadata["scaleOnInFlight"] == "true"  # busy workers count: see keda.yaml
        assert metadata["awsRegion"] == settings.sqs.region
        assert trigger["authenticationRef"]["name"] == k8s_objects(pool)["TriggerAuthentication"]["metadata"]["name"]
    # The HPA takes the largest of several metrics; one set of slots serves both queues, so the
    # replicas must be for their sum: one composed metric (KEDA's scaling modifiers) adding every
    # trigger once, with the same messages per replica, so a backlog of ceil(sum / target) replicas.
    modifiers = k8s_objects(pool)["ScaledObject"]["spec"]["advanced"]["scalingModifiers"]
    names = [t.get("name") for t in triggers]
    assert all(name and name.isidentifier() for name in names) and len(set(names)) == len(names), names
    terms = modifiers["formula"].split("+")
    assert sorted(term.strip() for term in terms) == sorted(names), modifiers["formula"]
    assert float(modifiers["target"]) == messages_per_worker(args)
    assert modifiers["metricType"] == "AverageValue"  # Value would scale the current replicas by sum / target
    assert float(modifiers.get("activationTarget", 0)) < 1  # one message on either lane scales up from zero
    assert k8s_objects(pool)["TriggerAuthentication"]["spec"]["podIdentity"]["provider"] == "aws"
    assert (
        k8s_objects(pool)["ScaledObject"]["spec"]["scaleTargetRef"]["name"]
        == k8s_objects(pool)["Deployment"]["metadata"]["name"]
    )
    assert "replicas" not in k8s_objects(pool)["Deployment"]["spec"]  # KEDA owns the count


@pytest.mark.parametrize("pool", POOLS)
def test_ecs_target_tracking_is_messages_per_task_at_concurrency_times_prefetch(pool):
    args = ecs_container(pool)["command"]
    settings = settings_of(args)
    policy = ecs_scaling_policy(pool)
    assert policy["TargetValue"] == messages_per_worker(args)
    metrics = {m["Id"]: m for m in policy["CustomizedMetricSpecification"]["Metrics"]}
    (result,) = [m for m in metrics.values() if m["ReturnData"]]
    # the backlog of every queue the pool's workers consume: its queue and its bulk lane
    assert result["Expression"] == "(visible + in_flight + bulk_visible + bulk_in_flight) / tasks"
    queue, lane = (settings.sqs.queue_name(q) for q in worker_queues(settings, [options(args)["-q"]]))
    for prefix, sqs_name in (("", queue), ("bulk_", lane)):
        for metric_id, name in (
            ("visible", "ApproximateNumberOfMessagesVisible"),
            ("in_flight", "ApproximateNumberOfMessagesNotVisible"),
        ):
            metric = metrics[prefix + metric_id]["MetricStat"]["Metric"]
            assert (metric["Namespace"], metric["MetricName"]) == ("AWS/SQS", name)
            assert metric["Dimensions"] == [{"Name": "QueueName", "Value": sqs_name}]
    tasks = metrics["tasks"]["MetricStat"]["Metric"]
    assert (tasks["Namespace"], tasks["MetricName"]) == ("ECS/ContainerInsights", "RunningTaskCount")
    family = ecs_task(pool)["family"]
    assert {"Name": "ServiceName", "Value": family} in tasks["Dimensions"]  # the service is named after it


@pytest.mark.parametrize("pool", POOLS)
def test_each_platform_asks_for_its_own_scale_in_protection_with_what_it_needs(pool):
    objects = k8s_objects(pool)
    container = worker_container(pool)
    assert options(container["args"])["--scale-in-protection"] == "k8s"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    account = objects["Deployment"]["spec"]["template"]["spec"]["serviceAccountName"]
    assert objects["ServiceAccount"]["metadata"]["name"] == account
    assert objects["ServiceAccount"].get("automountServiceAccountToken", True)
    assert objects["Role"]["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    binding = objects["RoleBinding"]
    assert binding["roleRef"]["name"] == objects["Role"]["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": objects["ServiceAccount"]["metadata"]["namespace"]}
    ]
    assert options(ecs_container(pool)["command"])["--scale-in-protection"] == "ecs"


@pytest.mark.parametrize("pool", POOLS)
def test_workers_get_a_dagster_home_with_a_postgres_instance_and_the_run_config(pool):
    kustomization = load_all(DEPLOY / "kustomization.yaml")[0]
    (generated,) = kustomization["configMapGenerator"]
    container = worker_container(pool)
    home = {e["name"]: e.get("value") for e in container["env"]}["DAGSTER_HOME"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in k8s_objects(pool)["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/config"]["name"]]["configMap"]["name"] == generated["name"]
    instance = mounts[f"{home}/dagster.yaml"]
    assert instance["subPath"] == "dagster.yaml" and instance["name"] == mounts["/config"]["name"]
    assert "emptyDir" in volumes[mounts[home]["name"]]  # writable
    for args in invocations().values():
        run_config = config_file(options(args)["-y"])
        assert run_config.exists() and f"config/{run_config.name}" in generated["files"]
    assert "config/dagster.yaml" in generated["files"]

    assert {e["name"]: e["value"] for e in ecs_container(pool)["environment"]}["DAGSTER_HOME"] == home
    assert dockerfile()["ENV"][0].split("DAGSTER_HOME=")[1].split()[0] == home

    from dagster._core.instance.config import dagster_instance_config

    config, _ = dagster_instance_config(str(DEPLOY / "config"))  # Dagster's schema; no database needed
    assert config["storage"]["postgres"]["postgres_db"]["scheme"] == "postgresql+psycopg2"  # SQLAlchemy 2.1 trap


@pytest.mark.parametrize("pool", POOLS)
def test_the_disruption_budget_covers_the_workers_and_lets_unready_ones_go(pool):
    objects = k8s_objects(pool)
    pdb = objects["PodDisruptionBudget"]["spec"]
    assert (
        pdb["selector"]["matchLabels"].items()
        <= objects["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb["maxUnavailable"] == 1 and pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_one_worker_pool_per_routed_queue_sized_for_its_routes_max():
    from dagster_taskiq_sync.wire.routing import k8s_quantity

    settings = settings_of(worker_container()["args"])
    # the default queue's pool and one per queue of execution.config.routes, on both platforms
    assert list(POOLS) == [settings.sqs.default_queue, *settings.routes.queues]
    assert sorted(k8s_pools()) == sorted(ecs_task_definitions()) == sorted(POOLS)
    for pool in POOLS:
        for args in (worker_container(pool)["args"], ecs_container(pool)["command"]):
            assert [args[i + 1] for i, a in enumerate(args) if a == "-q"] == [pool]  # its queue only
        # each disruption budget counts only its own pool's pods
        selector = k8s_objects(pool)["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items()
        for other in POOLS:
            labels = k8s_objects(other)["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
            assert (selector <= labels) == (other == pool), (pool, other)
    for route in settings.routes.routes:
        # a pool's pod / task holds -c steps of the route's largest size, plus the worker
        most = {bound.key: bound.threshold for bound in route.max}
        container = worker_container(route.queue)
        steps = int(options(container["args"])["-c"])
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits  # placed only where every step fits
        assert k8s_quantity(limits["memory"]) >= steps * most["memory"] + WORKER_ALLOWANCE, route.queue
        assert k8s_quantity(limits["cpu"]) >= steps * most["cpu"], route.queue
        # and never a step more: no interactive slot beyond -c (lanes)
        assert options(container["args"])["--interactive-slots"] == "0"
        assert options(ecs_container(route.queue)["command"])["--interactive-slots"] == "0"
        task = ecs_task(route.queue)
        assert int(options(ecs_container(route.queue)["command"])["-c"]) == steps
        assert int(task["memory"]) * 2**20 >= steps * most["memory"] + WORKER_ALLOWANCE, route.queue
        assert int(task["cpu"]) / 1024 >= steps * most["cpu"], route.queue


def cli_flags() -> set[str]:
    from dagster_taskiq_sync.cli import worker_start

    return {opt for param in worker_start.params for opt in (*param.opts, *param.secondary_opts)}


def test_the_kit_uses_only_the_flags_listed_here_and_all_of_them():
    used = {flag for args in invocations().values() for flag in options(args) if not flag.startswith("celery:")}
    assert used == KIT_FLAGS


def test_every_flag_the_kit_uses_exists_in_the_cli_and_every_invocation_parses():
    from dagster_taskiq_sync.cli import worker_start

    assert KIT_FLAGS <= cli_flags()
    for args in invocations().values():
        worker_start.make_context("worker start", list(args))  # values too: types, ranges, choices


def test_the_metrics_reference_in_the_deploy_readme_is_current():
    assert metrics_reference_markdown() in (DEPLOY / "README.md").read_text()
