"""The booking process as sagas: trip booking and its cancellation.

Each step calls one service of the context that owns the effect and runs on
that context's queue. Every effect is keyed so that running it twice is
harmless: holds by booking line, payments by an idempotency key per saga.
What a step needs of the booking (its lines, its total) it reads from its
saga's context, written with the booking (``bookings.services.trip_plan``),
not from the booking's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import OperationalError

from bookings import selectors
from bookings.models import Booking
from bookings.services import (
    BOOKING_CANCELLATION,
    TRIP_BOOKING,
    booking_move,
    booking_settle,
    charge_key,
)
from inventory import services as inventory
from payments import services as payments
from payments.errors import GatewayTimeout, GatewayUnavailable
from sagas.definitions import RetryPolicy, SagaDefinition, Step
from sagas.errors import TransientError
from sagas.models import Saga

KINDS = {"flight": "flight_seat", "hotel": "hotel_room", "car": "car"}
# A cancelled booking's holds are sold: its releases try that state first.
SOLD = inventory.Status.CONFIRMED

PAYMENT_RETRY = RetryPolicy(
    max_retries=4,
    backoff_s=0.5,
    retry_on=(
        GatewayUnavailable,
        GatewayTimeout,
        TransientError,
        SoftTimeLimitExceeded,
        OperationalError,
    ),
)


# A payment's compensation must outlast a gateway outage of a minute or so:
# 8 retries, backing off to 30 s, before an operator is needed.
PAYMENT_COMPENSATION_RETRY = RetryPolicy(
    max_retries=8, backoff_s=0.5, max_backoff_s=30.0, retry_on=(Exception,)
)


def _booking_id(saga: Saga) -> str:
    return saga.context["booking_id"]


@dataclass(frozen=True)
class TripLine:
    """What a step needs of a booking line: its kind, what it holds and the hold's reference."""

    kind: str
    sku: str
    quantity: int
    hold: str


def trip_lines(context: dict[str, Any], what: str | None = None) -> list[TripLine]:
    """The booking's lines (of kind ``what``: flight, hotel, car), oldest first.

    From the saga's context, which ``booking_create`` writes with them
    (``trip_plan``); a saga started before its context carried them reads
    them from the booking.
    """
    kind = KINDS[what] if what is not None else None
    if "lines" not in context:
        lines = selectors.booking_lines(booking_id=context["booking_id"], kind=kind)
        return [TripLine(line.kind, line.sku, line.quantity, line.hold_reference) for line in lines]
    return [
        TripLine(line["kind"], line["sku"], line["quantity"], line["hold"])
        for line in context["lines"]
        if kind is None or line["kind"] == kind
    ]


def trip_reserve(lines: list[TripLine]) -> dict:
    """Hold every line's units in one call (the reserve steps, and the bench's bare chain)."""
    holds = inventory.holds_place(
        requests=[
            inventory.HoldRequest(sku=line.sku, quantity=line.quantity, reference=line.hold)
            for line in lines
        ]
    )
    return {"held": [hold.reference for hold in holds]}


def trip_charge(context: dict[str, Any], *, idempotency_key: str):
    """Charge the booking's total: from the context if it carries it, else from the booking."""
    booking_id = context["booking_id"]
    if "total" in context:
        amount, currency = Decimal(context["total"]), context["currency"]
    else:
        booking = selectors.booking_get(booking_id=booking_id)
        amount, currency = booking.total, booking.currency
    return payments.charge_create(
        amount=amount,
        currency=currency,
        card_token=context["card_token"],
        idempotency_key=idempotency_key,
        reference=f"booking:{booking_id}",
    )


def trip_confirm(booking_id: str, lines: list[TripLine]) -> None:
    """Sell every line's held units and confirm the booking, or raise."""
    inventory.holds_confirm(references=[line.hold for line in lines])
    if not booking_move(
        booking_id=booking_id, source=Booking.Status.PENDING, target=Booking.Status.CONFIRMED
    ):
        raise RuntimeError(f"booking {booking_id} is no longer pending")


def _reserve(what: str):
    def reserve(saga: Saga) -> dict:
        return trip_reserve(trip_lines(saga.context, what))

    reserve.__name__ = f"reserve_{what}"
    return reserve


def _release(what: str, *, first: str = inventory.Status.HELD):
    """Step ``release_<what>``: give the units of the holds of one kind back; None if none moved.

    ``first`` is the state the holds are expected in: HELD when a trip is
    undone, CONFIRMED when a booking is cancelled.
    """

    def release(saga: Saga) -> dict | None:
        released = inventory.holds_release(
            references=[line.hold for line in trip_lines(saga.context, what)], first=first
        )
        return {"holds": [hold.reference for hold in released]} if released else None

    release.__name__ = f"release_{what}"
    return release


def _reinstate(what: str):
    def reinstate(saga: Saga) -> dict | None:
        holds = inventory.holds_reinstate(
            references=[line.hold for line in trip_lines(saga.context, what)]
        )
        return {"holds": [hold.reference for hold in holds]} if holds else None

    reinstate.__name__ = f"reinstate_{what}"
    return reinstate


def charge_payment(saga: Saga) -> dict:
    charge = trip_charge(saga.context, idempotency_key=charge_key(saga.id))
    return {"charge": charge.gateway_charge_id, "amount": str(charge.amount)}


def refund_payment(saga: Saga) -> dict | None:
    """Undo the trip's charge as the gateway knows it: captured late, lost answer or none."""
    refund = payments.charge_undo(idempotency_key=charge_key(saga.id), reason="trip booking undone")
    return (
        None
        if refund is None
        else {"refund": refund.gateway_refund_id, "amount": str(refund.amount)}
    )


def confirm_booking(saga: Saga) -> dict:
    booking_id = _booking_id(saga)
    trip_confirm(booking_id, trip_lines(saga.context))
    return {"booking": booking_id, "status": Booking.Status.CONFIRMED}


def reject_booking(saga: Saga) -> None:
    """Trip compensated; NEEDS_ATTENTION too, when an operator's retry finished the job."""
    booking_settle(
        booking_id=_booking_id(saga),
        sources=(Booking.Status.PENDING, Booking.Status.NEEDS_ATTENTION),
        target=Booking.Status.REJECTED,
    )


def _flag(source: str):
    def flag_booking(saga: Saga) -> None:
        """A compensation gave up: an operator must look (again, after a retry that failed)."""
        booking_settle(
            booking_id=_booking_id(saga),
            sources=(source, Booking.Status.NEEDS_ATTENTION),
            target=Booking.Status.NEEDS_ATTENTION,
        )

    return flag_booking


trip_booking = SagaDefinition(
    TRIP_BOOKING,
    steps=[
        Step("reserve_flight", _reserve("flight"), _release("flight"), queue="inventory"),
        Step("reserve_hotel", _reserve("hotel"), _release("hotel"), queue="inventory"),
        Step("reserve_car", _reserve("car"), _release("car"), queue="inventory"),
        Step(
            "charge_payment",
            charge_payment,
            refund_payment,
            queue="payments",
            retry=PAYMENT_RETRY,
            compensation_retry=PAYMENT_COMPENSATION_RETRY,
            timeout_s=15,
            uncertain_on=(GatewayTimeout,),
            external=True,
        ),
        Step("confirm_booking", confirm_booking, queue="bookings"),
    ],
    on_compensated=reject_booking,
    on_failed=_flag(Booking.Status.PENDING),
    # Loaded by `manage.py chaos` and `manage.py bench` only.
    harness="bookings.harness.TripHarness",
)


# --- cancellation --------------------------------------------------------------


def _refund_prefix(saga: Saga) -> str:
    return f"saga:{saga.id}:refund_payment"


def refund_cancelled_booking(saga: Saga) -> dict | None:
    """Refund every live charge of the booking: the trip's, and any earlier cancellation's
    re-charge. Each refund is keyed by this saga and the charge, so it happens once."""
    refunds = payments.charges_refund_all(
        reference=f"booking:{_booking_id(saga)}",
        refund_key_prefix=_refund_prefix(saga),
        reason="booking cancelled",
    )
    return _refunds_result(refunds)


def recharge_payment(saga: Saga) -> dict | None:
    """Undo this cancellation's refunds, and only what they actually gave back.

    The refunds are read from the gateway's records too, so a refund whose
    answer was lost is paid back, and a refund that never ran re-charges
    nothing. Each refunded charge is re-charged once, under its own key.
    """
    charges = payments.charges_restore(
        reference=f"booking:{_booking_id(saga)}",
        refund_key_prefix=_refund_prefix(saga),
        recharge_key_prefix=f"saga:{saga.id}:recharge_payment",
        card_token=saga.context["card_token"],
    )
    if not charges:
        return None
    return {
        "charges": [charge.gateway_charge_id for charge in charges],
        "amount": str(sum(charge.amount for charge in charges)),
    }


def _refunds_result(refunds) -> dict | None:
    if not refunds:
        return None
    return {
        "refunds": [refund.gateway_refund_id for refund in refunds],
        "amount": str(sum(refund.amount for refund in refunds)),
    }


def mark_cancelled(saga: Saga) -> dict:
    booking_id = _booking_id(saga)
    if not booking_move(
        booking_id=booking_id, source=Booking.Status.CANCELLING, target=Booking.Status.CANCELLED
    ):
        raise RuntimeError(f"booking {booking_id} is no longer being cancelled")
    return {"booking": booking_id, "status": Booking.Status.CANCELLED}


def restore_booking(saga: Saga) -> None:
    """Cancellation compensated (by itself, or after an operator's retry): the trip stands."""
    booking_settle(
        booking_id=_booking_id(saga),
        sources=(Booking.Status.CANCELLING, Booking.Status.NEEDS_ATTENTION),
        target=Booking.Status.CONFIRMED,
    )


booking_cancellation = SagaDefinition(
    BOOKING_CANCELLATION,
    steps=[
        Step(
            "refund_payment",
            refund_cancelled_booking,
            recharge_payment,
            queue="payments",
            retry=PAYMENT_RETRY,
            compensation_retry=PAYMENT_COMPENSATION_RETRY,
            timeout_s=15,
            uncertain_on=(GatewayTimeout,),
            external=True,
        ),
        Step("release_car", _release("car", first=SOLD), _reinstate("car"), queue="inventory"),
        Step(
            "release_hotel", _release("hotel", first=SOLD), _reinstate("hotel"), queue="inventory"
        ),
        Step(
            "release_flight",
            _release("flight", first=SOLD),
            _reinstate("flight"),
            queue="inventory",
        ),
        Step("mark_cancelled", mark_cancelled, queue="bookings"),
    ],
    on_compensated=restore_booking,
    on_failed=_flag(Booking.Status.CANCELLING),
)
