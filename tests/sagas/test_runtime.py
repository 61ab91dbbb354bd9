"""The step wrapper, called as a worker's task calls it, without Celery.

``run_action`` / ``run_compensation`` take a bound task; a stand-in gives them
the ``request`` and ``retry`` they read. Each test drives one trip saga made
by ``booking_create`` through the barrier's outcomes and checks the rows it
leaves: the saga's counters, its log and the inventory the steps touch.

Plain ``django_db``: no transaction commits, so nothing is ever published.
"""

from __future__ import annotations

from functools import partial
from unittest import mock

import pytest
from celery.exceptions import Ignore, Retry
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext

from bookings.models import Booking
from inventory.models import Hold, Item
from sagas.errors import ChaosFailure, ChaosTransientError, PoisonMessage
from sagas.models import Saga, SagaLog
from sagas.runtime import _Attempt
from sagas.services import saga_begin_compensation
from tests.sagas.support import StandInTask, act, undo

pytestmark = pytest.mark.django_db

Status = Saga.Status
LogStatus = SagaLog.Status
ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION


@pytest.fixture
def book(make_booking):
    """A booking of two flight seats, a hotel room and a car; its trip saga is PENDING."""
    return partial(make_booking, flight_seats=2)


def counts(sku: str) -> tuple[int, int, int]:
    item = Item.objects.get(sku=sku)
    return item.available, item.held, item.sold


def holds(booking: Booking, kind: str) -> list[tuple[str, int, str]]:
    references = [line.hold_reference for line in booking.lines.filter(kind=kind)]
    return list(
        Hold.objects.filter(reference__in=references).values_list("reference", "quantity", "status")
    )


def log_rows(saga: Saga) -> list[tuple[str, str, str, int]]:
    return list(
        SagaLog.objects.filter(saga=saga)
        .order_by("started_at", "id")
        .values_list("step", "phase", "status", "attempt")
    )


# --- actions -----------------------------------------------------------------------


def test_the_first_run_of_an_action_has_its_effect_logs_success_and_moves_the_counter(trip, book):
    booking, saga = book()
    task = StandInTask()

    reply = act(trip, saga, "reserve_flight", task)

    flight_line = booking.lines.get(kind="flight_seat")
    assert reply == {"saga_id": str(saga.pk), "step": "reserve_flight", "outcome": "succeeded"}
    assert holds(booking, "flight_seat") == [(flight_line.hold_reference, 2, Hold.Status.HELD)]
    assert counts("FL-TEST") == (3, 2, 0)
    saga.refresh_from_db()
    assert saga.status == Status.RUNNING
    assert saga.steps_done == 1
    assert saga.current_step == "reserve_flight"
    assert saga.started_at is not None
    row = SagaLog.objects.get(saga=saga)
    assert (row.step, row.step_index, row.phase, row.status, row.attempt) == (
        "reserve_flight",
        0,
        ACTION,
        LogStatus.SUCCEEDED,
        1,
    )
    assert row.task_id == task.request.id
    assert row.worker == "test@sagas"
    assert row.result == {"held": [flight_line.hold_reference]}
    assert row.finished_at >= row.started_at


def test_the_last_action_completes_the_saga(trip, book):
    booking, saga = book()
    for step in trip.action_names[:-1]:
        act(trip, saga, step)
    # charge_payment ran through the fake gateway: the booking is paid, not yet confirmed.
    assert Booking.objects.get(pk=booking.pk).status == Booking.Status.PENDING

    reply = act(trip, saga, "confirm_booking")

    assert reply["outcome"] == LogStatus.SUCCEEDED
    saga.refresh_from_db()
    assert saga.status == Status.COMPLETED
    assert saga.steps_done == len(trip.steps)
    assert saga.finished_at is not None
    assert saga.duration_ms is not None
    assert Booking.objects.get(pk=booking.pk).status == Booking.Status.CONFIRMED
    assert counts("FL-TEST") == (3, 0, 2)
    assert [step for step, *_ in log_rows(saga)] == trip.action_names


def test_a_second_delivery_of_a_done_action_is_a_duplicate_with_no_second_effect(trip, book):
    booking, saga = book()
    act(trip, saga, "reserve_flight")

    reply = act(trip, saga, "reserve_flight")

    # Returned, not raised: the chain goes on to the next step.
    assert reply == {"saga_id": str(saga.pk), "step": "reserve_flight", "outcome": "duplicate"}
    assert len(holds(booking, "flight_seat")) == 1
    assert counts("FL-TEST") == (3, 2, 0)
    saga.refresh_from_db()
    assert saga.steps_done == 1
    assert log_rows(saga) == [
        ("reserve_flight", ACTION, LogStatus.SUCCEEDED, 1),
        ("reserve_flight", ACTION, LogStatus.DUPLICATE, 1),
    ]
    assert SagaLog.objects.get(saga=saga, status=LogStatus.DUPLICATE).error == "already done"


def test_a_duplicate_delivery_never_reaches_the_step_body(trip, book):
    _booking, saga = book()
    act(trip, saga, "reserve_flight")
    # Were the body entered again, this plan would make it fail.
    Saga.objects.filter(pk=saga.pk).update(
        context={**saga.context, "chaos": {"fail": ["reserve_flight"]}}
    )

    reply = act(trip, saga, "reserve_flight")

    assert reply["outcome"] == LogStatus.DUPLICATE
    assert not SagaLog.objects.filter(saga=saga, status=LogStatus.FAILED).exists()


def test_an_action_whose_predecessor_has_not_run_is_ignored_and_stops_its_copy_of_the_chain(
    trip, book
):
    booking, saga = book()

    with pytest.raises(Ignore, match="not due yet: reserve_flight comes first"):
        act(trip, saga, "reserve_hotel")

    assert holds(booking, "hotel_room") == []
    assert counts("HT-TEST") == (5, 0, 0)
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.PENDING, 0)
    row = SagaLog.objects.get(saga=saga)
    assert (row.step, row.phase, row.status) == ("reserve_hotel", ACTION, LogStatus.IGNORED)
    assert row.error == "not due yet: reserve_flight comes first"


def test_an_action_arriving_after_compensation_began_is_ignored_and_has_no_effect(trip, book):
    booking, saga = book()
    act(trip, saga, "reserve_flight")
    act(trip, saga, "reserve_hotel")
    assert saga_begin_compensation(saga_id=saga.pk, reason="deadline passed")

    with pytest.raises(Ignore, match="saga is COMPENSATING: action not run"):
        act(trip, saga, "reserve_car")

    assert holds(booking, "car") == []
    assert counts("CR-TEST") == (5, 0, 0)
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.COMPENSATING, 2)
    row = SagaLog.objects.filter(saga=saga).latest("started_at", "id")
    assert (row.step, row.phase, row.status) == ("reserve_car", ACTION, LogStatus.IGNORED)
    assert row.error == "saga is COMPENSATING: action not run"


# --- compensations -----------------------------------------------------------------


def test_a_compensation_whose_action_never_ran_is_skipped_and_succeeds(trip, book):
    booking, saga = book()
    act(trip, saga, "reserve_flight")
    # No attempt of reserve_hotel on record, so it may have had an effect:
    # the claim puts it among the steps to undo.
    assert saga_begin_compensation(saga_id=saga.pk, reason="worker lost during reserve_hotel")
    saga.refresh_from_db()
    assert saga.undo_cursor == 2

    reply = undo(trip, saga, "reserve_hotel")

    assert reply == {"saga_id": str(saga.pk), "step": "release_hotel", "outcome": "skipped"}
    assert counts("HT-TEST") == (5, 0, 0)
    saga.refresh_from_db()
    assert (saga.status, saga.undo_cursor, saga.current_step) == (
        Status.COMPENSATING,
        1,
        "release_hotel",
    )
    row = SagaLog.objects.get(saga=saga, phase=COMPENSATION)
    assert (row.step, row.step_index, row.status, row.result) == (
        "release_hotel",
        1,
        LogStatus.SKIPPED,
        None,
    )
    # The chain goes on: the flight, which was held, is released.
    assert undo(trip, saga, "reserve_flight")["outcome"] == LogStatus.SUCCEEDED
    assert [status for _ref, _qty, status in holds(booking, "flight_seat")] == [
        Hold.Status.RELEASED
    ]
    assert counts("FL-TEST") == (5, 0, 0)


def test_a_second_delivery_of_a_done_compensation_is_a_duplicate_with_no_second_effect(trip, book):
    _booking, saga = book()
    act(trip, saga, "reserve_flight")
    assert saga_begin_compensation(saga_id=saga.pk, reason="worker lost during reserve_hotel")
    undo(trip, saga, "reserve_hotel")
    undo(trip, saga, "reserve_flight")

    reply = undo(trip, saga, "reserve_flight")

    assert reply == {"saga_id": str(saga.pk), "step": "release_flight", "outcome": "duplicate"}
    assert counts("FL-TEST") == (5, 0, 0)
    saga.refresh_from_db()
    assert saga.undo_cursor == 0
    assert list(
        SagaLog.objects.filter(saga=saga, step="release_flight").values_list("status", flat=True)
    ) == [LogStatus.SUCCEEDED, LogStatus.DUPLICATE]


# --- retries and failures ----------------------------------------------------------


def test_a_transient_error_within_the_budget_logs_retrying_and_asks_celery_to_retry(trip, book):
    booking, saga = book(chaos={"transient": {"reserve_flight": 1}})
    task = StandInTask(retries=0)

    with pytest.raises(Retry):
        act(trip, saga, "reserve_flight", task)

    [call] = task.retry_calls
    assert isinstance(call["exc"], ChaosTransientError)
    assert call["max_retries"] == trip.steps[0].retry.max_retries
    assert 0 < call["countdown"] <= trip.steps[0].retry.max_backoff_s
    row = SagaLog.objects.get(saga=saga)
    assert (row.step, row.status, row.attempt) == ("reserve_flight", LogStatus.RETRYING, 1)
    assert row.error == (
        "ChaosTransientError: chaos: reserve_flight fails transiently (attempt 1) "
        f"(retry in {call['countdown']}s)"
    )
    assert holds(booking, "flight_seat") == []
    saga.refresh_from_db()
    assert saga.steps_done == 0

    # The retry Celery sends is the second attempt, and the fault is gone by then.
    assert act(trip, saga, "reserve_flight", StandInTask(retries=1))["outcome"] == "succeeded"
    assert log_rows(saga) == [
        ("reserve_flight", ACTION, LogStatus.RETRYING, 1),
        ("reserve_flight", ACTION, LogStatus.SUCCEEDED, 2),
    ]
    assert counts("FL-TEST") == (3, 2, 0)


def test_a_transient_error_after_the_last_retry_logs_failed_and_is_raised(trip, book):
    booking, saga = book(chaos={"transient": {"reserve_flight": 10}})
    budget = trip.steps[0].retry.max_retries
    task = StandInTask(retries=budget)

    with pytest.raises(ChaosTransientError):
        act(trip, saga, "reserve_flight", task)

    assert task.retry_calls == []
    row = SagaLog.objects.get(saga=saga)
    assert (row.status, row.attempt) == (LogStatus.FAILED, budget + 1)
    assert row.error == (
        f"sagas.errors.ChaosTransientError: chaos: reserve_flight fails transiently "
        f"(attempt {budget + 1})"
    )
    assert holds(booking, "flight_seat") == []


def test_a_permanent_failure_logs_failed_and_is_raised_without_a_retry(trip, book):
    booking, saga = book(chaos={"fail": ["reserve_car"]})
    act(trip, saga, "reserve_flight")
    act(trip, saga, "reserve_hotel")
    task = StandInTask()

    with pytest.raises(ChaosFailure, match="chaos: reserve_car fails"):
        act(trip, saga, "reserve_car", task)

    assert task.retry_calls == []
    assert holds(booking, "car") == []
    assert counts("CR-TEST") == (5, 0, 0)
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.RUNNING, 2)
    row = SagaLog.objects.filter(saga=saga).latest("started_at", "id")
    assert (row.step, row.phase, row.status, row.attempt) == (
        "reserve_car",
        ACTION,
        LogStatus.FAILED,
        1,
    )
    assert row.error == "sagas.errors.ChaosFailure: chaos: reserve_car fails"


# --- the database going away, a worker lost again and again -------------------------


class OutageTask(StandInTask):
    """A stand-in whose message carries the outage retries already spent, maybe redelivered."""

    def __init__(self, *, retries: int = 0, outages: int = 0, redelivered: bool = False) -> None:
        super().__init__(retries=retries)
        self.request.kwargs = {"saga_id": "x", "outages": outages} if outages else {}
        self.request.delivery_info = {"redelivered": redelivered}


def test_a_step_that_cannot_reach_the_database_is_retried_outside_its_budget(trip, book):
    _booking, saga = book()
    task = OutageTask(retries=3)  # the step's own budget (3 retries) is already spent
    lost = OperationalError("terminating connection due to administrator command")

    with mock.patch("sagas.barrier.claim_action", side_effect=lost), pytest.raises(Retry):
        act(trip, saga, "reserve_flight", task)

    [call] = task.retry_calls
    assert call["kwargs"]["outages"] == 1
    assert call["max_retries"] == 4  # one more than the retries so far: always allowed
    assert 0 < call["countdown"] <= 1.0
    assert call["exc"] is lost
    # Nothing of the failed attempt is recorded: its transaction rolled back.
    assert log_rows(saga) == []


def test_outage_retries_are_bounded_then_the_step_policy_decides(trip, book, settings):
    _booking, saga = book()
    task = OutageTask(retries=5, outages=settings.SAGA_OUTAGE_RETRIES)
    lost = OperationalError("the connection is lost")

    with mock.patch("sagas.barrier.claim_action", side_effect=lost), pytest.raises(Retry):
        act(trip, saga, "reserve_flight", task)

    # 5 retries, all but... none of them the step's: its policy retries once more.
    [call] = task.retry_calls
    assert "kwargs" not in call
    assert call["max_retries"] == 3 + settings.SAGA_OUTAGE_RETRIES
    assert log_rows(saga) == [("reserve_flight", ACTION, LogStatus.RETRYING, 6)]


def test_a_retry_whose_log_row_cannot_be_written_is_still_a_retry(trip, book):
    _booking, saga = book(chaos={"transient": {"reserve_flight": 1}})
    task = StandInTask()
    real_log = _Attempt.log

    def failing_log(self, status, **kwargs):
        if status == LogStatus.RETRYING:
            raise OperationalError("server closed the connection unexpectedly")
        return real_log(self, status, **kwargs)

    with mock.patch.object(_Attempt, "log", failing_log), pytest.raises(Retry):
        act(trip, saga, "reserve_flight", task)

    assert len(task.retry_calls) == 1
    assert isinstance(task.retry_calls[0]["exc"], ChaosTransientError)
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.PENDING, 0)


def test_a_duplicate_whose_log_row_cannot_be_written_still_lets_the_chain_go_on(trip, book):
    _booking, saga = book()
    act(trip, saga, "reserve_flight")

    with mock.patch.object(_Attempt, "log", side_effect=OperationalError("the connection is lost")):
        reply = act(trip, saga, "reserve_flight")

    assert reply["outcome"] == LogStatus.DUPLICATE


def test_deliveries_lost_with_their_worker_are_counted_and_bounded(trip, book, settings):
    settings.SAGA_MAX_LOST_DELIVERIES = 2
    _booking, saga = book()

    for _ in range(2):  # came back twice after a crash, then crashed again: nothing committed
        with (
            mock.patch("sagas.barrier.claim_action", side_effect=SystemExit("worker died")),
            pytest.raises(SystemExit),
        ):
            act(trip, saga, "reserve_flight", OutageTask(redelivered=True))
    with pytest.raises(PoisonMessage, match="lost its worker 3 times"):
        act(trip, saga, "reserve_flight", OutageTask(redelivered=True))

    assert log_rows(saga) == [
        ("reserve_flight", ACTION, LogStatus.LOST, 1),
        ("reserve_flight", ACTION, LogStatus.LOST, 1),
        ("reserve_flight", ACTION, LogStatus.LOST, 1),
        ("reserve_flight", ACTION, LogStatus.TIMED_OUT, 1),
    ]
    # Every one of them may have had its effect: the errback undoes the step too.
    assert set(SagaLog.objects.filter(saga=saga).values_list("may_have_effect", flat=True)) == {
        True
    }
    saga.refresh_from_db()
    assert saga.steps_done == 0


def test_a_first_delivery_records_nothing_extra(trip, book):
    _booking, saga = book()
    with CaptureQueriesContext(connection) as queries:
        act(trip, saga, "reserve_flight", OutageTask())
    # No count of earlier lost deliveries, no extra row: that is for redeliveries only.
    assert not [q for q in queries if "COUNT(" in q["sql"].upper()]
    assert log_rows(saga) == [("reserve_flight", ACTION, LogStatus.SUCCEEDED, 1)]
