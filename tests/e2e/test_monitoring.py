"""deploy/monitoring/ proven on real parts: promtool checks and unit-tests the alert rules,
`queues stats --serve` exports what `queues stats` prints, and a real Prometheus on loopback,
scraping real workers and the exporter through a real run, has series for every query of the
dashboard and every alert expression (read from the kit's files, so the test cannot drift from them).

promtool and prometheus come from Debian's `prometheus` package; without it these tests fail under
CI=true and are skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance, execute_job, reconstructable

from dagster_taskiq_sync.ops.local_endpoint import free_port

from .. import jobs
from ..helpers import Exporter, WorkerProcess, http_get, make_config, metric_samples, sqs_client, wait_for
from ..unit.test_monitoring_kit import MONITORING, alert_rules, dashboard, dashboard_queries


def tool(name: str) -> str:
    """The path of a Prometheus binary: a failure under CI, a skip elsewhere, when it is missing."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{name} is not installed; CI installs Debian's prometheus package (.ci/run)")
    pytest.skip(f"{name} is not installed (Debian: apt-get install prometheus); under CI=true this fails")


# --- promtool --------------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_each_alerts_unit_tests_catch_a_broken_rule(tmp_path):
    promtool = tool("promtool")
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        out = subprocess.run([promtool, *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    # Each alert's tests have teeth: with that alert made unable to fire, `promtool test rules` fails on it.
    shutil.copy(MONITORING / "alerts_test.yml", tmp_path)
    source = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    for rule in alert_rules():
        broken = json.loads(json.dumps(source))
        for candidate in (r for group in broken["groups"] for r in group["rules"]):
            if candidate["alert"] == rule["alert"]:
                candidate["expr"] = f"({rule['expr']}) > Inf"
        (tmp_path / "alerts.yml").write_text(yaml.safe_dump(broken))
        out = subprocess.run(
            [promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode != 0 and f"alertname: {rule['alert']}," in out.stdout + out.stderr, rule["alert"]


# --- a real Prometheus -------------------------------------------------------------------------


def prometheus_config(workers: list[str], exporter: str, path: Path) -> Path:
    """The kit's scrape jobs and rules, with the test's targets in place of service discovery."""
    kit = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    targets = {"dagster-taskiq-worker": workers, "dagster-taskiq-queues": [exporter]}
    jobs_ = []
    for job in kit["scrape_configs"]:
        job = {k: v for k, v in job.items() if not k.endswith(("_sd_configs", "static_configs", "relabel_configs"))}
        jobs_.append(
            {
                **job,
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": targets[job["job_name"]]}],
            }
        )
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / name) for name in kit["rule_files"]],
        "scrape_configs": jobs_,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def promql(query: str) -> str:
    """A dashboard query as Grafana sends it: its variables at "All", $__rate_interval a minute."""
    if query.startswith("label_values("):
        metric, label = (part.strip() for part in query[len("label_values(") : -1].rsplit(",", 1))
        return f"count by ({label}) ({metric})"
    for variable, value in (("$__rate_interval", "1m"), ("$queue", ".*"), ("$job", ".*")):
        query = query.replace(variable, value)
    assert "$" not in query, f"a Grafana variable this test does not know: {query}"
    return query


class Prometheus:
    def __init__(self, config: Path, data: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data.parent / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [
                tool("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: self._ready(), timeout=60, what="Prometheus to be ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, (Path(self.log.name).read_text(), "Prometheus exited")
        try:
            return http_get(self.url + "/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def query(self, expr: str) -> list:
        status, body = http_get(f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list:
        args = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
        status, body = http_get(f"{self.url}/api/v1/query_range?{args}")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", f"{expr}: {answer.get('error')}"
        return answer["data"]["result"]

    def rules(self) -> list[dict]:
        return [r for g in json.loads(http_get(self.url + "/api/v1/rules")[1])["data"]["groups"] for r in g["rules"]]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.mark.slow
def test_a_real_prometheus_has_series_for_every_dashboard_query_and_alert(endpoint, tmp_path):
    tool("promtool")
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = os.environ | {"DAGSTER_HOME": str(home)}
    tag = uuid.uuid4().hex[:6]
    main, orphan, doomed = f"mon-{tag}", f"mon-orphan-{tag}", f"mon-doomed-{tag}"
    config, path = make_config(endpoint, tmp_path, main, orphan, doomed)
    ports = [free_port() for _ in range(3)]
    # Given a worker on the main queue that recycles its step child after each step, one on a queue
    # about to be deleted (not ready, SQS errors), the exporter, and Prometheus scraping them
    busy = WorkerProcess(
        path,
        f"mon-a-{tag}",
        tmp_path,
        ["-q", main, "-c", "2", "--max-tasks-per-child", "1", "--metrics-port", str(ports[0])],
        env=env,
    )
    lonely = WorkerProcess(
        path, f"mon-b-{tag}", tmp_path, ["-q", doomed, "-c", "1", "--metrics-port", str(ports[1])], env=env
    )
    exporter = prometheus = None
    try:
        exporter = Exporter(path, ports[2], "-q", main, "-q", orphan, "-q", doomed, "--cache-seconds", "1", env=env)
        targets = [f"127.0.0.1:{port}" for port in ports]
        prometheus = Prometheus(
            prometheus_config(targets[:2], targets[2], tmp_path / "prometheus.yml"), tmp_path / "tsdb"
        )
        began = time.time()
        busy.wait_ready()
        lonely.wait_ready()
        # When a message that can never run comes, a message waits where no worker listens, a queue
        # disappears under its worker, and a job runs whose last step fails three times
        sqs = sqs_client(endpoint.url)
        sqs.send_message(QueueUrl=sqs.get_queue_url(QueueName=main)["QueueUrl"], MessageBody="not a step message")
        sqs.send_message(QueueUrl=sqs.get_queue_url(QueueName=orphan)["QueueUrl"], MessageBody="nobody reads this")
        sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=doomed)["QueueUrl"])
        with DagsterInstance.from_config(str(home)) as instance:
            with execute_job(
                reconstructable(jobs.failing_retried),
                instance=instance,
                run_config={"execution": {"config": config}},
                raise_on_error=False,
            ) as result:
                assert not result.success
                failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
                assert [e.step_key for e in failures] == ["fails_every_attempt"]

        # Then every dashboard query and every alert expression has series in Prometheus
        queries = {where: promql(q) for where, q in dashboard_queries().items()}
        queries |= {f"alert {rule['alert']}": rule["expr"] for rule in alert_rules()}
        missing = dict(queries)
        deadline = time.monotonic() + 90
        while missing and time.monotonic() < deadline:
            missing = {where: q for where, q in missing.items() if not prometheus.query(q)}
            time.sleep(0.5 if missing else 0)
        assert not missing, f"no series for: {json.dumps(missing, indent=1)}"
        # and Prometheus evaluates every rule without error, each one pending or firing
        assert {r["name"]: (r["health"], r["state"] in ("pending", "firing")) for r in prometheus.rules()} == {
            rule["alert"]: ("ok", True) for rule in alert_rules()
        }
        # The Dagster job label arrives as `job` (the kit's honor_labels), not exported_job
        assert prometheus.query('dagster_taskiq_worker_steps_failed_total{job="failing_retried"}')
        # and the worker counted the three failed attempts as failed, the two other steps as succeeded
        scraped = metric_samples(http_get(f"http://{targets[0]}/metrics")[1])
        by_job = (("job", "failing_retried"), ("queue", main))
        assert scraped[("dagster_taskiq_worker_steps_failed_total", by_job)] == 3
        assert scraped[("dagster_taskiq_worker_steps_succeeded_total", by_job)] == 2
        if os.environ.get("MONITORING_PICTURE"):  # how docs/monitoring-dashboard.png is made
            from .. import monitoring_picture

            kit, ended = dashboard(), time.time()
            panels = monitoring_picture.fetch(kit, prometheus.query_range, promql, began, ended, step=1)
            title = f"{kit['title']}: deploy/monitoring/dashboard.json on a real run (tests/e2e/test_monitoring.py)"
            monitoring_picture.render(title, panels, ended - began, Path(os.environ["MONITORING_PICTURE"]))
    finally:
        if prometheus is not None:
            prometheus.stop()
        exported = exporter.stop() if exporter is not None else 0
        codes = [busy.stop(), lonely.stop()]
    assert exported == 0, exporter.log() if exporter else ""
    assert codes == [0, 0], [busy.log(), lonely.log()]
