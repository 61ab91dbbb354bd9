"""The trip-booking saga end to end: real worker, real Redis, real database."""

from decimal import Decimal
from unittest import mock

import pytest
from django.utils import timezone

from bookings.models import Booking
from bookings.saga_steps import trip_booking
from inventory import selectors as inventory_selectors
from payments import selectors as payment_selectors
from sagas import services as saga_services
from sagas.canvas import action_chain, action_signature, compensation_signature
from sagas.models import Saga, SagaLog
from sagas.tasks import step_failed
from tests.conftest import wait_for
from tests.functional.support import (
    TRIP_STEPS,
    book_trip,
    done_steps,
    log_rows,
    park_after,
    stock,
    wait_terminal,
)

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION
TOTAL = Decimal("360.00")


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def hold_statuses(booking):
    references = [line.hold_reference for line in booking.lines.all()]
    holds = inventory_selectors.holds_by_reference(references=references)
    return sorted(hold.status for hold in holds.values())


def test_a_trip_is_confirmed_when_every_step_succeeds(customer, trip_items):
    booking = book_trip(customer, trip_items)

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPLETED
    assert saga.steps_done == 5
    assert saga.finished_at is not None
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert hold_statuses(booking) == ["CONFIRMED", "CONFIRMED", "CONFIRMED"]
    assert stock(trip_items) == {"FL-TEST": (4, 0, 1), "HT-TEST": (4, 0, 1), "CR-TEST": (4, 0, 1)}
    charges = payment_selectors.charges_for_reference(reference=f"booking:{booking.id}")
    assert [(c.amount, c.currency) for c in charges] == [(TOTAL, "EUR")]
    assert log_rows(saga.id, phase=ACTION) == [(step, "succeeded") for step in TRIP_STEPS]
    assert log_rows(saga.id, phase=COMPENSATION) == []
    assert all(row.task_id and row.worker for row in SagaLog.objects.filter(saga=saga))


@pytest.mark.parametrize(
    ("failing_step", "undone"),
    [
        ("reserve_flight", []),
        ("reserve_hotel", ["release_flight"]),
        ("reserve_car", ["release_hotel", "release_flight"]),
        ("charge_payment", ["release_car", "release_hotel", "release_flight"]),
        ("confirm_booking", ["refund_payment", "release_car", "release_hotel", "release_flight"]),
    ],
)
def test_a_failing_step_undoes_exactly_the_completed_steps_in_reverse(
    customer, trip_items, failing_step, undone
):
    before = stock(trip_items)
    booking = book_trip(customer, trip_items, chaos={"fail": [failing_step]})

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    assert failing_step in saga.failure_reason
    completed = TRIP_STEPS[: TRIP_STEPS.index(failing_step)]
    assert done_steps(saga.id, phase=ACTION) == completed
    assert log_rows(saga.id, phase=ACTION)[-1] == (failing_step, "failed")
    assert done_steps(saga.id, phase=COMPENSATION) == undone
    assert all(status == "succeeded" for _, status in log_rows(saga.id, phase=COMPENSATION))
    assert stock(trip_items) == before
    totals = payment_selectors.money_totals(references=[f"booking:{booking.id}"])
    assert totals["net"] == 0
    booking.refresh_from_db()
    assert booking.status == Booking.Status.REJECTED


def test_a_transient_failure_that_succeeds_on_retry_does_not_compensate(customer, trip_items):
    booking = book_trip(customer, trip_items, chaos={"transient": {"reserve_hotel": 2}})

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPLETED
    hotel = [row for row in log_rows(saga.id, phase=ACTION) if row[0] == "reserve_hotel"]
    assert hotel == [
        ("reserve_hotel", "retrying"),
        ("reserve_hotel", "retrying"),
        ("reserve_hotel", "succeeded"),
    ]
    attempts = SagaLog.objects.filter(saga=saga, step="reserve_hotel").values_list(
        "attempt", flat=True
    )
    assert sorted(attempts) == [1, 2, 3]
    assert log_rows(saga.id, phase=COMPENSATION) == []
    assert stock(trip_items)["HT-TEST"] == (4, 0, 1)


def test_a_payment_gateway_that_is_briefly_unavailable_is_retried(customer, trip_items):
    booking = book_trip(customer, trip_items, card_token="tok_unavailable_2")

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPLETED
    payment = [
        status for step, status in log_rows(saga.id, phase=ACTION) if step == "charge_payment"
    ]
    assert payment == ["retrying", "retrying", "succeeded"]
    assert len(payment_selectors.charges_for_reference(reference=f"booking:{booking.id}")) == 1


def test_a_payment_whose_answer_is_lost_is_refunded_when_retries_run_out(customer, trip_items):
    before = stock(trip_items)
    booking = book_trip(customer, trip_items, card_token="tok_timeout")

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    assert log_rows(saga.id, phase=ACTION)[-1] == ("charge_payment", "timed_out")
    # The charge may exist at the gateway, so its compensation runs too.
    assert done_steps(saga.id, phase=COMPENSATION) == [
        "refund_payment",
        "release_car",
        "release_hotel",
        "release_flight",
    ]
    totals = payment_selectors.money_totals(references=[f"booking:{booking.id}"])
    assert totals["charged"] == TOTAL
    assert totals["net"] == 0
    assert stock(trip_items) == before


def test_the_same_step_message_delivered_twice_has_one_effect(customer, trip_items):
    saga_id = park_after(customer, trip_items, steps=2)

    action_signature(trip_booking, 0, saga_id).apply_async()  # the flight step, again
    wait_for(
        lambda: SagaLog.objects.filter(saga_id=saga_id, step="reserve_flight").count() == 2,
        message="the second delivery to be recorded",
    )
    action_chain(trip_booking, saga_id, start=2).apply_async()
    saga = wait_terminal(saga_id)

    assert saga.status == Saga.Status.COMPLETED
    flight = [
        status for step, status in log_rows(saga.id, phase=ACTION) if step == "reserve_flight"
    ]
    assert flight == ["succeeded", "duplicate"]
    assert done_steps(saga.id, phase=ACTION) == TRIP_STEPS
    assert stock(trip_items)["FL-TEST"] == (4, 0, 1)


def test_an_action_arriving_after_the_saga_finished_does_nothing(customer, trip_items):
    booking = book_trip(customer, trip_items, chaos={"fail": ["charge_payment"]})
    saga = wait_terminal(booking.saga_id)
    before = stock(trip_items)

    action_signature(trip_booking, 2, str(saga.id)).apply_async()
    wait_for(
        lambda: SagaLog.objects.filter(saga=saga, step="reserve_car", status="ignored").exists(),
        message="the late action to be recorded",
    )

    assert stock(trip_items) == before
    assert done_steps(saga.id, phase=ACTION) == ["reserve_flight", "reserve_hotel", "reserve_car"]


def test_the_errback_fired_twice_compensates_once(customer, trip_items):
    before = stock(trip_items)
    booking = book_trip(customer, trip_items, chaos={"fail": ["charge_payment"]})
    saga = wait_terminal(booking.saga_id)
    undone = done_steps(saga.id, phase=COMPENSATION)

    first = step_failed.apply_async(args=("manual-1",), kwargs={"saga_id": str(saga.id)})
    second = step_failed.apply_async(args=("manual-2",), kwargs={"saga_id": str(saga.id)})

    assert first.get(timeout=20) is False
    assert second.get(timeout=20) is False
    assert undone == ["release_car", "release_hotel", "release_flight"]
    assert done_steps(saga.id, phase=COMPENSATION) == undone
    saga.refresh_from_db()
    assert saga.status == Saga.Status.COMPENSATED
    assert stock(trip_items) == before


def test_errbacks_racing_a_running_saga_compensate_each_step_once(customer, trip_items):
    before = stock(trip_items)
    booking = book_trip(customer, trip_items, chaos={"delay_ms": {"reserve_flight": 300}})
    for n in range(2):
        step_failed.apply_async(args=(f"racer-{n}",), kwargs={"saga_id": str(booking.saga_id)})

    saga = wait_terminal(booking.saga_id)

    # Either the errbacks claim the saga while it runs, or it completes first
    # and they find nothing to claim. Whichever won, each step is undone at
    # most once, in reverse.
    if saga.status == Saga.Status.COMPLETED:
        assert log_rows(saga.id, phase=COMPENSATION) == []
        assert payment_selectors.money_totals(references=[f"booking:{booking.id}"])["net"] == TOTAL
        return
    assert saga.status == Saga.Status.COMPENSATED
    done = done_steps(saga.id, phase=ACTION)
    undo_of = {step.name: step.undo_name for step in trip_booking.steps}
    compensations = log_rows(saga.id, phase=COMPENSATION, statuses=SagaLog.DONE)
    undone = [step for step, status in compensations if status == "succeeded"]
    assert undone == [undo_of[step] for step in reversed(done)]
    # The step in flight left no failure record, so it may have had an effect
    # and is compensated too: a null compensation, recorded as skipped.
    skipped = [step for step, status in compensations if status == "skipped"]
    assert all(step not in [undo_of[d] for d in done] for step in skipped)
    assert len(compensations) == len({step for step, _ in compensations})
    assert stock(trip_items) == before
    assert payment_selectors.money_totals(references=[f"booking:{booking.id}"])["net"] == 0


def test_a_compensation_that_fails_transiently_is_retried_and_succeeds(customer, trip_items):
    before = stock(trip_items)
    booking = book_trip(
        customer,
        trip_items,
        chaos={"fail": ["charge_payment"], "compensation_transient": {"release_hotel": 2}},
    )

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    hotel = [row for row in log_rows(saga.id, phase=COMPENSATION) if row[0] == "release_hotel"]
    assert hotel == [
        ("release_hotel", "retrying"),
        ("release_hotel", "retrying"),
        ("release_hotel", "succeeded"),
    ]
    assert stock(trip_items) == before


def test_a_compensation_that_always_fails_leaves_the_saga_failed_with_the_reason(
    customer, trip_items
):
    booking = book_trip(
        customer,
        trip_items,
        chaos={"fail": ["reserve_car"], "compensation_fail": ["release_hotel"]},
    )

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.FAILED
    assert "compensation of release_hotel exhausted its retries" in saga.failure_reason
    assert "chaos: compensation of release_hotel fails" in saga.failure_reason
    hotel = [
        status for step, status in log_rows(saga.id, phase=COMPENSATION) if step == "release_hotel"
    ]
    assert hotel == ["retrying"] * 5 + ["failed"]
    # The chain stopped at the failing compensation: the flight is still held.
    assert stock(trip_items)["FL-TEST"] == (4, 1, 0)
    booking.refresh_from_db()
    assert booking.status == Booking.Status.NEEDS_ATTENTION


def test_a_saga_committed_but_never_published_is_redispatched(customer, trip_items, settings):
    with mock.patch("sagas.services.transaction.on_commit"):
        booking = book_trip(customer, trip_items)
    saga = Saga.objects.get(pk=booking.saga_id)
    assert saga.status == Saga.Status.PENDING
    assert saga_services.sagas_reconcile_pending() == 0  # too young: maybe still publishing

    Saga.objects.filter(pk=saga.pk).update(
        created_at=timezone.now() - timezone.timedelta(seconds=settings.SAGA_DISPATCH_GRACE_S + 1)
    )
    assert saga_services.sagas_reconcile_pending() == 1
    assert saga_services.sagas_reconcile_pending() == 0  # claimed: a second beat does nothing

    saga = wait_terminal(saga.id)
    assert saga.status == Saga.Status.COMPLETED
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED


@pytest.mark.postgres
def test_concurrent_bookings_for_the_last_seat_confirm_exactly_one(customer, trip_items):
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connection, connections

    if connection.vendor != "postgresql":
        pytest.skip("row-level concurrency is only meaningful on PostgreSQL")
    from inventory.models import Item

    Item.objects.filter(sku="FL-TEST").update(capacity=1, available=1)

    def book(_n):
        try:
            return book_trip(customer, trip_items).saga_id
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=4) as pool:
        saga_ids = list(pool.map(book, range(4)))

    sagas = [wait_terminal(saga_id) for saga_id in saga_ids]
    statuses = sorted(saga.status for saga in sagas)
    assert statuses == ["COMPENSATED", "COMPENSATED", "COMPENSATED", "COMPLETED"]
    assert stock(trip_items)["FL-TEST"] == (0, 0, 1)
    assert inventory_selectors.items_with_broken_counts() == []
    losers = [saga for saga in sagas if saga.status == Saga.Status.COMPENSATED]
    assert all("reserve_flight" in saga.failure_reason for saga in losers)
    assert all(
        "out_of_stock" in saga.failure_reason.lower() or "OutOfStock" in saga.failure_reason
        for saga in losers
    )


def test_a_step_message_that_overtakes_the_chain_is_ignored_not_failed(customer, trip_items):
    saga_id = park_after(customer, trip_items, steps=1)

    # A copy of the car step arrives while the hotel step has not run yet.
    action_signature(trip_booking, 2, saga_id).apply_async()
    wait_for(
        lambda: SagaLog.objects.filter(saga_id=saga_id, step="reserve_car").exists(),
        message="the early copy to be recorded",
    )
    early = SagaLog.objects.get(saga_id=saga_id, step="reserve_car")
    assert early.status == "ignored"
    assert early.error == "not due yet: reserve_hotel comes first"
    assert Saga.objects.get(pk=saga_id).status == Saga.Status.RUNNING  # not failed

    action_chain(trip_booking, saga_id, start=1).apply_async()
    saga = wait_terminal(saga_id)

    assert saga.status == Saga.Status.COMPLETED
    assert done_steps(saga.id, phase=ACTION) == TRIP_STEPS
    assert stock(trip_items)["CR-TEST"] == (4, 0, 1)


def test_a_compensation_message_that_arrives_early_waits_for_its_turn(customer, trip_items):
    booking = book_trip(
        customer, trip_items, chaos={"fail": ["charge_payment"], "delay_ms": {"reserve_car": 300}}
    )
    saga_id = str(booking.saga_id)
    wait_for(lambda: Saga.objects.get(pk=saga_id).steps_done >= 1, message="the flight to be held")
    # Once compensation begins, a stray copy of the flight's release must not jump the queue.
    wait_for(
        lambda: Saga.objects.get(pk=saga_id).status != Saga.Status.RUNNING,
        message="compensation to begin",
    )
    compensation_signature(trip_booking, 0, saga_id).apply_async()

    saga = wait_terminal(saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    assert done_steps(saga.id, phase=COMPENSATION) == [
        "release_car",
        "release_hotel",
        "release_flight",
    ]


def test_only_failed_step_attempts_leave_a_stored_task_result(customer, trip_items):
    from django_celery_results.models import TaskResult

    booking = book_trip(customer, trip_items, chaos={"fail": ["reserve_car"]})
    saga = wait_terminal(booking.saga_id)

    rows = {row.task_id: row for row in SagaLog.objects.filter(saga=saga, phase=ACTION)}
    failed = next(row for row in rows.values() if row.status == "failed")
    wait_for(lambda: TaskResult.objects.filter(task_id=failed.task_id).exists())
    stored = TaskResult.objects.get(task_id=failed.task_id)
    assert stored.status == "FAILURE"
    assert stored.task_name == "trip_booking.reserve_car"
    assert "chaos: reserve_car fails" in stored.result
    succeeded = [row.task_id for row in rows.values() if row.status == "succeeded"]
    assert not TaskResult.objects.filter(task_id__in=succeeded).exists()
