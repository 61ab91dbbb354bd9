"""The trip's domain invariants (DESIGN.md section 4) over one chaos run's sagas and items.

A run holds trip sagas and the cancellations it started (``--cancel-rate``).
COMPLETED trips captured the total once; COMPENSATED ones hold nothing and
paid nothing; a COMPLETED cancellation refunded and released everything, a
compensated one left the booking CONFIRMED and paid once; stock balances;
money balances in our ledger *and in the gateway's own books*, read through
the gateway interface, and every capture or refund the gateway made is on
our ledger. Each offender names the saga, the booking and the amounts.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bookings.models import Booking
from bookings.services import BOOKING_CANCELLATION, TRIP_BOOKING, charge_key
from inventory import selectors as inventory_selectors
from payments import selectors as payment_selectors
from sagas.harness.plugin import InvariantResult, chunks
from sagas.models import Saga

LIVE_HOLDS = ("HELD", "CONFIRMED")
SETTLED = (Booking.Status.CONFIRMED, Booking.Status.CANCELLED, Booking.Status.REJECTED)
Status = Saga.Status
ZERO = Decimal("0")


def money(value) -> str:
    """Two decimals whatever the database returns (SQLite sums come back as 360, not 360.00)."""
    return f"{Decimal(value):.2f}"


def reference(booking: Booking) -> str:
    return f"booking:{booking.id}"


@dataclass
class TripRows:
    """What the checks read, loaded once."""

    sagas: dict[str, dict[str, Any]]
    bookings: dict[str, Booking]  # by booking id
    holds: dict[str, inventory_selectors.HoldInfo]
    ledger: dict[str, dict[str, Decimal]]  # by reference
    skus: list[str]

    @classmethod
    def load(cls, *, saga_ids: list[str], skus: list[str]) -> TripRows:
        sagas: dict[str, dict[str, Any]] = {}
        for chunk in chunks(saga_ids):
            for row in Saga.objects.filter(pk__in=chunk).values(
                "id", "status", "saga_type", "business_key", "created_at"
            ):
                sagas[str(row["id"])] = row
        booking_ids = sorted(
            {row["business_key"].removeprefix("booking:") for row in sagas.values()}
        )
        bookings: dict[str, Booking] = {}
        for chunk in chunks(booking_ids):
            for booking in Booking.objects.filter(pk__in=chunk).prefetch_related("lines"):
                bookings[str(booking.id)] = booking
        references = [line.hold_reference for b in bookings.values() for line in b.lines.all()]
        holds: dict[str, inventory_selectors.HoldInfo] = {}
        for chunk in chunks(references):
            holds.update(inventory_selectors.holds_by_reference(references=chunk))
        ledger: dict[str, dict[str, Decimal]] = {}
        for chunk in chunks([reference(booking) for booking in bookings.values()]):
            ledger.update(payment_selectors.money_by_reference(references=chunk))
        return cls(sagas=sagas, bookings=bookings, holds=holds, ledger=ledger, skus=skus)

    def booking_of(self, saga_id: str) -> Booking | None:
        return self.bookings.get(self.sagas[saga_id]["business_key"].removeprefix("booking:"))

    def sagas_of(
        self, saga_type: str, status: str, result: InvariantResult
    ) -> Iterator[tuple[str, Booking]]:
        """(saga id, booking) of every saga of ``saga_type`` with ``status``."""
        for saga_id, saga in self.sagas.items():
            if saga["saga_type"] != saga_type or saga["status"] != status:
                continue
            booking = self.booking_of(saga_id)
            if booking is None:
                result.flag(saga_id, "no booking")
                continue
            yield saga_id, booking

    def cancellations(self) -> dict[str, list[dict[str, Any]]]:
        """Each booking's cancellation sagas, oldest first."""
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in sorted(self.sagas.values(), key=lambda row: row["created_at"]):
            if row["saga_type"] == BOOKING_CANCELLATION:
                found[row["business_key"].removeprefix("booking:")].append(row)
        return found

    def net(self, booking: Booking) -> Decimal:
        return self.ledger[reference(booking)]["net"]

    def live_holds(self, booking: Booking) -> list[str]:
        return [
            f"hold {line.hold_reference} is still {hold.status}"
            for line in booking.lines.all()
            if (hold := self.holds.get(line.hold_reference)) is not None
            and hold.status in LIVE_HOLDS
        ]


def due(booking: Booking) -> Decimal:
    """What the customer owes for this booking, once everything has settled."""
    return booking.total if booking.status == Booking.Status.CONFIRMED else ZERO


def check_trips(*, saga_ids: list[str], skus: list[str]) -> list[InvariantResult]:
    rows = TripRows.load(saga_ids=saga_ids, skus=skus)
    return [
        check_completed(rows),
        check_compensated(rows),
        check_cancellations(rows),
        check_bookings_settled(rows),
        check_inventory(rows),
        check_money(rows),
        *check_gateway(rows),
    ]


def check_completed(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "completed_consistent",
        "COMPLETED trip: the total captured once under its key, booking CONFIRMED "
        "(or CANCELLED by a later cancellation), holds confirmed while it stands",
    )
    cancelled = {
        booking_id
        for booking_id, sagas in rows.cancellations().items()
        if any(saga["status"] == Status.COMPLETED for saga in sagas)
    }
    completed = list(rows.sagas_of(TRIP_BOOKING, Status.COMPLETED, result))
    charges = {}
    for chunk in chunks([charge_key(saga_id) for saga_id, _booking in completed]):
        charges.update(payment_selectors.charges_by_key(idempotency_keys=chunk))
    for saga_id, booking in completed:
        name = f"booking {booking.id}"
        if booking.status == Booking.Status.CONFIRMED:
            for line in booking.lines.all():
                hold = rows.holds.get(line.hold_reference)
                if hold is None or hold.status != "CONFIRMED":
                    result.flag(
                        saga_id, f"{name}: hold {line.hold_reference} is {hold and hold.status}"
                    )
        elif not (booking.status == Booking.Status.CANCELLED and str(booking.id) in cancelled):
            result.flag(saga_id, f"{name} is {booking.status}")
        charge = charges.get(charge_key(saga_id))
        if charge is None:
            result.flag(saga_id, f"{name}: no charge under the trip's key")
        elif charge.amount != booking.total:
            result.flag(
                saga_id, f"{name}: charged {money(charge.amount)} for {money(booking.total)}"
            )
    return result


def check_compensated(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "compensated_consistent",
        "COMPENSATED trip: booking REJECTED, no live hold, charges - refunds = 0",
    )
    for saga_id, booking in rows.sagas_of(TRIP_BOOKING, Status.COMPENSATED, result):
        flag_unless_undone(rows, result, saga_id, booking, Booking.Status.REJECTED)
    return result


def flag_unless_undone(
    rows: TripRows, result: InvariantResult, saga_id: str, booking: Booking, status: str
) -> None:
    """Flag the saga unless its booking is ``status`` with no live hold and nothing paid."""
    name = f"booking {booking.id}"
    if booking.status != status:
        result.flag(saga_id, f"{name} is {booking.status}")
    for problem in rows.live_holds(booking):
        result.flag(saga_id, f"{name}: {problem}")
    if rows.net(booking) != 0:
        result.flag(saga_id, f"{name}: charges - refunds = {money(rows.net(booking))}")


def check_cancellations(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "cancellations_consistent",
        "COMPLETED cancellation: booking CANCELLED, everything refunded and released; "
        "COMPENSATED cancellation: booking CONFIRMED and paid once (unless cancelled later)",
    )
    later = rows.cancellations()
    for saga_id, booking in rows.sagas_of(BOOKING_CANCELLATION, Status.COMPLETED, result):
        flag_unless_undone(rows, result, saga_id, booking, Booking.Status.CANCELLED)
    for saga_id, booking in rows.sagas_of(BOOKING_CANCELLATION, Status.COMPENSATED, result):
        name = f"booking {booking.id}"
        sagas = later.get(str(booking.id), [])
        superseded = any(saga["status"] == Status.COMPLETED for saga in sagas)
        if booking.status == Booking.Status.CANCELLED and superseded:
            continue
        if booking.status != Booking.Status.CONFIRMED:
            result.flag(saga_id, f"{name} is {booking.status}")
        elif rows.net(booking) != booking.total:
            result.flag(
                saga_id,
                f"{name}: paid {money(rows.net(booking))} for a total of {money(booking.total)}",
            )
    return result


def check_bookings_settled(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "bookings_settled",
        "every booking ends CONFIRMED, CANCELLED or REJECTED (none left CANCELLING, "
        "PENDING or NEEDS_ATTENTION)",
    )
    for booking in rows.bookings.values():
        if booking.status not in SETTLED:
            result.flag(booking.saga_id, f"booking {booking.id} is {booking.status}")
    return result


def check_inventory(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "inventory_balanced",
        "inventory: available + held + sold = capacity, none negative, nothing left held, "
        "sold = confirmed quantity",
    )
    confirmed: Counter = Counter()
    for booking in rows.bookings.values():
        if booking.status == Booking.Status.CONFIRMED:
            for line in booking.lines.all():
                confirmed[line.sku] += line.quantity
    items = {
        row["sku"]: row
        for row in inventory_selectors.item_list()
        .filter(sku__in=rows.skus)
        .values("sku", "capacity", "available", "held", "sold")
    }
    for sku in rows.skus:
        item = items.get(sku)
        if item is None:
            result.flag(sku, "item missing")
            continue
        available, held, sold = item["available"], item["held"], item["sold"]
        if available + held + sold != item["capacity"]:
            result.flag(sku, f"{available} + {held} + {sold} != capacity {item['capacity']}")
        if min(available, held, sold) < 0:
            result.flag(sku, f"negative counter: {available}/{held}/{sold}")
        if held:
            result.flag(sku, f"{held} unit(s) still held")
        if sold != confirmed[sku]:
            result.flag(sku, f"sold {sold}, but confirmed bookings hold {confirmed[sku]}")
    return result


def check_money(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "money_balanced",
        "our ledger: per booking, charges - refunds = its total if CONFIRMED, else 0",
    )
    totals = {"charged": ZERO, "refunded": ZERO, "net": ZERO}
    for own in rows.ledger.values():
        for key in totals:
            totals[key] += own[key]
    expected = sum((due(booking) for booking in rows.bookings.values()), ZERO)
    result.note = (
        f"charged {money(totals['charged'])}, refunded {money(totals['refunded'])}, "
        f"net {money(totals['net'])}, confirmed bookings {money(expected)}"
    )
    for booking in rows.bookings.values():
        own = rows.ledger[reference(booking)]
        if own["net"] != due(booking):
            result.flag(
                booking.saga_id,
                f"booking {booking.id} {booking.status}: charged {money(own['charged'])}, "
                f"refunded {money(own['refunded'])}, net {money(own['net'])}, "
                f"expected {money(due(booking))}",
            )
    return result


def check_gateway(rows: TripRows) -> list[InvariantResult]:
    """The gateway's own books: the money really taken, and whether our ledger knows it."""
    books = InvariantResult(
        "gateway_books_balanced",
        "at the gateway: per booking, captured - refunded = its total if CONFIRMED, else 0",
    )
    recorded = InvariantResult(
        "gateway_captures_recorded",
        "every capture and refund the gateway made has a matching local charge or refund",
    )
    captured = refunded = ZERO
    for booking in rows.bookings.values():
        theirs = payment_selectors.gateway_books(reference=reference(booking))
        captured += theirs.captured
        refunded += theirs.refunded
        if theirs.net != due(booking):
            books.flag(
                booking.saga_id,
                f"booking {booking.id} {booking.status}: gateway captured "
                f"{money(theirs.captured)}, refunded {money(theirs.refunded)}, net "
                f"{money(theirs.net)}, expected {money(due(booking))}",
            )
        for problem in payment_selectors.gateway_unrecorded(books=theirs):
            recorded.flag(booking.saga_id, f"booking {booking.id}: {problem}")
    books.note = (
        f"gateway captured {money(captured)}, refunded {money(refunded)}, "
        f"net {money(captured - refunded)}"
    )
    return [books, recorded]
