"""The saga engine's writes: the errback's claim, the reconciler and the operator actions.

Most tests use plain ``django_db``, where nothing commits and so nothing is
published. The concurrent claim and the reconciler need real commits
(``transaction=True``); what they publish lands on Redis, where the test reads
it and then purges it.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone

from bookings.models import Booking
from inventory.models import Hold
from sagas import services
from sagas.errors import ChaosFailure, InvalidSagaState, SagaNotFound
from sagas.models import Saga, SagaLog
from tests.conftest import QUEUES, purge_broker
from tests.sagas.support import StandInTask, act, undo

Status = Saga.Status
LogStatus = SagaLog.Status
OPERATOR = SagaLog.Phase.OPERATOR


@pytest.fixture
def book(make_booking):
    return make_booking


def saga_row(status: str = Status.RUNNING, **fields: Any) -> Saga:
    """A trip saga written straight to the database, as the steps would have left it."""
    booking_id = uuid.uuid4()
    now = timezone.now()
    values: dict[str, Any] = {
        "saga_type": "trip_booking",
        "status": status,
        "business_key": f"booking:{booking_id}",
        "context": {"booking_id": str(booking_id), "card_token": "tok_ok"},
        "deadline": now + timedelta(minutes=5),
    }
    if status != Status.PENDING:
        values.update(dispatched_at=now, started_at=now)
    values.update(fields)
    return Saga.objects.create(**values)


def notes(saga: Saga) -> list[str]:
    return list(
        SagaLog.objects.filter(saga=saga, phase=OPERATOR, status=LogStatus.NOTE)
        .order_by("started_at", "id")
        .values_list("error", flat=True)
    )


@pytest.fixture
def broker(celery_worker):
    """The Redis broker, empty before and after the test, with nobody consuming it.

    The suite's worker stops consuming for the test, so what a service
    published is still on the queues to be read.
    """
    from config.celery_app import app

    embedded = [celery_worker.hostname]
    for queue in QUEUES:
        assert app.control.cancel_consumer(queue, destination=embedded, reply=True)
    purge_broker(app)
    client = redis.Redis.from_url(app.conf.broker_url)
    try:
        yield client
    finally:
        purge_broker(app)
        for queue in QUEUES:
            app.control.add_consumer(queue, destination=embedded, reply=True)


def queued(client: redis.Redis) -> list[tuple[str, str, dict]]:
    """(queue, task name, kwargs) of every message waiting on the context queues."""
    messages = []
    for queue in QUEUES:
        for raw in client.lrange(queue, 0, -1):
            payload = json.loads(raw)
            _args, kwargs, _embed = json.loads(base64.b64decode(payload["body"]))
            messages.append((queue, payload["headers"]["task"], kwargs))
    return messages


# --- the errback's claim -----------------------------------------------------------


@pytest.mark.django_db
def test_the_errback_claims_a_running_saga_and_leaves_a_definite_failure_undone(trip, book):
    _booking, saga = book(chaos={"fail": ["reserve_car"]})
    act(trip, saga, "reserve_flight")
    act(trip, saga, "reserve_hotel")
    with pytest.raises(ChaosFailure):
        act(trip, saga, "reserve_car")

    claimed = services.saga_begin_compensation(saga_id=saga.pk, failed_task_id="task-1")

    assert claimed is True
    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    # reserve_car failed for certain (a FAILED attempt on record): only the two before it.
    assert saga.undo_cursor == 2
    assert saga.failure_reason == (
        "step reserve_car failed: sagas.errors.ChaosFailure: chaos: reserve_car fails"
    )


@pytest.mark.django_db
def test_a_failure_report_from_a_stale_copy_of_a_passed_step_claims_nothing(trip, book):
    _booking, saga = book()
    act(trip, saga, "reserve_flight")
    act(trip, saga, "reserve_hotel")
    # A copy of reserve_flight that ran late and failed reports it: the saga has moved on.

    assert services.saga_action_failed(saga_id=saga.pk, failed_task_id="late", step=0) is False

    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.RUNNING, 2)
    # The step in hand failing is a claim as before.
    assert services.saga_action_failed(saga_id=saga.pk, failed_task_id="now", step=2) is True


@pytest.mark.django_db
def test_the_errback_also_undoes_a_step_with_no_definite_failure_on_record(trip, book):
    _booking, saga = book()
    act(trip, saga, "reserve_flight")

    claimed = services.saga_begin_compensation(
        saga_id=saga.pk, failed_task_id="sweeper", reason="deadline passed"
    )

    assert claimed is True
    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    # Nothing says reserve_hotel failed: it may have had an effect, so it is undone too.
    assert saga.undo_cursor == 2
    assert saga.failure_reason == "deadline passed"


@pytest.mark.django_db
def test_a_second_errback_for_the_same_saga_is_a_no_op(trip, book):
    _booking, saga = book(chaos={"fail": ["reserve_hotel"]})
    act(trip, saga, "reserve_flight")
    with pytest.raises(ChaosFailure):
        act(trip, saga, "reserve_hotel")
    assert services.saga_begin_compensation(saga_id=saga.pk, failed_task_id="task-1")
    saga.refresh_from_db()
    before = (saga.status, saga.undo_cursor, saga.failure_reason, saga.updated_at)

    again = services.saga_begin_compensation(
        saga_id=saga.pk, failed_task_id="task-2", reason="a later report"
    )

    assert again is False
    saga.refresh_from_db()
    assert (saga.status, saga.undo_cursor, saga.failure_reason, saga.updated_at) == before
    assert before[:2] == (Status.COMPENSATING, 1)


@pytest.mark.django_db
def test_the_errback_leaves_a_finished_saga_alone():
    saga = saga_row(Status.COMPLETED, steps_done=5, finished_at=timezone.now())

    assert services.saga_begin_compensation(saga_id=saga.pk, failed_task_id="late") is False

    saga.refresh_from_db()
    assert (saga.status, saga.undo_cursor, saga.failure_reason) == (Status.COMPLETED, 0, "")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_errbacks_claiming_one_saga_at_once_let_exactly_one_win(broker):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite serialises writers, so there is no race to test")
    saga = saga_row(Status.RUNNING, steps_done=1, current_step="reserve_flight")
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}
    lock = threading.Lock()

    def claim(name: str) -> None:
        try:
            start.wait()
            outcome: object = services.saga_begin_compensation(
                saga_id=saga.pk, failed_task_id=name, reason=f"claimed by {name}"
            )
        except Exception as exc:  # any error fails the assertion below
            outcome = repr(exc)
        finally:
            connection.close()
        with lock:
            outcomes[name] = outcome

    threads = [threading.Thread(target=claim, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    # The loser found the row locked and failed at once (NOWAIT: its task
    # retries later), or came after the winner committed; either way, asked
    # again, it claims nothing.
    [winner] = [name for name, won in outcomes.items() if won is True]
    [loser] = [name for name in outcomes if name != winner]
    assert outcomes[loser] is False or "could not obtain lock" in str(outcomes[loser])
    assert services.saga_begin_compensation(saga_id=saga.pk, failed_task_id=loser) is False
    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    assert saga.undo_cursor == 2
    assert saga.failure_reason == f"claimed by {winner}"
    # Only the winner queued compensations: one chain, starting newest first.
    assert queued(broker) == [
        ("inventory", "trip_booking.release_hotel", {"saga_id": str(saga.pk), "round": 1})
    ]


# --- the reconciler ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_reconciler_publishes_a_pending_saga_older_than_the_grace_period(broker):
    stale = saga_row(Status.PENDING)
    long_ago = timezone.now() - timedelta(seconds=settings.SAGA_DISPATCH_GRACE_S + 2)
    Saga.objects.filter(pk=stale.pk).update(created_at=long_ago)
    fresh = saga_row(Status.PENDING)

    published = services.sagas_reconcile_pending()

    assert published == 1
    stale.refresh_from_db()
    assert stale.status == Status.RUNNING
    assert stale.dispatched_at is not None
    assert stale.started_at is not None
    fresh.refresh_from_db()
    assert (fresh.status, fresh.dispatched_at) == (Status.PENDING, None)
    assert queued(broker) == [
        ("inventory", "trip_booking.reserve_flight", {"saga_id": str(stale.pk)})
    ]


@pytest.mark.django_db(transaction=True)
def test_the_reconciler_leaves_a_saga_another_reconciler_just_took_alone(broker):
    long_ago = timezone.now() - timedelta(seconds=settings.SAGA_DISPATCH_GRACE_S + 2)
    saga = saga_row(Status.PENDING)
    just_now = timezone.now()
    Saga.objects.filter(pk=saga.pk).update(created_at=long_ago, dispatched_at=just_now)

    assert services.sagas_reconcile_pending() == 0

    saga.refresh_from_db()
    assert (saga.status, saga.dispatched_at) == (Status.PENDING, just_now)
    assert queued(broker) == []


# --- operator actions --------------------------------------------------------------


@pytest.fixture
def failed_trip(trip, book):
    """A trip whose car failed and whose hotel release then failed for good: FAILED."""
    booking, saga = book(chaos={"fail": ["reserve_car"], "compensation_fail": ["release_hotel"]})
    act(trip, saga, "reserve_flight")
    act(trip, saga, "reserve_hotel")
    with pytest.raises(ChaosFailure):
        act(trip, saga, "reserve_car")
    assert services.saga_begin_compensation(saga_id=saga.pk, failed_task_id="task-car")
    budget = trip.steps[trip.index_of("reserve_hotel")].compensation_retry.max_retries
    with pytest.raises(ChaosFailure):
        undo(trip, saga, "reserve_hotel", StandInTask(retries=budget))
    assert services.saga_fail_compensation(saga_id=saga.pk, failed_task_id="task-hotel")
    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    return booking, saga


@pytest.mark.django_db
def test_a_failed_compensation_leaves_the_saga_failed_with_its_reason(failed_trip):
    booking, saga = failed_trip

    assert saga.failure_reason == (
        "compensation of release_hotel exhausted its retries: "
        "sagas.errors.ChaosFailure: chaos: compensation of release_hotel fails"
    )
    assert saga.undo_cursor == 2
    assert saga.finished_at is not None
    assert Booking.objects.get(pk=booking.pk).status == Booking.Status.NEEDS_ATTENTION


@pytest.mark.django_db
def test_retrying_compensation_puts_a_failed_saga_back_to_compensating_without_its_fault(
    trip, failed_trip, operator
):
    booking, saga = failed_trip

    returned = services.saga_retry_compensation(saga_id=saga.pk, operator=operator.username)

    assert returned.pk == saga.pk
    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    assert (saga.finished_at, saga.duration_ms) == (None, None)
    assert saga.undo_cursor == 2
    assert "chaos" not in saga.context
    assert saga.context["booking_id"] == str(booking.pk)
    assert notes(saga) == ["compensation retried by olga (round 2)"]
    # The retried compensation runs, and this time the hotel is released.
    assert undo(trip, saga, "reserve_hotel")["outcome"] == LogStatus.SUCCEEDED
    hotel = booking.lines.get(kind="hotel_room").hold_reference
    assert Hold.objects.get(reference=hotel).status == Hold.Status.RELEASED


@pytest.mark.django_db
def test_marking_a_failed_saga_resolved_records_who_and_why(failed_trip, operator):
    _booking, saga = failed_trip

    services.saga_mark_resolved(
        saga_id=saga.pk, operator=operator.username, reason="  released the room by phone "
    )

    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    assert saga.is_resolved
    assert saga.resolved_by == "olga"
    assert saga.resolution == "released the room by phone"
    assert notes(saga) == ["marked resolved by olga: released the room by phone"]


@pytest.mark.django_db
@pytest.mark.parametrize("reason", ["", "   ", None])
def test_marking_resolved_without_a_reason_is_refused_and_writes_nothing(
    failed_trip, operator, reason
):
    _booking, saga = failed_trip

    with pytest.raises(InvalidSagaState, match=r"^a reason is required to mark a saga resolved$"):
        services.saga_mark_resolved(saga_id=saga.pk, operator=operator.username, reason=reason)

    saga.refresh_from_db()
    assert (saga.resolved_at, saga.resolved_by, saga.resolution) == (None, "", "")
    assert notes(saga) == []


@pytest.mark.django_db
@pytest.mark.parametrize("status", [Status.RUNNING, Status.COMPENSATING, Status.COMPENSATED])
def test_operator_actions_refuse_a_saga_that_is_not_failed(status, operator):
    saga = saga_row(status)

    with pytest.raises(
        InvalidSagaState, match=rf"^only FAILED sagas can retry compensation; this one is {status}$"
    ):
        services.saga_retry_compensation(saga_id=saga.pk, operator=operator.username)
    with pytest.raises(
        InvalidSagaState, match=rf"^only FAILED sagas can be marked resolved; this one is {status}$"
    ):
        services.saga_mark_resolved(saga_id=saga.pk, operator=operator.username, reason="done")

    saga.refresh_from_db()
    assert saga.status == status
    assert not saga.is_resolved
    assert notes(saga) == []


@pytest.mark.django_db
def test_operator_actions_refuse_a_saga_already_resolved_by_hand(failed_trip, operator):
    _booking, saga = failed_trip
    services.saga_mark_resolved(saga_id=saga.pk, operator="olga", reason="refunded by hand")

    with pytest.raises(InvalidSagaState, match=r"^saga was already resolved by hand by olga$"):
        services.saga_retry_compensation(saga_id=saga.pk, operator=operator.username)
    with pytest.raises(InvalidSagaState, match=r"^saga was already resolved by hand by olga$"):
        services.saga_mark_resolved(saga_id=saga.pk, operator="olga", reason="again")

    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    assert saga.resolution == "refunded by hand"
    assert notes(saga) == ["marked resolved by olga: refunded by hand"]


@pytest.mark.django_db
def test_operator_actions_on_an_unknown_saga_say_it_does_not_exist(operator):
    missing = uuid.uuid4()

    with pytest.raises(SagaNotFound, match=rf"^saga {missing} does not exist$"):
        services.saga_retry_compensation(saga_id=missing, operator=operator.username)
    with pytest.raises(SagaNotFound, match=rf"^saga {missing} does not exist$"):
        services.saga_mark_resolved(saga_id=missing, operator=operator.username, reason="done")
