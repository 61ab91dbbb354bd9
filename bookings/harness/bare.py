"""The baseline: the trip's five steps as a bare Celery chain.

The same domain work as the trip saga's steps (the very functions they call:
``trip_reserve``, ``trip_charge``, ``trip_confirm``, fed the same plan the
saga's context carries), on the bench's own worker, with the same
task options and the same result backend, each step in one transaction as the
saga's wrapper runs it. What is left out is exactly the saga's bookkeeping: no
Saga row, no SagaLog, no barrier, no status updates and no errback. The bench
runs both and divides their throughputs. A third chain of five no-op tasks
(``sagas.bench.tasks``) measures what Celery, the broker and the result
backend cost on their own.

Only the bench's workers import this module (``TripHarness.worker_includes``);
production workers never register these tasks.
"""

from __future__ import annotations

import time
from decimal import Decimal
from functools import partial
from typing import Any

from celery import chain, shared_task
from django.conf import settings
from django.db import transaction

from bookings.models import Booking
from bookings.saga_steps import trip_charge, trip_confirm, trip_lines, trip_reserve
from bookings.services import LineRequest, PaymentRequest, booking_rows_write
from inventory import selectors as inventory_selectors
from sagas.bench.tasks import BENCH_QUEUE

PREFIX = "bench.bare"

# Step name, queue and time limit, as the trip saga declares them (bookings/saga_steps.py).
STEPS = [
    ("reserve_flight", "inventory", 10),
    ("reserve_hotel", "inventory", 10),
    ("reserve_car", "inventory", 10),
    ("charge_payment", "payments", 15),
    ("confirm_booking", "bookings", 10),
]


def _options(name: str, timeout_s: int) -> dict[str, Any]:
    # The options sagas.tasks gives every step task; the queue is set on
    # each signature, as the saga's chain does.
    return {
        "name": f"{PREFIX}.{name}",
        "soft_time_limit": timeout_s,
        "time_limit": timeout_s + 5,
        "acks_late": True,
        "reject_on_worker_lost": True,
        # As saga steps: no stored result on success, except the chain's last
        # task, whose result carries the time the bench measures to.
        "ignore_result": not getattr(settings, "SAGA_STORE_STEP_RESULTS", False),
    }


def bare_charge_key(booking_id) -> str:
    return f"bench:{booking_id}:charge_payment"


def _reserve(plan: dict[str, Any], what: str) -> dict[str, Any]:
    with transaction.atomic():
        return trip_reserve(trip_lines(plan, what))


def reserve_flight_run(*, plan: dict[str, Any], **_ignored: Any) -> dict[str, Any]:
    return _reserve(plan, "flight")


def reserve_hotel_run(*, plan: dict[str, Any], **_ignored: Any) -> dict[str, Any]:
    return _reserve(plan, "hotel")


def reserve_car_run(*, plan: dict[str, Any], **_ignored: Any) -> dict[str, Any]:
    return _reserve(plan, "car")


def charge_payment_run(*, plan: dict[str, Any], **_ignored: Any) -> dict[str, Any]:
    # Like the saga's external step: no transaction open across the gateway call.
    charge = trip_charge(plan, idempotency_key=bare_charge_key(plan["booking_id"]))
    return {"charge": charge.gateway_charge_id, "amount": str(charge.amount)}


def confirm_booking_run(*, plan: dict[str, Any], **_ignored: Any) -> dict[str, Any]:
    booking_id = plan["booking_id"]
    with transaction.atomic():
        trip_confirm(booking_id, trip_lines(plan))
    # Committed: the chain's end, on the same clock as a saga's finished_at.
    return {"booking": booking_id, "done_at": time.time()}


RUNS = {
    "reserve_flight": reserve_flight_run,
    "reserve_hotel": reserve_hotel_run,
    "reserve_car": reserve_car_run,
    "charge_payment": charge_payment_run,
    "confirm_booking": confirm_booking_run,
}

TASKS = {
    name: shared_task(**_options(name, timeout_s))(RUNS[name]) for name, _queue, timeout_s in STEPS
}


TASK_NAMES = [f"{PREFIX}.{name}" for name, _queue, _timeout in STEPS]


def bare_chain(*, plan: dict[str, Any], last_task_id: str):
    """The five tasks as ``chain(task.si(plan=...), ...)``; the last one gets ``last_task_id``.

    ``plan`` is what a trip saga's context carries (booking id, card, lines,
    total), so each task reads what its saga step reads.
    """
    signatures = [
        # The bench's queue, which only its worker consumes; the same worker
        # consumes the saga's queues, so the hop costs the same.
        TASKS[name].si(plan=plan).set(queue=BENCH_QUEUE)
        for name, _queue, _ in STEPS
    ]
    signatures[-1] = signatures[-1].set(task_id=last_task_id, ignore_result=False)
    return chain(*signatures)


def _publish(plan: dict[str, Any], last_task_id: str) -> None:
    bare_chain(plan=plan, last_task_id=last_task_id).apply_async()


def booking_rows(
    *,
    user,
    customer_name: str,
    customer_email: str,
    lines: list[LineRequest],
    payment: PaymentRequest,
) -> tuple[Booking, dict[str, Any]]:
    """The booking and its lines as ``bookings.services.booking_create`` writes them.

    Returns the booking and the plan a trip saga's context would carry
    (booking id, card, total, lines). The bench's own inputs are valid, so
    only the reads and writes of ``booking_create`` are repeated here, not
    its error reporting.
    """
    items = inventory_selectors.items_by_sku(skus=sorted({line.sku for line in lines}))
    total = sum((items[line.sku].price * line.quantity for line in lines), Decimal("0"))
    booking = Booking(
        user=user,
        customer_name=customer_name,
        customer_email=customer_email,
        total=total,
        currency=payment.currency,
    )
    booking, plan = booking_rows_write(booking=booking, items=items, lines=lines)
    return booking, {"booking_id": str(booking.id), "card_token": payment.card_token, **plan}


@transaction.atomic
def bare_booking_create(*, payment: PaymentRequest, last_task_id: str, **booking: Any) -> Booking:
    """``booking_create`` without the saga: the same rows, then the bare chain after commit."""
    created, plan = booking_rows(payment=payment, **booking)
    transaction.on_commit(partial(_publish, plan, last_task_id))
    return created
