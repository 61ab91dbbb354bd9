"""Retention in the bookings context: Idempotency-Keys expire; sagas of open bookings stay."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django_celery_results.models import TaskResult

from bookings import retention, tasks
from bookings.models import Booking, IdempotencyKey
from config.celery_app import app
from sagas.models import Saga, SagaLog

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


@pytest.fixture(autouse=True)
def retention_settings(settings):
    settings.SAGA_RETENTION_BATCH = 1000
    settings.SAGA_RETENTION_MAX_S = 20
    settings.SAGA_RETENTION_TASK_RESULTS_S = 86_400
    settings.SAGA_RETENTION_SAGAS_DAYS = 0
    settings.BOOKINGS_IDEMPOTENCY_KEY_TTL_S = 86_400
    return settings


@pytest.fixture
def booking(customer):
    def make(status: str = Booking.Status.CONFIRMED, **fields) -> Booking:
        return Booking.objects.create(
            user=customer,
            customer_name="Alice Example",
            customer_email="alice@example.com",
            status=status,
            total=Decimal("360.00"),
            currency="EUR",
            **fields,
        )

    return make


@pytest.fixture
def key(customer, booking):
    made = booking()

    def make(age: timedelta) -> IdempotencyKey:
        row = IdempotencyKey.objects.create(
            user=customer,
            key=str(uuid.uuid4()),
            fingerprint="f" * 64,
            booking=made,
            response={"id": str(made.id)},
        )
        IdempotencyKey.objects.filter(pk=row.pk).update(created_at=timezone.now() - age)
        return row

    return make


def ended_saga(saga_type: str = "trip_booking", *, age: timedelta = 40 * DAY) -> Saga:
    now = timezone.now()
    saga = Saga.objects.create(
        saga_type=saga_type,
        status=Saga.Status.COMPLETED,
        business_key=f"booking:{uuid.uuid4()}",
        finished_at=now - age,
    )
    SagaLog.objects.create(
        saga=saga,
        step="reserve_flight",
        step_index=0,
        phase=SagaLog.Phase.ACTION,
        status=SagaLog.Status.SUCCEEDED,
        started_at=now - age,
        finished_at=now - age,
    )
    return saga


# --- Idempotency-Keys ---------------------------------------------------------------


def test_keys_older_than_their_ttl_are_deleted_and_their_bookings_kept(key):
    old = [key(2 * DAY), key(DAY + timedelta(minutes=1))]
    new = [key(DAY - timedelta(minutes=1)), key(timedelta(0))]

    counts = retention.idempotency_keys_purge()

    assert counts == {"idempotency_keys": 2, "left": 0}
    assert set(IdempotencyKey.objects.values_list("pk", flat=True)) == {row.pk for row in new}
    assert Booking.objects.filter(pk=old[0].booking_id).exists()


def test_keys_are_deleted_in_batches_of_the_engines_size(settings, key):
    settings.SAGA_RETENTION_BATCH = 2
    for _ in range(5):
        key(2 * DAY)

    with CaptureQueriesContext(connection) as queries:
        counts = retention.idempotency_keys_purge()

    assert counts == {"idempotency_keys": 5, "left": 0}
    assert IdempotencyKey.objects.count() == 0
    table = f'"{IdempotencyKey._meta.db_table}"'
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert sum(table in sql for sql in deletes) == 3


def test_a_spent_budget_stops_after_one_batch_and_reports_the_keys_left(settings, monkeypatch, key):
    settings.SAGA_RETENTION_BATCH = 2
    monkeypatch.setattr(retention.Budget, "spent", property(lambda self: True))
    for _ in range(5):
        key(2 * DAY)

    assert retention.idempotency_keys_purge() == {"idempotency_keys": 2, "left": 3}
    assert IdempotencyKey.objects.count() == 3


def test_a_ttl_below_a_minute_is_refused_by_name(settings):
    settings.BOOKINGS_IDEMPOTENCY_KEY_TTL_S = 5

    with pytest.raises(ImproperlyConfigured, match="BOOKINGS_IDEMPOTENCY_KEY_TTL_S=5 must be"):
        retention.idempotency_keys_purge()


def test_the_task_purges_keys_and_returns_its_counts(key):
    key(2 * DAY)

    assert tasks.purge_idempotency_keys(unknown="ignored") == {"idempotency_keys": 1, "left": 0}


def test_beat_purges_keys_hourly_on_the_maintenance_queue():
    scheduled = settings.CELERY_BEAT_SCHEDULE["bookings-purge-idempotency-keys"]

    assert scheduled["task"] == "bookings.purge_idempotency_keys"
    assert scheduled["schedule"] == 3600.0
    assert scheduled["options"] == {"queue": "maintenance", "expires": 3600}
    app.loader.import_default_modules()
    declared = app.tasks["bookings.purge_idempotency_keys"]
    assert app.amqp.router.route({}, declared.name)["queue"].name == "maintenance"
    assert declared.acks_late is True
    assert (declared.soft_time_limit, declared.time_limit) == (40, 50)


# --- the sagas bookings still need ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kept"),
    [
        # Cancelling a confirmed booking reads the card token from its trip saga.
        (Booking.Status.CONFIRMED, True),
        (Booking.Status.CANCELLING, True),
        (Booking.Status.NEEDS_ATTENTION, True),
        (Booking.Status.REJECTED, False),
        (Booking.Status.CANCELLED, False),
    ],
)
def test_the_sagas_of_a_booking_stay_while_it_can_still_change(settings, booking, status, kept):
    settings.SAGA_RETENTION_SAGAS_DAYS = 30
    trip, cancellation = ended_saga(), ended_saga("booking_cancellation")
    made = booking(status, saga_id=trip.id, cancel_saga_id=cancellation.id)

    call_command("purge_expired", stdout=StringIO())

    assert Saga.objects.filter(pk__in=[trip.id, cancellation.id]).count() == (2 if kept else 0)
    assert SagaLog.objects.count() == (2 if kept else 0)
    # The booking is never deleted: it keeps the ids of sagas that are gone.
    made.refresh_from_db()
    assert (made.status, made.saga_id, made.cancel_saga_id) == (
        status,
        trip.id,
        cancellation.id,
    )


# --- the command --------------------------------------------------------------------


def test_the_command_deletes_what_both_jobs_delete_and_prints_the_counts(settings, key):
    settings.SAGA_RETENTION_SAGAS_DAYS = 30
    key(2 * DAY)
    ended_saga()
    TaskResult.objects.create(task_id="old", status="SUCCESS")
    TaskResult.objects.update(date_done=timezone.now() - 2 * DAY)
    out = StringIO()

    call_command("purge_expired", stdout=out)

    assert out.getvalue() == (
        "1 task results, 1 sagas, 1 saga log rows, 1 idempotency keys deleted; 0 left\n"
    )
    assert (TaskResult.objects.count(), Saga.objects.count(), IdempotencyKey.objects.count()) == (
        0,
        0,
        0,
    )


def test_a_dry_run_of_the_command_counts_and_deletes_nothing(settings, key):
    settings.SAGA_RETENTION_SAGAS_DAYS = 30
    key(2 * DAY)
    key(timedelta(0))
    ended_saga()
    out = StringIO()

    call_command("purge_expired", "--dry-run", stdout=out)

    assert out.getvalue() == (
        "0 task results, 1 sagas, 1 saga log rows, 1 idempotency keys due; 0 left\n"
    )
    assert (IdempotencyKey.objects.count(), Saga.objects.count(), SagaLog.objects.count()) == (
        2,
        1,
        1,
    )


def test_the_command_turns_a_bad_setting_into_a_command_error(settings):
    settings.SAGA_RETENTION_BATCH = 0

    with pytest.raises(CommandError, match="SAGA_RETENTION_BATCH=0 must be at least 1"):
        call_command("purge_expired", "--dry-run", stdout=StringIO())
