"""The invariants of DESIGN.md section 4, checked over one run's sagas, bookings and items.

Each check returns an ``InvariantResult`` naming its offenders (saga ids, or
SKUs for inventory) with a reason for the first few. Reads go through the
inventory and payments selectors; saga history is read from SagaLog directly,
since the order of its rows is what is being checked.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db.models import Count

from bookings.models import Booking
from inventory import selectors as inventory_selectors
from payments import selectors as payment_selectors
from sagas.definitions import SagaDefinition, registry
from sagas.models import Saga, SagaLog

CHUNK = 500
DETAILS_KEPT = 10
LIVE_HOLDS = ("HELD", "CONFIRMED")
Status = Saga.Status


@dataclass
class InvariantResult:
    name: str
    description: str
    offenders: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.offenders

    def flag(self, offender: Any, reason: str) -> None:
        key = str(offender)
        if key in self.details or key in self.offenders:
            self.details[key] = f"{self.details.get(key, '')}; {reason}".lstrip("; ")
            return
        self.offenders.append(key)
        if len(self.details) < DETAILS_KEPT:
            self.details[key] = reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passed": self.passed,
            "offenders": self.offenders,
            "offender_count": len(self.offenders),
            "details": self.details,
            "note": self.note,
        }


def money(value) -> str:
    """Two decimals whatever the database returns (SQLite sums come back as 360, not 360.00)."""
    return f"{Decimal(value):.2f}"


def chunks(values: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass
class RunRows:
    """What the checks read, loaded once."""

    sagas: dict[str, dict[str, Any]]
    bookings: dict[str, Booking]  # by saga id
    holds: dict[str, inventory_selectors.HoldInfo]
    done_logs: dict[str, list[dict[str, Any]]]  # by saga id, in (started_at, id) order
    skus: list[str]

    @classmethod
    def load(cls, *, saga_ids: Iterable, skus: list[str]) -> RunRows:
        ids = [str(saga_id) for saga_id in saga_ids]
        sagas: dict[str, dict[str, Any]] = {}
        bookings: dict[str, Booking] = {}
        done_logs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for chunk in chunks(ids):
            for row in Saga.objects.filter(pk__in=chunk).values(
                "id", "saga_type", "status", "steps_done", "duration_ms"
            ):
                sagas[str(row["id"])] = row
            for booking in Booking.objects.filter(saga_id__in=chunk).prefetch_related("lines"):
                bookings[str(booking.saga_id)] = booking
            logs = (
                SagaLog.objects.filter(saga_id__in=chunk, status__in=SagaLog.DONE)
                .order_by("started_at", "id")
                .values("id", "saga_id", "step", "phase", "status", "started_at")
            )
            for row in logs:
                done_logs[str(row["saga_id"])].append(row)
        references = [line.hold_reference for b in bookings.values() for line in b.lines.all()]
        holds: dict[str, inventory_selectors.HoldInfo] = {}
        for chunk in chunks(references):
            holds.update(inventory_selectors.holds_by_reference(references=chunk))
        return cls(sagas=sagas, bookings=bookings, holds=holds, done_logs=done_logs, skus=skus)


def check_run(
    *, saga_ids: Iterable, skus: list[str], undispatched: int = 0
) -> list[InvariantResult]:
    rows = RunRows.load(saga_ids=saga_ids, skus=skus)
    return [
        check_all_terminal(rows, undispatched=undispatched),
        check_no_failed(rows),
        check_completed(rows),
        check_compensated(rows),
        check_inventory(rows),
        check_money(rows),
        check_one_success_per_step(rows),
        check_compensation_order(rows),
    ]


def check_all_terminal(rows: RunRows, *, undispatched: int = 0) -> InvariantResult:
    result = InvariantResult("all_terminal", "every saga reached COMPLETED, COMPENSATED or FAILED")
    for saga_id, saga in rows.sagas.items():
        if saga["status"] not in Saga.TERMINAL:
            result.flag(saga_id, f"still {saga['status']} after step {saga['steps_done']}")
    if undispatched:
        result.flag("(not dispatched)", f"{undispatched} booking(s) never started: timed out")
    return result


def check_no_failed(rows: RunRows) -> InvariantResult:
    result = InvariantResult(
        "no_failed",
        "no saga ended FAILED (injected compensation failures are transient and must heal)",
    )
    for saga_id, saga in rows.sagas.items():
        if saga["status"] == Status.FAILED:
            result.flag(saga_id, "FAILED: a compensation exhausted its retries")
    return result


def check_completed(rows: RunRows) -> InvariantResult:
    result = InvariantResult(
        "completed_consistent",
        "COMPLETED: every hold confirmed, exactly one capture of the total, booking CONFIRMED",
    )
    for saga_id, saga in rows.sagas.items():
        if saga["status"] != Status.COMPLETED:
            continue
        booking = rows.bookings.get(saga_id)
        if booking is None:
            result.flag(saga_id, "no booking")
            continue
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


def check_compensated(rows: RunRows) -> InvariantResult:
    result = InvariantResult(
        "compensated_consistent",
        "COMPENSATED: no live hold, charges - refunds = 0, booking not confirmed",
    )
    for saga_id, saga in rows.sagas.items():
        if saga["status"] != Status.COMPENSATED:
            continue
        booking = rows.bookings.get(saga_id)
        if booking is None:
            result.flag(saga_id, "no booking")
            continue
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


def check_inventory(rows: RunRows) -> InvariantResult:
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


def check_money(rows: RunRows) -> InvariantResult:
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


def check_one_success_per_step(rows: RunRows) -> InvariantResult:
    result = InvariantResult(
        "one_success_per_step",
        "at most one successful action and one successful compensation per (saga, step)",
    )
    ids = list(rows.sagas)
    for chunk in chunks(ids):
        repeated = (
            SagaLog.objects.filter(saga_id__in=chunk, status__in=SagaLog.DONE)
            .values("saga_id", "step", "phase")
            .annotate(rows=Count("id"))
            .filter(rows__gt=1)
        )
        for row in repeated:
            result.flag(
                row["saga_id"], f"{row['rows']} successful {row['phase']}s of {row['step']}"
            )
    return result


def check_compensation_order(rows: RunRows) -> InvariantResult:
    result = InvariantResult(
        "compensation_order", "SagaLog compensations are the exact reverse of the actions"
    )
    for saga_id, saga in rows.sagas.items():
        logs = rows.done_logs.get(saga_id, [])
        problem = compensation_order_problem(
            definition=registry.get(saga["saga_type"]),
            status=saga["status"],
            steps_done=saga["steps_done"],
            actions=[r["step"] for r in logs if r["phase"] == SagaLog.Phase.ACTION],
            compensations=[r["step"] for r in logs if r["phase"] == SagaLog.Phase.COMPENSATION],
        )
        if problem:
            result.flag(saga_id, problem)
    return result


def compensation_order_problem(
    *,
    definition: SagaDefinition,
    status: str,
    steps_done: int,
    actions: list[str],
    compensations: list[str],
) -> str | None:
    """Why one saga's done SagaLog rows are out of order, or None.

    ``actions`` and ``compensations`` are the step names of its succeeded or
    skipped rows in (started_at, id) order. Compensations must undo the done
    actions newest first; steps without a compensation drop out. The step
    that failed may be undone first as well, but only if it has no succeeded
    action row: its outcome was uncertain (a timeout, a lost answer).
    """
    names = definition.action_names
    if actions != names[: len(actions)]:
        return f"actions ran as {actions}, not in saga order"
    undo = {step.name: step.undo_name for step in definition.steps}
    expected = [undo[name] for name in reversed(actions) if undo.get(name)]
    allowed = [expected]
    if steps_done < len(names):
        failed = names[steps_done]
        if undo.get(failed) and failed not in actions:
            allowed.append([undo[failed], *expected])
    if status == Status.COMPLETED:
        if compensations:
            return f"COMPLETED but compensated {compensations}"
        return None
    if status == Status.COMPENSATED:
        if compensations not in allowed:
            return f"compensated {compensations}, expected {expected}"
        return None
    # FAILED or still open: what ran so far must be a prefix of the right order.
    if not any(compensations == order[: len(compensations)] for order in allowed):
        return f"compensated {compensations} so far, expected a prefix of {expected}"
    return None
