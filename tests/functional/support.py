"""Booking and observing sagas the way a client and an operator would."""

from __future__ import annotations

from decimal import Decimal

from bookings import services as booking_services
from bookings.models import Booking
from inventory.models import Item
from sagas.models import Saga, SagaLog
from tests.conftest import wait_for

TRIP_STEPS = ["reserve_flight", "reserve_hotel", "reserve_car", "charge_payment", "confirm_booking"]


def trip_body(**changes):
    """A POST /api/bookings/ body for one flight seat, hotel room and car (trip_items)."""
    body = {
        "customer": {"name": "Alice Example", "email": "alice@example.com"},
        "lines": [
            {"sku": "FL-TEST", "quantity": 1},
            {"sku": "HT-TEST", "quantity": 1},
            {"sku": "CR-TEST", "quantity": 1},
        ],
        "payment": {"amount": "360.00", "currency": "EUR", "card_token": "tok_ok"},
    }
    body.update(changes)
    return body


def book_trip(user, items, *, chaos=None, card_token="tok_ok", quantity=1) -> Booking:
    lines = [
        booking_services.LineRequest(sku=items[what].sku, quantity=quantity)
        for what in ("flight", "hotel", "car")
    ]
    total = sum((items[what].price * quantity for what in ("flight", "hotel", "car")), Decimal(0))
    return booking_services.booking_create(
        user=user,
        customer_name="Alice Example",
        customer_email="alice@example.com",
        lines=lines,
        payment=booking_services.PaymentRequest(
            amount=total, currency="EUR", card_token=card_token
        ),
        chaos=chaos,
    )


def park_after(customer, items, steps: int) -> str:
    """A RUNNING saga whose chain stopped after ``steps`` actions, nothing else in flight:
    as if its messages were lost. Only those steps are published."""
    from unittest import mock

    from bookings.saga_steps import trip_booking
    from sagas.canvas import action_signature

    with mock.patch("sagas.services.transaction.on_commit"):
        booking = book_trip(customer, items)
    saga_id = str(booking.saga_id)
    Saga.objects.filter(pk=saga_id).update(status=Saga.Status.RUNNING)
    for index in range(steps):
        action_signature(trip_booking, index, saga_id).apply_async()
        wait_for(lambda i=index: Saga.objects.get(pk=saga_id).steps_done == i + 1)
    return saga_id


def wait_terminal(saga_id, *, timeout: float = 30.0) -> Saga:
    def terminal():
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.is_terminal else None

    return wait_for(terminal, timeout=timeout, message=f"saga {saga_id} to finish")


def log_rows(saga_id, *, phase: str, statuses=None) -> list[tuple[str, str]]:
    rows = SagaLog.objects.filter(saga_id=saga_id, phase=phase).order_by("started_at", "id")
    if statuses is not None:
        rows = rows.filter(status__in=statuses)
    return list(rows.values_list("step", "status"))


def done_steps(saga_id, *, phase: str) -> list[str]:
    return [step for step, _ in log_rows(saga_id, phase=phase, statuses=SagaLog.DONE)]


def stock(items) -> dict[str, tuple[int, int, int]]:
    """(available, held, sold) per SKU, read fresh from the database."""
    skus = [item.sku for item in items.values()]
    return {
        sku: (available, held, sold)
        for sku, available, held, sold in Item.objects.filter(sku__in=skus).values_list(
            "sku", "available", "held", "sold"
        )
    }


# The three test items of tests/conftest.py's trip_items: one trip's total,
# and (available, held, sold) before any booking and after one confirmed trip.
TOTAL = Decimal("360.00")
UNTOUCHED = {"FL-TEST": (5, 0, 0), "HT-TEST": (5, 0, 0), "CR-TEST": (5, 0, 0)}
SOLD = {"FL-TEST": (4, 0, 1), "HT-TEST": (4, 0, 1), "CR-TEST": (4, 0, 1)}


def reference(booking) -> str:
    return f"booking:{booking.id}"


def ledger(booking) -> dict[str, Decimal]:
    """Charged, refunded and net money for the booking in our ledger."""
    from payments import selectors

    return selectors.money_totals(references=[reference(booking)])


def books(booking) -> dict[str, Decimal]:
    return gateway_books(reference(booking))


def gateway_books(reference: str) -> dict[str, Decimal]:
    """Captured, refunded and net money for ``reference`` as the gateway itself records it."""
    from payments import selectors

    books = selectors.gateway_books(reference=reference)
    return {"captured": books.captured, "refunded": books.refunded, "net": books.net}


def gateway_unrecorded(reference: str) -> list[str]:
    """Every capture or refund the gateway holds for ``reference`` that our ledger lacks."""
    from payments import selectors

    return selectors.gateway_unrecorded(books=selectors.gateway_books(reference=reference))
