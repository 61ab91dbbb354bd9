"""The trip's domain invariants (DESIGN.md section 4) over one chaos run's bookings and items.

COMPLETED trips hold confirmed stock and exactly one capture; COMPENSATED
ones hold nothing and paid nothing; stock balances; money balances. Reads go
through the inventory and payments selectors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bookings.models import Booking
from inventory import selectors as inventory_selectors
from payments import selectors as payment_selectors
from sagas.harness.plugin import InvariantResult, chunks
from sagas.models import Saga

LIVE_HOLDS = ("HELD", "CONFIRMED")
Status = Saga.Status


def money(value) -> str:
    """Two decimals whatever the database returns (SQLite sums come back as 360, not 360.00)."""
    return f"{Decimal(value):.2f}"


@dataclass
class TripRows:
    """What the checks read, loaded once."""

    sagas: dict[str, dict[str, Any]]
    bookings: dict[str, Booking]  # by saga id
    holds: dict[str, inventory_selectors.HoldInfo]
    skus: list[str]

    @classmethod
    def load(cls, *, saga_ids: list[str], skus: list[str]) -> TripRows:
        sagas: dict[str, dict[str, Any]] = {}
        bookings: dict[str, Booking] = {}
        for chunk in chunks(saga_ids):
            for row in Saga.objects.filter(pk__in=chunk).values("id", "status"):
                sagas[str(row["id"])] = row
            for booking in Booking.objects.filter(saga_id__in=chunk).prefetch_related("lines"):
                bookings[str(booking.saga_id)] = booking
        references = [line.hold_reference for b in bookings.values() for line in b.lines.all()]
        holds: dict[str, inventory_selectors.HoldInfo] = {}
        for chunk in chunks(references):
            holds.update(inventory_selectors.holds_by_reference(references=chunk))
        return cls(sagas=sagas, bookings=bookings, holds=holds, skus=skus)

    def bookings_of(self, status: str, result: InvariantResult) -> Iterator[tuple[str, Booking]]:
        """(saga id, booking) of every saga with ``status``; a saga without one is flagged."""
        for saga_id, saga in self.sagas.items():
            if saga["status"] != status:
                continue
            booking = self.bookings.get(saga_id)
            if booking is None:
                result.flag(saga_id, "no booking")
                continue
            yield saga_id, booking


def check_trips(*, saga_ids: list[str], skus: list[str]) -> list[InvariantResult]:
    rows = TripRows.load(saga_ids=saga_ids, skus=skus)
    return [
        check_completed(rows),
        check_compensated(rows),
        check_inventory(rows),
        check_money(rows),
    ]


def check_completed(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "completed_consistent",
        "COMPLETED: every hold confirmed, exactly one capture of the total, booking CONFIRMED",
    )
    for saga_id, booking in rows.bookings_of(Status.COMPLETED, result):
        if booking.status != Booking.Status.CONFIRMED:
            result.flag(saga_id, f"booking is {booking.status}")
        for line in booking.lines.all():
            hold = rows.holds.get(line.hold_reference)
            if hold is None or hold.status != "CONFIRMED":
                result.flag(saga_id, f"hold {line.hold_reference} is {hold and hold.status}")
        charges = payment_selectors.charges_for_reference(reference=f"booking:{booking.id}")
        if len(charges) != 1:
            result.flag(saga_id, f"{len(charges)} charges instead of one")
        elif charges[0].amount != booking.total or charges[0].refunded_amount:
            result.flag(
                saga_id,
                f"charged {money(charges[0].amount)} "
                f"(refunded {money(charges[0].refunded_amount)}) "
                f"for a total of {money(booking.total)}",
            )
    return result


def check_compensated(rows: TripRows) -> InvariantResult:
    result = InvariantResult(
        "compensated_consistent",
        "COMPENSATED: no live hold, charges - refunds = 0, booking not confirmed",
    )
    for saga_id, booking in rows.bookings_of(Status.COMPENSATED, result):
        if booking.status == Booking.Status.CONFIRMED:
            result.flag(saga_id, "booking is CONFIRMED")
        for line in booking.lines.all():
            hold = rows.holds.get(line.hold_reference)
            if hold is not None and hold.status in LIVE_HOLDS:
                result.flag(saga_id, f"hold {line.hold_reference} is still {hold.status}")
        net = payment_selectors.money_totals(references=[f"booking:{booking.id}"])["net"]
        if net != 0:
            result.flag(saga_id, f"charges - refunds = {money(net)}")
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
        "money_balanced", "money: charges - refunds = the sum of confirmed bookings' totals"
    )
    bookings = list(rows.bookings.values())
    expected = sum(
        (b.total for b in bookings if b.status == Booking.Status.CONFIRMED), Decimal("0")
    )
    totals = {"charged": Decimal("0"), "refunded": Decimal("0"), "net": Decimal("0")}
    for chunk in chunks([f"booking:{b.id}" for b in bookings]):
        for key, value in payment_selectors.money_totals(references=chunk).items():
            totals[key] += value
    result.note = (
        f"charged {money(totals['charged'])}, refunded {money(totals['refunded'])}, "
        f"net {money(totals['net'])}, confirmed bookings {money(expected)}"
    )
    if totals["net"] == expected:
        return result
    for booking in bookings:
        own = payment_selectors.money_totals(references=[f"booking:{booking.id}"])["net"]
        should = booking.total if booking.status == Booking.Status.CONFIRMED else 0
        if own != should:
            result.flag(
                booking.saga_id,
                f"booking {booking.status}: net {money(own)}, expected {money(should)}",
            )
    if not result.offenders:
        result.flag("(run)", f"net {money(totals['net'])} != confirmed {money(expected)}")
    return result
