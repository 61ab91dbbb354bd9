"""Writes of the bookings context: it owns the trip process and starts its sagas."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, connection, transaction

from bookings.errors import (
    BookingNotCancellable,
    BookingNotFound,
    BookingStateConflict,
    IdempotencyConflict,
    InvalidBooking,
    PaymentMismatch,
    UnknownSku,
)
from bookings.models import Booking, BookingLine, IdempotencyKey
from inventory import selectors as inventory_selectors
from sagas import faults as saga_faults
from sagas import selectors as saga_selectors
from sagas.definitions import registry
from sagas.services import saga_start

TRIP_BOOKING = "trip_booking"
BOOKING_CANCELLATION = "booking_cancellation"

# `?chaos=car` and friends: fail one step of the trip, as the demo seeds did.
CHAOS_SHORTCUTS = {
    "flight": "reserve_flight",
    "hotel": "reserve_hotel",
    "car": "reserve_car",
    "payment": "charge_payment",
    "confirm": "confirm_booking",
}


def chaos_shortcut(name: str) -> dict[str, Any]:
    try:
        return {"fail": [CHAOS_SHORTCUTS[name]]}
    except KeyError:
        raise InvalidBooking(
            f"unknown chaos shortcut {name!r}; use one of {', '.join(CHAOS_SHORTCUTS)}",
            field="chaos",
        ) from None


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
        raise InvalidBooking("a booking needs at least one line", field="lines")
    for index, line in enumerate(lines):
        if line.quantity < 1:
            raise InvalidBooking(
                f"quantity must be at least 1 (lines {[line.sku]})", field=f"lines.{index}.quantity"
            )
    items = inventory_selectors.items_by_sku(skus=sorted({line.sku for line in lines}))
    unknown = sorted({line.sku for line in lines} - set(items))
    if unknown:
        first = next(i for i, line in enumerate(lines) if line.sku not in items)
        raise UnknownSku(f"unknown SKU(s): {', '.join(unknown)}", field=f"lines.{first}.sku")
    currencies = {items[line.sku].currency for line in lines}
    if currencies != {payment.currency}:
        raise PaymentMismatch(
            f"payment currency {payment.currency} does not match the lines' currency "
            f"{', '.join(sorted(currencies))}",
            field="payment.currency",
        )
    total = sum((items[line.sku].price * line.quantity for line in lines), Decimal("0"))
    if payment.amount != total:
        raise PaymentMismatch(
            f"payment amount {payment.amount} {payment.currency} does not match "
            f"the lines' total {total} {payment.currency}",
            field="payment.amount",
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

    def start_saga(plan: dict[str, Any]):
        context: dict[str, Any] = {
            "booking_id": str(booking.id),
            "card_token": payment.card_token,
            **plan,
        }
        if chaos:
            context["chaos"] = chaos
        return saga_start(
            saga_type=TRIP_BOOKING,
            business_key=f"booking:{booking.id}",
            context=context,
            owner=user,
        )

    booking, _plan = booking_rows_write(
        booking=booking, items=items, lines=lines, start_saga=start_saga
    )
    return booking


def booking_rows_write(
    *,
    booking: Booking,
    items: dict,
    lines: list[LineRequest],
    start_saga: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[Booking, dict[str, Any]]:
    """Insert a validated booking and its lines, priced from ``items`` (sku -> ItemInfo).

    Returns the booking and its trip plan (``trip_plan``). ``start_saga``, if
    given, is called with the plan and returns the booking's saga, whose id
    goes on the booking row. The lines go in first, since their ids name the
    holds the plan carries; the booking row follows in the same transaction
    (the lines' foreign key is checked at commit).
    """
    booking.full_clean()
    # One transaction (the caller's, if open: no savepoint), or the lines
    # would commit before the booking they point to.
    with transaction.atomic(savepoint=False):
        created = BookingLine.objects.bulk_create(
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
        plan = trip_plan(booking=booking, lines=created)
        if start_saga is not None:
            booking.saga_id = start_saga(plan).id
        booking.save(force_insert=True)
    return booking, plan


def trip_plan(*, booking: Booking, lines: Iterable[BookingLine]) -> dict[str, Any]:
    """What the trip's steps need of a booking, for its saga's context (JSON).

    The total to charge, and per line its kind, SKU, quantity and hold
    reference. Written once, with the booking and its lines, which nothing
    changes afterwards, so a step finds it in the saga row that the step
    wrapper reads anyway instead of reading the booking again
    (``bookings.saga_steps.trip_lines``).
    """
    return {
        "total": str(booking.total),
        "currency": booking.currency,
        "lines": [
            {
                "kind": line.kind,
                "sku": line.sku,
                "quantity": line.quantity,
                "hold": line.hold_reference,
            }
            for line in lines
        ],
    }


@dataclass(frozen=True)
class BookingCreation:
    booking: Booking
    response: dict[str, Any]
    replayed: bool


def booking_create_once(
    *,
    idempotency_key: str,
    fingerprint: str,
    render: Callable[[Booking], dict[str, Any]],
    user,
    **request: Any,
) -> BookingCreation:
    """``booking_create`` at most once per (user, Idempotency-Key).

    The same key with the same request (``fingerprint``) replays the response
    of the first; with a different request it is refused. Two concurrent
    requests with one key meet at the unique constraint: one creates, the
    other replays what the first committed.
    """
    existing = IdempotencyKey.objects.filter(user=user, key=idempotency_key).first()
    if existing is not None:
        return _replay(existing, fingerprint)
    try:
        with transaction.atomic():
            booking = booking_create(user=user, **request)
            response = render(booking)
            IdempotencyKey.objects.create(
                user=user,
                key=idempotency_key,
                fingerprint=fingerprint,
                booking=booking,
                response=response,
            )
    except IntegrityError:
        existing = IdempotencyKey.objects.filter(user=user, key=idempotency_key).first()
        if existing is None:
            raise
        return _replay(existing, fingerprint)
    return BookingCreation(booking=booking, response=response, replayed=False)


def _replay(existing: IdempotencyKey, fingerprint: str) -> BookingCreation:
    if existing.fingerprint != fingerprint:
        raise IdempotencyConflict(
            f"Idempotency-Key {existing.key!r} was already used for booking "
            f"{existing.booking_id} with a different request; use a new key for a new booking",
            field="Idempotency-Key",
        )
    return BookingCreation(booking=existing.booking, response=existing.response, replayed=True)


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
    # The trip's lines, if its context carries them: the releases and
    # reinstatements then read no booking lines either.
    if "lines" in trip.context:
        context["lines"] = trip.context["lines"]
    if chaos:
        context["chaos"] = chaos
    saga = saga_start(
        saga_type=BOOKING_CANCELLATION,
        business_key=f"booking:{booking.id}",
        context=context,
        owner=booking.user,
    )
    booking.status = Booking.Status.CANCELLING
    booking.cancel_saga_id = saga.id
    booking.save(update_fields=["status", "cancel_saga_id", "updated_at"])
    return booking


def _validate_chaos(saga_type: str, chaos: dict[str, Any]) -> None:
    definition = registry.get(saga_type)
    try:
        saga_faults.validate_plan(
            chaos, actions=definition.action_names, compensations=definition.compensation_names
        )
    except ValueError as exc:
        raise InvalidBooking(str(exc), field="chaos") from None


def booking_move(*, booking_id, source: str, target: str) -> bool:
    """Conditional status change; False if the booking was not in ``source``.

    One UPDATE, its SQL built once (a trip's last step runs it: compiling the
    ORM's update took longer than running it).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            _move_sql(connection.vendor),
            [target, Booking._meta.pk.get_db_prep_value(booking_id, connection), source],
        )
        return cursor.rowcount == 1


@functools.lru_cache(maxsize=4)
def _move_sql(vendor: str) -> str:
    quote = connection.ops.quote_name
    status, pk = (quote(Booking._meta.get_field(name).column) for name in ("status", "id"))
    # Names come from the model; every value is a parameter.
    return (
        f"UPDATE {quote(Booking._meta.db_table)} SET {status} = %s "  # noqa: S608
        f"WHERE {pk} = %s AND {status} = %s"
    )


def booking_settle(*, booking_id, sources: tuple[str, ...], target: str) -> None:
    """Move the booking from one of ``sources`` to ``target``, or raise ``BookingStateConflict``.

    For the sagas' end-of-run hooks: a booking in any other state means the
    process went wrong somewhere, and saying so beats returning quietly.
    """
    if Booking.objects.filter(pk=booking_id, status__in=sources).update(status=target):
        return
    status = Booking.objects.filter(pk=booking_id).values_list("status", flat=True).first()
    raise BookingStateConflict(
        f"booking {booking_id} is {status or 'gone'}; only {' or '.join(sources)} "
        f"can become {target}"
    )


@transaction.atomic
def bookings_purge(*, booking_ids: list) -> int:
    """Delete bookings with their lines and idempotency keys (harness runs clean up with it).

    Their charges and holds belong to payments and inventory, which purge their own.
    """
    _count, by_model = Booking.objects.filter(pk__in=booking_ids).delete()
    return by_model.get(Booking._meta.label, 0)
