"""deploy/: the Grafana board queries only what GET /metrics exports, and Prometheus can scrape it.

The exporter is scraped for real (Django's test client, rows in the database),
so renaming a family or a label in sagas/metrics.py breaks this test, not the
board in production.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from sagas import metrics
from sagas.models import Saga, SagaLog
from tests.deploy.promql import kept_labels, series
from tests.deploy.support import REPO, bind_mounts, compose, interpolate, load_yaml

DASHBOARD = REPO / "deploy/grafana/dashboards/backtrack.json"
DATASOURCES = REPO / "deploy/grafana/provisioning/datasources/prometheus.yml"
PROVIDERS = REPO / "deploy/grafana/provisioning/dashboards/backtrack.yml"
PROMETHEUS = REPO / "deploy/prometheus/prometheus.yml"
TOKEN = "dashboard-test-token"
PANEL_TYPES = {"row", "stat", "timeseries", "gauge", "bargauge", "table", "text"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def queries() -> list[tuple[str, dict]]:
    return [(panel["title"], target) for panel in panels() for target in panel["targets"]]


def datasource_uid() -> str:
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    return datasource["uid"]


def scrape_job() -> dict:
    (job,) = load_yaml(PROMETHEUS)["scrape_configs"]
    return job


# --- the queries against the exporter ----------------------------------------


@pytest.fixture
def exported(settings) -> dict[str, list[dict[str, str]]]:
    """{sample name: [labels of each sample]} of a real scrape, every family with samples."""
    settings.METRICS_TOKEN = TOKEN
    metrics.collector.reset()
    now = timezone.now()
    for status in ["PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED", "FAILED"]:
        ended = status in Saga.TERMINAL
        Saga.objects.create(
            saga_type="trip_booking",
            status=status,
            business_key=f"booking:{status}",
            duration_ms=1200 if ended else None,
        )
    Saga.objects.create(saga_type="retired_type", status="RUNNING", business_key="old:1")
    saga = Saga.objects.first()
    for phase, step in [("action", "reserve_flight"), ("compensation", "release_flight")]:
        SagaLog.objects.create(
            saga=saga,
            step=step,
            step_index=0,
            phase=phase,
            status="succeeded",
            started_at=now - timedelta(milliseconds=30),
            finished_at=now,
            duration_ms=30,
        )

    response = APIClient().get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    metrics.collector.reset()

    assert response.status_code == 200, response.content
    samples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[sample.name].append(sample.labels)
    return samples


@pytest.mark.django_db
def test_every_metric_the_board_queries_is_exported_with_the_labels_it_uses(exported):
    checked = set()
    for title, target in queries():
        for selected in series(target["expr"]):
            where = f"{selected.metric} in panel {title!r}"
            assert exported.get(selected.metric), f"{where}: not exported by /metrics"
            for labels in exported[selected.metric]:
                missing = selected.labels - labels.keys()
                assert not missing, f"{where}: samples have no label {sorted(missing)}"
            for label, values in selected.values.items():
                seen = {labels[label] for labels in exported[selected.metric]}
                assert values <= seen, f"{where}: no sample has {label} in {sorted(values)}"
            checked.add(selected.metric)

    # The board covers every family the issue asks for, suffixes included.
    assert checked >= {
        "backtrack_sagas_started_total",
        "backtrack_sagas_completed_total",
        "backtrack_sagas_compensated_total",
        "backtrack_sagas_failed_total",
        "backtrack_sagas_in_progress",
        "backtrack_sagas_awaiting_operator",
        "backtrack_saga_duration_seconds_bucket",
        "backtrack_saga_duration_seconds_sum",
        "backtrack_saga_duration_seconds_count",
        "backtrack_saga_step_duration_seconds_bucket",
    }


@pytest.mark.django_db
def test_the_saga_type_variable_reads_a_label_the_exporter_has(exported):
    (variable,) = dashboard()["templating"]["list"]
    match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["query"]["query"])

    assert match, variable["query"]
    metric, label = match.groups()
    assert all(label in labels for labels in exported[metric])
    assert variable["datasource"]["uid"] == datasource_uid()


def test_a_legend_prints_only_labels_its_query_keeps():
    for title, target in queries():
        printed = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        kept = kept_labels(target["expr"]) - {"le"}
        assert printed <= kept, f"panel {title!r}: legend {printed - kept} is aggregated away"


# --- the dashboard as Grafana reads it ------------------------------------------


def test_the_board_is_a_grafana_dashboard_on_the_provisioned_datasource():
    board = dashboard()
    uid = datasource_uid()

    assert board["uid"] == "backtrack-sagas"
    assert board["title"] == "Backtrack sagas"
    assert isinstance(board["schemaVersion"], int)
    assert "id" not in board  # Grafana assigns its own; a fixed one clashes on import
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in "xywh"), panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    for panel in panels():
        assert panel["title"]
        assert panel["description"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_the_board_has_the_panels_the_issue_asks_for():
    titles = " | ".join(panel["title"] for panel in panels())
    exprs = " | ".join(target["expr"] for _, target in queries())

    for word in ["Started", "Completed", "Compensated", "Failed"]:
        assert f"{word} per minute" in titles
    for title in ["Success rate", "Compensation rate", "In progress, by status"]:
        assert title in titles
    assert "FAILED, awaiting an operator" in titles
    assert "histogram_quantile(0.95, max by (saga_type, le)" in exprs
    assert "histogram_quantile(0.95, max by (step, le)" in exprs


def test_grafana_is_provisioned_with_the_datasource_and_the_dashboard_folder():
    (datasource,) = load_yaml(DATASOURCES)["datasources"]
    (provider,) = load_yaml(PROVIDERS)["providers"]
    grafana = compose()["services"]["grafana"]
    mounts = bind_mounts(grafana)

    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert provider["type"] == "file"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert (REPO / "deploy/grafana/dashboards/backtrack.json").is_file()


# --- Prometheus -------------------------------------------------------------------


def test_prometheus_scrapes_the_web_services_metrics_with_the_token_file():
    job = scrape_job()
    prometheus = compose()["services"]["prometheus"]
    secrets = compose()["secrets"]

    assert job["static_configs"] == [{"targets": ["web:8000"]}]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/secrets/metrics_token",
    }
    # The token comes from the environment, never from the repository.
    assert "credentials" not in job["authorization"]
    assert "bearer_token" not in job
    assert prometheus["secrets"] == ["metrics_token"]
    assert secrets["metrics_token"] == {"environment": "METRICS_TOKEN"}
    assert bind_mounts(prometheus)["./deploy/prometheus/prometheus.yml"] == (
        "/etc/prometheus/prometheus.yml"
    )


@pytest.mark.django_db
def test_the_scrape_as_configured_passes_the_production_security_settings(settings):
    """Host web:8000, plain HTTP, the forwarded-proto header and the token: 200, not a redirect."""
    job = scrape_job()
    app_env = compose()["x-app"]["environment"]
    allowed = interpolate(app_env["DJANGO_ALLOWED_HOSTS"])
    settings.ALLOWED_HOSTS = [host for host in allowed.split(",") if host]
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.METRICS_TOKEN = TOKEN
    headers = {
        f"HTTP_{name.upper().replace('-', '_')}": value["values"][0]
        for name, value in job["http_headers"].items()
    }
    (target,) = job["static_configs"][0]["targets"]
    client = APIClient()

    scraped = client.get(
        job["metrics_path"],
        HTTP_HOST=target,
        HTTP_AUTHORIZATION=f"{job['authorization']['type']} {TOKEN}",
        **headers,
    )
    without_header = client.get(job["metrics_path"], HTTP_HOST=target)

    assert scraped.status_code == 200, scraped.content
    assert without_header.status_code == 301
