"""The monitoring kit (deploy/monitoring/): the dashboard and the alert rules name only metrics the
workers and `queues stats --serve` export, every alert has promtool unit tests that fire it and
keep it quiet, and the scrape jobs keep the Dagster `job` label. Reads files only (milliseconds);
tests/e2e/test_monitoring.py runs promtool and a real Prometheus on the same files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dagster_taskiq_sync.ops.metric_specs import ORCHESTRATOR_METRICS, QUEUE_METRICS, SQS_METRICS, WORKER_METRICS

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
METRIC_NAME = re.compile(r"\bdagster_taskiq_[a-z_]+\b")


def dashboard() -> dict:
    return json.loads((MONITORING / "dashboard.json").read_text())


def dashboard_queries() -> dict[str, str]:
    """Every query of the dashboard, by where it is: panel targets and template variables."""
    found = {}
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            found[f"variable ${variable['name']}"] = variable["query"]["query"]
    return found


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def exposed_names() -> set[str]:
    """Every series name the exporters produce: counters with _total, histograms with their suffixes."""
    names = set()
    for spec in WORKER_METRICS + SQS_METRICS + ORCHESTRATOR_METRICS + QUEUE_METRICS:
        if spec.kind == "histogram":
            names |= {spec.full_name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(spec.exposed_name)
    return names


def test_every_metric_the_dashboard_and_the_alerts_name_is_exported():
    queries = {**dashboard_queries(), **{f"alert {r['alert']}": r["expr"] for r in alert_rules()}}
    unknown = {
        where: sorted(set(METRIC_NAME.findall(expr)) - exposed_names())
        for where, expr in queries.items()
        if set(METRIC_NAME.findall(expr)) - exposed_names()
    }
    assert not unknown, unknown
    # and every query names at least one of ours (a query of nothing would pass the check above)
    assert all(METRIC_NAME.search(expr) for expr in queries.values())


def test_the_dashboard_shows_what_an_operator_asked_for():
    queries = "\n".join(dashboard_queries().values())
    for wanted in (
        "dagster_taskiq_queue_messages_visible",  # backlog
        "dagster_taskiq_worker_step_queue_wait_seconds_bucket",  # age (of messages when they start)
        "dagster_taskiq_queue_dead_letter_messages",
        "dagster_taskiq_queue_live_workers",
        "dagster_taskiq_queue_free_slots",
        "dagster_taskiq_worker_steps_started_total",  # step rate
        "dagster_taskiq_worker_step_duration_seconds_bucket",
        "dagster_taskiq_worker_steps_failed_total",
        "dagster_taskiq_worker_visibility_extensions_total",
        "dagster_taskiq_sqs_call_errors_total",
        "dagster_taskiq_worker_step_child_recycles_total",
        "dagster_taskiq_worker_ready",
    ):
        assert wanted in queries, wanted
    by_queue_and_job = [q for q in dashboard_queries().values() if "by (queue, job)" in q or "le, queue, job" in q]
    assert {"steps_started", "steps_failed", "step_duration"} <= {
        name for q in by_queue_and_job for name in ("steps_started", "steps_failed", "step_duration") if name in q
    }
    ids = [p["id"] for p in dashboard()["panels"]]
    assert len(ids) == len(set(ids))
    # Every panel reads the dashboard's datasource variable, so it imports into any Grafana.
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_every_alert_says_how_bad_it_is_what_happened_and_waits_before_firing():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(names) >= {
        "DagsterTaskiqDeadLetterQueueNotEmpty",
        "DagsterTaskiqBacklogWithoutWorkers",
        "DagsterTaskiqWorkerNotReady",
        "DagsterTaskiqStepFailureRateHigh",
        "DagsterTaskiqSQSErrors",
    }
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_every_alert_has_a_promtool_test_that_fires_it_and_one_that_keeps_it_quiet():
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    for name in (rule["alert"] for rule in alert_rules()):
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no case where it stays quiet"


def test_the_scrape_jobs_keep_the_dagster_job_label_and_load_the_rules():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"dagster-taskiq-worker", "dagster-taskiq-queues"}
    # Without honor_labels Prometheus renames the metrics' `job` (the Dagster job) to exported_job.
    assert all(job["honor_labels"] is True for job in jobs.values())


def test_the_docs_describe_the_alerts_and_the_exporters_limits_as_they_are():
    from dagster_taskiq_sync.cli import queues_stats
    from dagster_taskiq_sync.ops.queue_exporter import DEFAULT_CACHE_SECONDS, DEFAULT_READ_TIMEOUT

    deploy_readme = (MONITORING.parent / "README.md").read_text()
    rows = [line for line in deploy_readme.splitlines() if line.startswith("| `DagsterTaskiq")]
    assert len(rows) == len(alert_rules())
    for rule in alert_rules():
        (row,) = [line for line in rows if line.startswith(f"| `{rule['alert']}` |")]
        assert row.endswith(f"| {rule['for']} |"), row
    readme = (MONITORING.parents[1] / "README.md").read_text()
    cache_default = next(p.default for p in queues_stats.params if p.name == "cache_seconds")
    assert cache_default == DEFAULT_CACHE_SECONDS
    assert f"[--cache-seconds {DEFAULT_CACHE_SECONDS:g}]" in readme
    assert f"with an {DEFAULT_READ_TIMEOUT:g} s deadline" in readme
    assert f"a reading gets {DEFAULT_READ_TIMEOUT:g} s of SQS" in deploy_readme
    assert f"`--cache-seconds` (default {DEFAULT_CACHE_SECONDS:g};" in deploy_readme


def test_the_worker_scrape_job_keeps_the_pods_of_every_pool_in_the_kit():
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "dagster-taskiq-worker"]
    (keep,) = [
        rule
        for rule in job["relabel_configs"]
        if rule["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    ]
    assert keep["action"] == "keep"
    pools = [
        doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        for path in sorted((MONITORING.parent / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Deployment"
    ]
    assert len(pools) >= 2, pools
    for name in pools:  # Prometheus anchors relabel regexes at both ends
        assert re.fullmatch(keep["regex"], name), name
    assert not re.fullmatch(keep["regex"], "dagster-webserver")
