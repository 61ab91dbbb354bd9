"""Retention of the engine's rows: task results and (opt-in) terminal sagas, in batches."""

from __future__ import annotations

import runpy
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.models import QuerySet
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_results.models import TaskResult

from config.celery_app import app
from sagas import checks, retention, tasks
from sagas.models import Saga, SagaLog

pytestmark = pytest.mark.django_db

Status = Saga.Status
DAY = timedelta(days=1)
BASE_SETTINGS = Path(settings.BASE_DIR) / "config" / "settings" / "base.py"


@pytest.fixture(autouse=True)
def retention_settings(settings):
    settings.SAGA_RETENTION_BATCH = 1000
    settings.SAGA_RETENTION_MAX_S = 20
    settings.SAGA_RETENTION_TASK_RESULTS_S = 86_400
    settings.SAGA_RETENTION_SAGAS_DAYS = 30
    return settings


@pytest.fixture
def saga_filters():
    """Filters a test registers leave the engine's list as it was."""
    saved = list(retention._saga_filters)
    yield retention._saga_filters
    retention._saga_filters[:] = saved


def task_result(age: timedelta) -> TaskResult:
    row = TaskResult.objects.create(task_id=str(uuid.uuid4()), status="SUCCESS")
    TaskResult.objects.filter(pk=row.pk).update(date_done=timezone.now() - age)
    return row


def saga(
    status: str = Status.COMPLETED,
    *,
    age: timedelta = 40 * DAY,
    resolved: timedelta | None = None,
    logs: int = 2,
    saga_type: str = "trip_booking",
) -> Saga:
    """A saga that ended ``age`` ago, with ``logs`` SagaLog rows."""
    now = timezone.now()
    fields: dict[str, Any] = {}
    if status in Saga.TERMINAL:
        fields["finished_at"] = now - age
    if resolved is not None:
        fields.update(resolved_at=now - resolved, resolved_by="ops", resolution="refunded by hand")
    row = Saga.objects.create(
        saga_type=saga_type, status=status, business_key=f"key:{uuid.uuid4()}", **fields
    )
    for index in range(logs):
        SagaLog.objects.create(
            saga=row,
            step=f"step{index}",
            step_index=index,
            phase=SagaLog.Phase.ACTION,
            status=SagaLog.Status.SUCCEEDED,
            started_at=now - age,
            finished_at=now - age,
        )
    return row


def deletes_from(queries: CaptureQueriesContext, model) -> int:
    table = model._meta.db_table
    return sum(
        query["sql"].startswith("DELETE") and f'FROM "{table}"' in query["sql"]
        for query in queries.captured_queries
    )


def remaining(model) -> set:
    return set(model.objects.values_list("pk", flat=True))


# --- task results ----------------------------------------------------------------------


def test_task_results_older_than_the_retention_are_deleted_and_newer_ones_kept():
    old = [task_result(2 * DAY), task_result(DAY + timedelta(minutes=1))]
    new = [task_result(DAY - timedelta(minutes=1)), task_result(timedelta(0))]

    counts = retention.sagas_purge_expired()

    assert counts == {"task_results": 2, "sagas": 0, "saga_logs": 0, "left": 0}
    assert remaining(TaskResult) == {row.pk for row in new}
    assert not TaskResult.objects.filter(pk__in=[row.pk for row in old]).exists()


def test_five_rows_in_batches_of_two_are_deleted_by_three_deletes(settings):
    settings.SAGA_RETENTION_BATCH = 2
    for _ in range(5):
        task_result(2 * DAY)

    with CaptureQueriesContext(connection) as queries:
        counts = retention.sagas_purge_expired()

    assert counts["task_results"] == 5
    assert TaskResult.objects.count() == 0
    assert deletes_from(queries, TaskResult) == 3


# --- sagas -----------------------------------------------------------------------------


def test_sagas_are_kept_forever_by_default(settings):
    settings.SAGA_RETENTION_SAGAS_DAYS = 0
    kept = saga(age=1000 * DAY)

    counts = retention.sagas_purge_expired()

    assert counts["sagas"] == 0
    assert remaining(Saga) == {kept.pk}
    assert SagaLog.objects.filter(saga=kept).count() == 2


def test_terminal_sagas_past_the_age_go_with_their_logs_and_every_other_saga_stays():
    completed = saga(Status.COMPLETED)
    compensated = saga(Status.COMPENSATED, logs=3)
    resolved = saga(Status.FAILED, resolved=35 * DAY)
    kept = {
        saga(Status.COMPLETED, age=29 * DAY).pk,
        # An unresolved FAILED saga waits for an operator, however old.
        saga(Status.FAILED, age=400 * DAY).pk,
        # Resolved too recently: the operator's resolution is still news.
        saga(Status.FAILED, resolved=2 * DAY).pk,
        saga(Status.RUNNING).pk,
        saga(Status.COMPENSATING).pk,
        saga(Status.PENDING, logs=0).pk,
    }

    counts = retention.sagas_purge_expired()

    assert counts == {"task_results": 0, "sagas": 3, "saga_logs": 7, "left": 0}
    assert remaining(Saga) == kept
    assert not SagaLog.objects.filter(
        saga_id__in=[completed.pk, compensated.pk, resolved.pk]
    ).exists()
    assert set(SagaLog.objects.values_list("saga_id", flat=True)) == kept - {
        Saga.objects.get(status=Status.PENDING).pk
    }


def test_sagas_of_every_type_are_deleted_in_batches(settings):
    settings.SAGA_RETENTION_BATCH = 2
    for index in range(5):
        saga(saga_type="trip_booking", age=(40 + index) * DAY)
    saga(saga_type="toy", logs=1)

    with CaptureQueriesContext(connection) as queries:
        counts = retention.sagas_purge_expired()

    assert counts == {"task_results": 0, "sagas": 6, "saga_logs": 11, "left": 0}
    assert Saga.objects.count() == SagaLog.objects.count() == 0
    # trip_booking: 2 + 2 + 1; toy: 1.
    assert deletes_from(queries, Saga) == 4


def test_a_domain_filter_keeps_the_sagas_it_still_needs(saga_filters):
    needed = saga(Status.COMPLETED)
    spare = saga(Status.COMPLETED)

    @retention.keep_sagas
    def keep_needed(sagas: QuerySet[Saga]) -> QuerySet[Saga]:
        return sagas.exclude(pk=needed.pk)

    retention.keep_sagas(keep_needed)  # registering twice changes nothing
    counts = retention.sagas_purge_expired()

    assert saga_filters.count(keep_needed) == 1
    assert counts["sagas"] == 1
    assert remaining(Saga) == {needed.pk}
    assert SagaLog.objects.filter(saga=needed).count() == 2
    assert not SagaLog.objects.filter(saga_id=spare.pk).exists()


# --- the time budget ---------------------------------------------------------------------


def test_a_spent_budget_stops_the_run_after_one_batch_and_reports_what_is_left(
    settings, monkeypatch
):
    settings.SAGA_RETENTION_BATCH = 2
    monkeypatch.setattr(retention.Budget, "spent", property(lambda self: True))
    for _ in range(5):
        task_result(2 * DAY)
    sagas = [saga() for _ in range(3)]

    first = retention.sagas_purge_expired()
    second = retention.sagas_purge_expired()
    third = retention.sagas_purge_expired()

    # Each kind makes progress in every run: one batch, then the budget is spent.
    assert first == {"task_results": 2, "sagas": 2, "saga_logs": 4, "left": 3 + 1}
    assert second == {"task_results": 2, "sagas": 1, "saga_logs": 2, "left": 1}
    assert third == {"task_results": 1, "sagas": 0, "saga_logs": 0, "left": 0}
    assert TaskResult.objects.count() == 0
    assert not Saga.objects.filter(pk__in=[row.pk for row in sagas]).exists()


def test_the_budget_is_spent_once_its_seconds_have_passed(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(retention.time, "monotonic", lambda: now[0])
    budget = retention.Budget(20)

    now[0] = 119.9
    assert not budget.spent
    now[0] = 120.0
    assert budget.spent


# --- dry run, the task, the schedule ---------------------------------------------------


def test_a_dry_run_counts_what_is_due_and_deletes_nothing():
    task_result(2 * DAY)
    saga(Status.COMPLETED, logs=3)
    saga(Status.FAILED)

    counts = retention.sagas_purge_expired(dry_run=True)

    assert counts == {"task_results": 1, "sagas": 1, "saga_logs": 3, "left": 0}
    assert (TaskResult.objects.count(), Saga.objects.count(), SagaLog.objects.count()) == (
        1,
        2,
        5,
    )


def test_a_run_logs_one_info_line_with_its_counts(caplog):
    task_result(2 * DAY)
    saga()

    with caplog.at_level("INFO", logger="sagas.retention"):
        retention.sagas_purge_expired()

    [record] = caplog.records
    assert record.levelname == "INFO"
    assert record.getMessage().startswith(
        "retention: 1 task results, 1 sagas, 2 saga log rows deleted in "
    )
    assert record.getMessage().endswith("; 0 left")


def test_the_task_calls_the_service_and_returns_its_counts():
    task_result(2 * DAY)

    assert tasks.purge_expired(unknown="ignored") == {
        "task_results": 1,
        "sagas": 0,
        "saga_logs": 0,
        "left": 0,
    }


def test_beat_runs_the_retention_job_hourly_on_the_maintenance_queue():
    scheduled = settings.CELERY_BEAT_SCHEDULE["sagas-purge-expired"]

    assert scheduled["task"] == "sagas.purge_expired"
    assert scheduled["schedule"] == 3600.0
    assert scheduled["options"] == {"queue": "maintenance", "expires": 3600}
    declared = app.tasks["sagas.purge_expired"]
    assert app.amqp.router.route({}, declared.name)["queue"].name == "maintenance"
    assert declared.acks_late is True
    # A run stops after SAGA_RETENTION_MAX_S; the limits leave room for its last batch.
    assert (declared.soft_time_limit, declared.time_limit) == (40, 50)


def test_beat_never_schedules_celerys_single_delete_cleanup():
    assert settings.CELERY_RESULT_EXPIRES is None
    assert app.conf.result_expires is None


# --- settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SAGA_RETENTION_BATCH", 0, "SAGA_RETENTION_BATCH=0 must be at least 1"),
        ("SAGA_RETENTION_MAX_S", "20", "SAGA_RETENTION_MAX_S='20' is not a whole number"),
        (
            "SAGA_RETENTION_TASK_RESULTS_S",
            60,
            "SAGA_RETENTION_TASK_RESULTS_S=60 must be at least 3600",
        ),
        ("SAGA_RETENTION_SAGAS_DAYS", -1, "SAGA_RETENTION_SAGAS_DAYS=-1 must be at least 0"),
        ("SAGA_RETENTION_SAGAS_DAYS", True, "SAGA_RETENTION_SAGAS_DAYS=True is not a whole"),
    ],
)
def test_a_bad_retention_setting_is_refused_by_name(settings, name, value, message):
    setattr(settings, name, value)

    with pytest.raises(ImproperlyConfigured, match=message):
        retention.sagas_purge_expired()
    [error] = checks.check_retention_settings(None)
    assert error.id == "sagas.E005"
    assert message in error.msg


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("SAGA_RETENTION_BATCH", "many", "SAGA_RETENTION_BATCH='many' is not a whole number"),
        ("SAGA_RETENTION_MAX_S", "0", "SAGA_RETENTION_MAX_S=0 must be at least 1"),
        ("SAGA_RETENTION_INTERVAL_S", "10", "SAGA_RETENTION_INTERVAL_S=10 must be at least 60"),
        ("SAGA_RETENTION_SAGAS_DAYS", "-3", "SAGA_RETENTION_SAGAS_DAYS=-3 must be at least 0"),
        (
            "SAGA_RETENTION_TASK_RESULTS_S",
            "600",
            "SAGA_RETENTION_TASK_RESULTS_S=600 must be at least 3600",
        ),
    ],
)
def test_a_bad_retention_variable_stops_the_settings_from_loading(monkeypatch, name, raw, message):
    monkeypatch.setenv(name, raw)

    with pytest.raises(ImproperlyConfigured, match=message):
        runpy.run_path(str(BASE_SETTINGS))


def test_the_variables_set_the_retention_settings_and_the_schedule(monkeypatch):
    monkeypatch.setenv("SAGA_RETENTION_INTERVAL_S", "600")
    monkeypatch.setenv("SAGA_RETENTION_SAGAS_DAYS", "90")

    loaded = runpy.run_path(str(BASE_SETTINGS))

    assert loaded["SAGA_RETENTION_SAGAS_DAYS"] == 90
    assert loaded["SAGA_RETENTION_BATCH"] == 1000
    assert loaded["CELERY_BEAT_SCHEDULE"]["sagas-purge-expired"]["schedule"] == 600.0
