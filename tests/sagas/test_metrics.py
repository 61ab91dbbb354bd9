"""GET /metrics: Prometheus families derived from the Saga and SagaLog rows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from sagas import metrics
from sagas.models import Saga, SagaLog

pytestmark = pytest.mark.django_db

TOKEN = "scrape-token-for-tests"
TRIP = "trip_booking"


@pytest.fixture(autouse=True)
def _fresh_metrics(settings):
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_CACHE_S = 15
    settings.METRICS_STEP_LAG_S = 60
    metrics.collector.reset()
    yield
    metrics.collector.reset()


def make_saga(status: str, *, duration_ms: int | None = None, saga_type: str = TRIP) -> Saga:
    return Saga.objects.create(
        saga_type=saga_type, status=status, business_key="booking:1", duration_ms=duration_ms
    )


def make_log(saga, step, phase, duration_ms, *, ago_s=0.0, status="succeeded", **extra):
    finished = timezone.now() - timedelta(seconds=ago_s)
    return SagaLog.objects.create(
        saga=saga,
        step=step,
        step_index=0,
        phase=phase,
        status=status,
        started_at=finished - timedelta(milliseconds=duration_ms),
        finished_at=finished,
        duration_ms=duration_ms,
        **extra,
    )


def scrape(client=None, **headers) -> dict:
    """{(sample name, sorted labels): value}, parsed as Prometheus would."""
    client = client or APIClient()
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **headers)
    assert response.status_code == 200, response.content
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def buckets(samples: dict, name: str, **labels) -> dict[str, float]:
    found = {}
    for (sample, sample_labels), count in samples.items():
        sample_labels = dict(sample_labels)
        le = sample_labels.pop("le", None)
        if sample == f"{name}_bucket" and sample_labels == labels:
            found[le] = count
    return found


def test_saga_counters_and_gauges_equal_the_rows():
    for status, n in [("COMPLETED", 3), ("COMPENSATED", 2), ("FAILED", 1), ("RUNNING", 1)]:
        for _ in range(n):
            make_saga(status)
    make_saga("PENDING")
    make_saga("COMPENSATING")
    make_saga("COMPLETED", saga_type="booking_cancellation")

    samples = scrape()

    assert value(samples, "backtrack_sagas_started_total", saga_type=TRIP) == 9
    assert value(samples, "backtrack_sagas_completed_total", saga_type=TRIP) == 3
    assert value(samples, "backtrack_sagas_compensated_total", saga_type=TRIP) == 2
    assert value(samples, "backtrack_sagas_failed_total", saga_type=TRIP) == 1
    assert value(samples, "backtrack_sagas_in_progress", saga_type=TRIP, status="PENDING") == 1
    assert value(samples, "backtrack_sagas_in_progress", saga_type=TRIP, status="RUNNING") == 1
    assert value(samples, "backtrack_sagas_in_progress", saga_type=TRIP, status="COMPENSATING") == 1
    cancellation = {"saga_type": "booking_cancellation"}
    assert value(samples, "backtrack_sagas_started_total", **cancellation) == 1
    assert value(samples, "backtrack_sagas_completed_total", **cancellation) == 1
    assert value(samples, "backtrack_sagas_failed_total", **cancellation) == 0
    assert value(samples, "backtrack_sagas_in_progress", status="RUNNING", **cancellation) == 0


def test_failed_sagas_no_operator_resolved_are_awaiting_one():
    make_saga("FAILED")
    make_saga("FAILED")
    resolved = make_saga("FAILED")
    resolved.resolved_at = timezone.now()
    resolved.resolved_by = "ops"
    resolved.save(update_fields=["resolved_at", "resolved_by"])
    make_saga("COMPENSATED")
    make_saga("COMPENSATING")  # an operator's retry under way: not waiting for anyone
    make_saga("FAILED", saga_type="booking_cancellation")

    samples = scrape()

    assert value(samples, "backtrack_sagas_awaiting_operator", saga_type=TRIP) == 2
    assert value(samples, "backtrack_sagas_failed_total", saga_type=TRIP) == 3
    assert (
        value(samples, "backtrack_sagas_awaiting_operator", saga_type="booking_cancellation") == 1
    )


def test_a_refresh_runs_one_query_over_sagas_and_one_over_the_log(django_assert_num_queries):
    make_saga("FAILED")

    with django_assert_num_queries(2) as captured:
        scrape()

    tables = [query["sql"].split(" FROM ", 1)[1].split()[0] for query in captured.captured_queries]
    assert sorted(tables) == ['"sagas_saga"', '"sagas_sagalog"']


def test_sagas_in_flight_of_a_type_no_deployed_code_declares_are_counted():
    make_saga("PENDING", saga_type="retired_type")
    make_saga("RUNNING", saga_type="retired_type")
    make_saga("COMPLETED", saga_type="retired_type")
    make_saga("RUNNING")

    samples = scrape()

    assert value(samples, "backtrack_sagas_unknown_type", saga_type="retired_type") == 2
    assert ("backtrack_sagas_unknown_type", (("saga_type", TRIP),)) not in samples


def test_a_registered_saga_type_without_rows_reports_zeros():
    samples = scrape()

    assert value(samples, "backtrack_sagas_started_total", saga_type=TRIP) == 0
    assert value(samples, "backtrack_sagas_in_progress", saga_type=TRIP, status="RUNNING") == 0
    assert value(samples, "backtrack_sagas_awaiting_operator", saga_type=TRIP) == 0
    assert value(samples, "backtrack_saga_duration_seconds_count", saga_type=TRIP) == 0


def test_the_saga_duration_histogram_has_cumulative_buckets_count_and_sum():
    for status, duration_ms in [
        ("COMPLETED", 80),
        ("COMPLETED", 100),  # on a bound: counted in le="0.1"
        ("COMPLETED", 1500),
        ("COMPENSATED", 2500),
        ("FAILED", 45_000),
        ("COMPENSATED", 700_000),  # above the largest bound: only in +Inf
    ]:
        make_saga(status, duration_ms=duration_ms)
    make_saga("RUNNING")  # no duration yet: not observed

    samples = scrape()

    assert buckets(samples, "backtrack_saga_duration_seconds", saga_type=TRIP) == {
        "0.1": 2,
        "0.25": 2,
        "0.5": 2,
        "1.0": 2,
        "2.5": 4,
        "5.0": 4,
        "10.0": 4,
        "30.0": 4,
        "60.0": 5,
        "120.0": 5,
        "300.0": 5,
        "600.0": 5,
        "+Inf": 6,
    }
    assert value(samples, "backtrack_saga_duration_seconds_count", saga_type=TRIP) == 6
    assert value(samples, "backtrack_saga_duration_seconds_sum", saga_type=TRIP) == pytest.approx(
        749.18
    )


def test_the_step_histogram_counts_every_attempt_by_step_and_phase():
    saga = make_saga("COMPENSATED", duration_ms=5000)
    make_log(saga, "reserve_flight", "action", 3, ago_s=3600)  # long kept
    make_log(saga, "reserve_flight", "action", 40, status="duplicate", ago_s=5)  # recent
    make_log(saga, "reserve_hotel", "action", 1200, status="retrying", ago_s=120)
    make_log(saga, "reserve_hotel", "action", 15_000, status="failed", ago_s=1)
    make_log(saga, "release_flight", "compensation", 25, ago_s=0)
    make_log(saga, "-", "operator", 0)  # an operator note is not a step

    samples = scrape()

    name = "backtrack_saga_step_duration_seconds"
    flight = {"step": "reserve_flight", "phase": "action"}
    assert buckets(samples, name, **flight) == {
        "0.005": 1,
        "0.01": 1,
        "0.025": 1,
        "0.05": 2,
        "0.1": 2,
        "0.25": 2,
        "0.5": 2,
        "1.0": 2,
        "2.5": 2,
        "5.0": 2,
        "10.0": 2,
        "20.0": 2,
        "30.0": 2,
        "+Inf": 2,
    }
    assert value(samples, f"{name}_sum", **flight) == pytest.approx(0.043)
    hotel = {"step": "reserve_hotel", "phase": "action"}
    assert buckets(samples, name, **hotel)["1.0"] == 0
    assert buckets(samples, name, **hotel)["2.5"] == 1
    assert buckets(samples, name, **hotel)["20.0"] == 2
    assert value(samples, f"{name}_count", **hotel) == 2
    assert value(samples, f"{name}_sum", **hotel) == pytest.approx(16.2)
    release = {"step": "release_flight", "phase": "compensation"}
    assert value(samples, f"{name}_count", **release) == 1
    assert buckets(samples, name, **release)["0.025"] == 1
    assert not any(dict(labels).get("phase") == "operator" for _, labels in samples)
    # Steps of registered sagas that never ran are reported as zero.
    assert value(samples, f"{name}_count", step="confirm_booking", phase="action") == 0


def test_step_rows_are_kept_once_and_a_row_committed_out_of_id_order_is_still_counted():
    saga = make_saga("RUNNING")
    now = timezone.now()
    base = (SagaLog.objects.order_by("-id").values_list("id", flat=True).first() or 0) + 1000

    def log(offset, ago_s, duration_ms=10):
        finished = now - timedelta(seconds=ago_s)
        SagaLog.objects.create(
            id=base + offset,
            saga=saga,
            step="reserve_car",
            step_index=2,
            phase="action",
            status="retrying",
            started_at=finished,
            finished_at=finished,
            duration_ms=duration_ms,
        )

    def count(steps, at_s):
        histograms = steps.read(now=now + timedelta(seconds=at_s), lag=timedelta(seconds=60))
        return histograms[("reserve_car", "action")].count

    steps = metrics.StepDurations()
    log(10, ago_s=300)
    log(20, ago_s=30)
    log(30, ago_s=5)
    assert count(steps, 0) == 3  # one kept, two read afresh
    assert steps.min_id == base + 10

    # A transaction that took its id before id 30 commits only now.
    log(25, ago_s=40)
    assert count(steps, 0) == 4
    assert count(steps, 30) == 4  # ids 20 and 25 pass the watermark: kept once
    assert count(steps, 30) == 4
    assert count(steps, 500) == 4  # everything kept
    assert steps.min_id == base + 30
    assert steps.kept[("reserve_car", "action")].count == 4


def test_the_exposition_is_text_format_0_0_4():
    response = APIClient().get(
        "/metrics",
        HTTP_AUTHORIZATION=f"Bearer {TOKEN}",
        HTTP_ACCEPT="application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    )

    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE backtrack_sagas_started_total counter" in response.content.decode()


def test_the_collector_is_not_on_the_global_registry():
    assert REGISTRY.get_sample_value("backtrack_sagas_started_total", {"saga_type": TRIP}) is None
    assert metrics.metrics_registry is not REGISTRY


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (None, 401),
        (f"Bearer {TOKEN}x", 401),
        ("Bearer ", 401),
        (f"Token {TOKEN}", 401),  # DRF's keyword is for user tokens
        (f"Bearer {TOKEN}", 200),
        (f"bearer {TOKEN}", 200),
    ],
)
def test_an_anonymous_scraper_needs_the_metrics_token(authorization, status):
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}

    response = APIClient().get("/metrics", **headers)

    assert response.status_code == status
    if status == 401:
        assert "WWW-Authenticate" in response


def test_no_bearer_token_is_accepted_when_none_is_configured(settings):
    settings.METRICS_TOKEN = ""

    response = APIClient().get("/metrics", HTTP_AUTHORIZATION="Bearer ")

    assert response.status_code == 401


def test_a_user_who_is_not_staff_is_refused(django_user_model):
    user = django_user_model.objects.create_user(username="bob", password="bob-password")
    client = APIClient()
    client.force_login(user)
    by_token = APIClient()
    by_token.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")

    assert client.get("/metrics").status_code == 403
    assert by_token.get("/metrics").status_code == 403


def test_a_staff_user_may_read_metrics_by_session_or_token(django_user_model):
    staff = django_user_model.objects.create_user(
        username="ops", password="ops-password", is_staff=True
    )
    client = APIClient()
    client.force_login(staff)
    by_token = APIClient()
    by_token.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff).key}")

    assert client.get("/metrics").status_code == 200
    assert by_token.get("/metrics").status_code == 200


def test_a_second_scrape_within_the_cache_window_does_not_query(django_assert_num_queries):
    make_saga("COMPLETED", duration_ms=100)
    first = scrape()
    make_saga("COMPLETED", duration_ms=100)

    with django_assert_num_queries(0):
        second = scrape()

    assert second == first
    assert value(second, "backtrack_sagas_completed_total", saga_type=TRIP) == 1


def test_a_cache_of_zero_seconds_reads_the_rows_on_every_scrape(settings):
    settings.METRICS_CACHE_S = 0
    make_saga("COMPLETED", duration_ms=100)
    scrape()
    make_saga("COMPLETED", duration_ms=100)

    assert value(scrape(), "backtrack_sagas_completed_total", saga_type=TRIP) == 2


def test_the_endpoint_stays_out_of_the_openapi_schema():
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)

    assert "/metrics" not in schema["paths"]
