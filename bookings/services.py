"""Writes of the bookings context: it owns the trip process and starts its sagas."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import transaction

from bookings.errors import (
    BookingNotCancellable,
    BookingNotFound,
    InvalidBooking,
    PaymentMismatch,
    UnknownSku,
)
from bookings.models import Booking, BookingLine
from inventory import selectors as inventory_selectors
from sagas import chaos as saga_chaos
from sagas import selectors as saga_selectors
from sagas.definitions import registry
from sagas.services import saga_start

TRIP_BOOKING = "trip_booking"
BOOKING_CANCELLATION = "booking_cancellation"


@dataclass(frozen=True)
class LineRequest:
    sku: str
    quantity: int


@dataclass(frozen=True)
class PaymentRequest:
    amount: Decimal
    currency: str
    card_token: str


def charge_key(trip_saga_id) -> str:
    """The payment's idempotency key: one charge per trip saga, whoever retries."""
    return f"saga:{trip_saga_id}:charge_payment"


@transaction.atomic
def booking_create(
    *,
    user,
    customer_name: str,
    customer_email: str,
    lines: list[LineRequest],
    payment: PaymentRequest,
    chaos: dict[str, Any] | None = None,
) -> Booking:
    """Write the booking and its trip saga in one transaction; the saga runs after commit."""
    if not lines:
        raise InvalidBooking("a booking needs at least one line")
    bad = [line.sku for line in lines if line.quantity < 1]
    if bad:
        raise InvalidBooking(f"quantity must be at least 1 (lines {bad})")
    items = inventory_selectors.items_by_sku(skus=sorted({line.sku for line in lines}))
    unknown = sorted({line.sku for line in lines} - set(items))
    if unknown:
        raise UnknownSku(f"unknown SKU(s): {', '.join(unknown)}")
    currencies = {items[line.sku].currency for line in lines}
    if currencies != {payment.currency}:
        raise PaymentMismatch(
            f"payment currency {payment.currency} does not match the lines' currency "
            f"{', '.join(sorted(currencies))}"
        )
    total = sum((items[line.sku].price * line.quantity for line in lines), Decimal("0"))
    if payment.amount != total:
        raise PaymentMismatch(
            f"payment amount {payment.amount} {payment.currency} does not match "
            f"the lines' total {total} {payment.currency}"
        )
    if chaos:
        _validate_chaos(TRIP_BOOKING, chaos)

    booking = Booking(
        user=user,
        customer_name=customer_name,
        customer_email=customer_email,
        total=total,
        currency=payment.currency,
    )
    context: dict[str, Any] = {"booking_id": str(booking.id), "card_token": payment.card_token}
    if chaos:
        context["chaos"] = chaos
    saga = saga_start(saga_type=TRIP_BOOKING, business_key=f"booking:{booking.id}", context=context)
    booking.saga_id = saga.id
    booking.full_clean()
    booking.save(force_insert=True)
    BookingLine.objects.bulk_create(
        BookingLine(
            booking=booking,
            sku=line.sku,
            kind=items[line.sku].kind,
            name=items[line.sku].name,
            quantity=line.quantity,
            unit_price=items[line.sku].price,
            currency=items[line.sku].currency,
        )
        for line in lines
    )
    return booking


@transaction.atomic
def booking_cancel(*, booking_id, chaos: dict[str, Any] | None = None) -> Booking:
    """CONFIRMED -> CANCELLING, and start the cancellation saga."""
    booking = Booking.objects.select_for_update().filter(pk=booking_id).first()
    if booking is None:
        raise BookingNotFound(f"booking {booking_id} does not exist")
    if booking.status != Booking.Status.CONFIRMED:
        raise BookingNotCancellable(
            f"only a confirmed booking can be cancelled; this one is {booking.status}"
        )
    if chaos:
        _validate_chaos(BOOKING_CANCELLATION, chaos)
    trip = saga_selectors.saga_get(saga_id=booking.saga_id)
    context: dict[str, Any] = {
        "booking_id": str(booking.id),
        "card_token": trip.context.get("card_token", ""),
        "charge_key": charge_key(booking.saga_id),
    }
    if chaos:
        context["chaos"] = chaos
    saga = saga_start(
        saga_type=BOOKING_CANCELLATION, business_key=f"booking:{booking.id}", context=context
    )
    booking.status = Booking.Status.CANCELLING
    booking.cancel_saga_id = saga.id
    booking.save(update_fields=["status", "cancel_saga_id", "updated_at"])
    return booking


def _validate_chaos(saga_type: str, chaos: dict[str, Any]) -> None:
    definition = registry.get(saga_type)
    try:
        saga_chaos.validate_plan(
            chaos, actions=definition.action_names, compensations=definition.compensation_names
        )
    except ValueError as exc:
        raise InvalidBooking(str(exc)) from None


def booking_move(*, booking_id, source: str, target: str) -> bool:
    """Conditional status change; False if the booking was not in ``source``."""
    return bool(Booking.objects.filter(pk=booking_id, status=source).update(status=target))
