"""Nothing waits forever, whatever fails: frozen sessions, database restarts, poison messages.

Each test breaks a real thing (a PostgreSQL session holding a row lock, every
database session of the worker cut, a worker process that crashes on every
delivery) against the real worker, Redis and database.
"""

from __future__ import annotations

import logging
import os
import uuid
from datetime import timedelta
from unittest import mock

import psycopg
import pytest
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from bookings.models import Booking
from sagas import canvas, tasks
from sagas import services as saga_services
from sagas.definitions import RetryPolicy, SagaDefinition, Step, registry
from sagas.models import Saga, SagaLog
from tests.conftest import wait_for
from tests.functional.support import TRIP_STEPS, book_trip, done_steps, park_after, wait_terminal
from tests.probe_worker import probe_worker

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

LONG_AGO = timedelta(hours=2)
needs_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="row locks and server sessions are PostgreSQL's (SQLite locks the whole file)",
)


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def backdate(saga_id, **fields) -> None:
    Saga.objects.filter(pk=saga_id).update(updated_at=timezone.now() - LONG_AGO, **fields)


def libpq_dsn() -> str:
    database = settings.DATABASES["default"]
    name = connection.settings_dict["NAME"]  # the test database
    return (
        f"host={database.get('HOST') or 'localhost'} port={database.get('PORT') or 5432} "
        f"user={database.get('USER') or 'postgres'} dbname={name}"
    )


# --- a frozen session -------------------------------------------------------------------


@needs_postgres
@pytest.mark.postgres
def test_a_saga_row_locked_by_a_frozen_session_does_not_stop_the_sweeper(customer, trip_items):
    frozen_id = park_after(customer, trip_items, steps=1)
    other_id = park_after(customer, trip_items, steps=1)
    # The frozen saga is the older: the sweeper meets it first.
    Saga.objects.filter(pk=frozen_id).update(updated_at=timezone.now() - 2 * LONG_AGO)
    backdate(other_id)

    # A worker that froze mid-step: its session holds the saga row, idle in transaction.
    with psycopg.connect(libpq_dsn(), autocommit=False) as frozen:
        frozen.execute("SELECT id FROM sagas_saga WHERE id = %s FOR UPDATE", [frozen_id])

        counts = saga_services.sagas_recover_stalled()

        assert counts["resumed"] == 1
        other = wait_terminal(other_id)
        assert other.status == Saga.Status.COMPLETED
        assert done_steps(other_id, phase="action") == TRIP_STEPS
        # The locked saga was left alone this round, not waited for.
        assert Saga.objects.get(pk=frozen_id).steps_done == 1
        frozen.rollback()

    # Once the session is gone, the next sweep takes it.
    assert saga_services.sagas_recover_stalled()["resumed"] == 1
    assert wait_terminal(frozen_id).status == Saga.Status.COMPLETED


@needs_postgres
@pytest.mark.postgres
def test_an_errback_never_waits_for_a_locked_saga_row(customer, trip_items):
    saga_id = park_after(customer, trip_items, steps=1)
    with psycopg.connect(libpq_dsn(), autocommit=False) as frozen:
        frozen.execute("SELECT id FROM sagas_saga WHERE id = %s FOR UPDATE", [saga_id])
        # NOWAIT: the errback fails at once (and its task retries later) ...
        with pytest.raises(Exception, match="could not obtain lock"), transaction.atomic():
            saga_services.saga_begin_compensation(saga_id=saga_id, step=1)
        # ... and the sweeper skips the row.
        assert not saga_services.saga_begin_compensation(saga_id=saga_id, skip_locked=True)
        frozen.rollback()
    assert Saga.objects.get(pk=saga_id).status == Saga.Status.RUNNING


@needs_postgres
def test_database_sessions_are_bounded():
    with connection.cursor() as cursor:
        values = {}
        for name in (
            "lock_timeout",
            "statement_timeout",
            "idle_in_transaction_session_timeout",
            "tcp_keepalives_idle",
        ):
            cursor.execute(f"SHOW {name}")
            values[name] = cursor.fetchone()[0]
    assert values == {
        "lock_timeout": "5s",
        "statement_timeout": "1min",
        "idle_in_transaction_session_timeout": "20s",
        "tcp_keepalives_idle": "10",
    }


# --- a database restart -------------------------------------------------------------------


def cut_every_other_session() -> int:
    """What a database restart does to every client: their sessions end under them.

    Every session of the test database but this one (the embedded worker's
    included) is terminated, as PostgreSQL does to all of them when it restarts.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def warm_worker_connection(customer, trip_items) -> None:
    """Have the worker run a step, so its (reused) connection is open."""
    saga = wait_terminal(book_trip(customer, trip_items).saga_id)
    assert saga.status == Saga.Status.COMPLETED


@needs_postgres
@pytest.mark.postgres
def test_a_database_restart_under_a_running_worker_loses_no_saga_level_task(customer, trip_items):
    warm_worker_connection(customer, trip_items)
    failed_id = park_after(customer, trip_items, steps=2)
    assert cut_every_other_session() >= 1

    # The car step failed for good; its errback reaches a worker whose
    # connection died with the database.
    canvas.saga_task(canvas.STEP_FAILED, failed_id, step=2).apply_async(args=("lost-car",))

    saga = wait_terminal(failed_id, timeout=30)
    assert saga.status == Saga.Status.COMPENSATED
    assert done_steps(failed_id, phase="compensation") == [
        "release_car",
        "release_hotel",
        "release_flight",
    ]
    assert Booking.objects.get(saga_id=failed_id).status == Booking.Status.REJECTED


@needs_postgres
@pytest.mark.postgres
def test_the_finish_of_a_compensation_survives_a_database_restart(customer, trip_items):
    warm_worker_connection(customer, trip_items)
    saga_id = park_after(customer, trip_items, steps=0)
    Saga.objects.filter(pk=saga_id).update(status=Saga.Status.COMPENSATING, round=1)
    assert cut_every_other_session() >= 1

    canvas.saga_task(canvas.FINISH_COMPENSATION, saga_id, round=1).apply_async()

    assert wait_terminal(saga_id, timeout=30).status == Saga.Status.COMPENSATED


@needs_postgres
@pytest.mark.postgres
def test_a_step_whose_connection_was_cut_is_retried_outside_its_budget(customer, trip_items):
    warm_worker_connection(customer, trip_items)
    assert cut_every_other_session() >= 1

    booking = book_trip(customer, trip_items)

    saga = wait_terminal(booking.saga_id)
    assert saga.status == Saga.Status.COMPLETED, saga.failure_reason
    flight = SagaLog.objects.filter(saga=saga, step="reserve_flight", phase="action")
    # The attempt on the dead connection wrote nothing; the one after it succeeded.
    assert list(flight.values_list("status", flat=True)) == ["succeeded"]


# --- a PENDING saga past its deadline, a saga of an unknown type ---------------------------


def unpublished_booking(customer, trip_items) -> Booking:
    """A booking committed with its saga, whose publish never reached the broker."""
    with mock.patch("sagas.canvas.action_chain", side_effect=OSError("broker down")):
        return book_trip(customer, trip_items)


def test_an_overdue_pending_saga_ends_without_running_its_steps(customer, trip_items):
    booking = unpublished_booking(customer, trip_items)
    saga_id = booking.saga_id
    assert Saga.objects.get(pk=saga_id).status == Saga.Status.PENDING
    long_ago = timezone.now() - LONG_AGO
    Saga.objects.filter(pk=saga_id).update(created_at=long_ago, deadline=long_ago)

    assert saga_services.sagas_reconcile_pending() == 0

    saga = Saga.objects.get(pk=saga_id)
    assert saga.status == Saga.Status.COMPENSATED
    assert saga.failure_reason.startswith("deadline passed before any step ran")
    assert saga.finished_at is not None
    assert not SagaLog.objects.filter(saga_id=saga_id, phase="action").exists()
    assert Booking.objects.get(pk=booking.pk).status == Booking.Status.REJECTED
    # A copy of its first step that shows up late does nothing.
    canvas.action_signature(registry.get("trip_booking"), 0, str(saga_id)).apply_async()
    wait_for(lambda: SagaLog.objects.filter(saga_id=saga_id, status="ignored").exists())
    assert Saga.objects.get(pk=saga_id).steps_done == 0


def test_an_overdue_pending_saga_still_queued_is_ended_all_the_same(customer, trip_items):
    """Published, but marking it RUNNING failed, and its queue is not consumed in time."""
    booking = unpublished_booking(customer, trip_items)
    saga_id = booking.saga_id
    long_ago = timezone.now() - LONG_AGO
    Saga.objects.filter(pk=saga_id).update(
        created_at=long_ago, deadline=long_ago, dispatched_at=long_ago
    )
    with mock.patch("sagas.broker.sagas_in_broker", return_value={str(saga_id)}):
        saga_services.sagas_reconcile_pending()

    saga = Saga.objects.get(pk=saga_id)
    assert saga.status == Saga.Status.COMPENSATED
    assert saga.failure_reason.startswith("deadline passed before any step ran")


def test_a_saga_of_an_unknown_type_does_not_block_the_reconciler(customer, trip_items, caplog):
    long_ago = timezone.now() - LONG_AGO
    orphans = [
        Saga.objects.create(
            saga_type="retired_type",
            business_key=f"orphan:{n}",
            created_at=long_ago,
            deadline=timezone.now() + LONG_AGO,
        )
        for n in range(3)
    ]
    booking = unpublished_booking(customer, trip_items)
    Saga.objects.filter(pk=booking.saga_id).update(created_at=timezone.now() - timedelta(minutes=1))

    with caplog.at_level(logging.ERROR, logger="sagas.services"):
        published = saga_services.sagas_reconcile_pending(limit=2)

    assert published == 1
    assert wait_terminal(booking.saga_id).status == Saga.Status.COMPLETED
    assert {saga.status for saga in Saga.objects.filter(pk__in=[o.pk for o in orphans])} == {
        Saga.Status.PENDING
    }
    assert "retired_type (3)" in caplog.text


# --- a poison compensation ------------------------------------------------------------------

POISON_SAGA = "poison_probe"
POISON_QUEUE = "poison-probe"
# Set in the worker subprocess, which imports this module to know the probe saga.
WORKER_FLAG = "SAGAS_POISON_PROBE_WORKER"


def reserve(saga: Saga) -> dict:
    return {"reserved": True}


def crash(saga: Saga) -> dict:
    """A compensation that takes its worker process down on every delivery."""
    os._exit(70)


def refuse(saga: Saga) -> dict:
    raise ValueError("refused for good")


def declare_poison_saga() -> SagaDefinition:
    definition = SagaDefinition(
        POISON_SAGA,
        steps=[
            Step("reserve", reserve, crash, queue=POISON_QUEUE, compensation_name="unreserve"),
            Step("refuse", refuse, queue=POISON_QUEUE, retry=RetryPolicy(max_retries=0)),
        ],
    )
    tasks.register_step_tasks()
    return definition


if os.environ.get(WORKER_FLAG):
    declare_poison_saga()


@pytest.fixture
def poison_worker(scratch_registry, tmp_path):
    """The poison saga declared here, and a prefork worker (-c 1) that knows it too."""
    definition = declare_poison_saga()
    logfile = tmp_path / "worker.log"
    with probe_worker(
        module=__name__, flag=WORKER_FLAG, queues=(POISON_QUEUE,), logfile=logfile, name="poison"
    ):
        yield definition, logfile


def test_a_compensation_that_crashes_its_worker_every_time_ends_failed_after_the_bound(
    poison_worker,
):
    _definition, logfile = poison_worker
    with transaction.atomic():
        saga = saga_services.saga_start(
            saga_type=POISON_SAGA, business_key=f"poison:{uuid.uuid4()}"
        )

    done = wait_terminal(saga.pk, timeout=90)

    assert done.status == Saga.Status.FAILED, done.failure_reason
    bound = settings.SAGA_MAX_LOST_DELIVERIES
    assert done.failure_reason.startswith("compensation of unreserve crashed its worker too often")
    assert f"lost its worker {bound + 1} times" in done.failure_reason
    rows = SagaLog.objects.filter(saga=saga, phase="compensation").order_by("id")
    statuses = list(rows.values_list("status", flat=True))
    # Every delivery after the first came back because its worker died; the one
    # past the bound was not run but failed, so the saga could end.
    assert statuses == ["lost"] * (bound + 1) + ["timed_out"], statuses
    assert logfile.read_text().count("WorkerLostError") >= bound + 1
