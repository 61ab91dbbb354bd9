"""Writes of inventory: items and holds on their stock.

Every counter change is a conditional UPDATE with F() expressions, and every
hold status change is an UPDATE ``WHERE status = <expected>``. On PostgreSQL a
concurrent UPDATE of the same row waits and then re-evaluates its WHERE clause
against the committed row, so two callers can never both take the last unit nor
both move one hold. Rows are touched in one order (hold, then item) so
concurrent calls cannot deadlock.
"""

from __future__ import annotations

from decimal import Decimal

from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from inventory.errors import (
    HoldNotFound,
    InvalidHoldState,
    InvalidQuantity,
    OutOfStock,
    UnknownItem,
)
from inventory.models import Hold, Item

Status = Hold.Status

# A hold changes state at most a few times; more lost races than this in one
# call means something keeps moving it, and the caller had better retry.
_MAX_RACES = 5


@transaction.atomic
def item_create(
    *, sku: str, kind: str, name: str, capacity: int, price: Decimal, currency: str
) -> Item:
    """Create an item with all of its capacity available."""
    item = Item(
        sku=sku,
        kind=kind,
        name=name,
        capacity=capacity,
        available=capacity,
        held=0,
        sold=0,
        price=price,
        currency=currency,
    )
    item.full_clean()
    item.save()
    return item


@transaction.atomic
def item_upsert(
    *, sku: str, kind: str, name: str, capacity: int, price: Decimal, currency: str
) -> tuple[Item, bool]:
    """Create the item unless its SKU exists; an existing item is left as it is.

    Returns ``(item, created)``. Meant for seeding, which must be safe to rerun.
    """
    existing = Item.objects.filter(sku=sku).first()
    if existing is not None:
        return existing, False
    try:
        with transaction.atomic():
            return (
                item_create(
                    sku=sku,
                    kind=kind,
                    name=name,
                    capacity=capacity,
                    price=price,
                    currency=currency,
                ),
                True,
            )
    except IntegrityError:
        # A concurrent seed created the SKU between the lookup and the insert.
        existing = Item.objects.filter(sku=sku).first()
        if existing is None:
            raise
        return existing, False


@transaction.atomic
def hold_place(*, sku: str, quantity: int, reference: str) -> Hold:
    """Move ``quantity`` units of ``sku`` from available to held.

    Idempotent by ``reference``: if a hold with it exists, it is returned
    unchanged, whatever its state.
    """
    if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity < 1:
        raise InvalidQuantity(quantity)
    existing = Hold.objects.filter(reference=reference).first()
    if existing is not None:
        return existing
    item_id = Item.objects.filter(sku=sku).values_list("pk", flat=True).first()
    if item_id is None:
        raise UnknownItem(sku)

    # The hold row goes in first: a concurrent call with the same reference
    # waits on the unique index here, before either touches the counters.
    try:
        with transaction.atomic():
            hold = Hold.objects.create(
                item_id=item_id, quantity=quantity, reference=reference, status=Status.HELD
            )
    except IntegrityError:
        existing = Hold.objects.filter(reference=reference).first()
        if existing is None:
            raise
        return existing

    taken = Item.objects.filter(pk=item_id, available__gte=quantity).update(
        available=F("available") - quantity,
        held=F("held") + quantity,
        updated_at=timezone.now(),
    )
    if not taken:
        # Raising rolls back this function's transaction, hold row included.
        available = Item.objects.filter(pk=item_id).values_list("available", flat=True).get()
        raise OutOfStock(sku, quantity, available)
    return hold


@transaction.atomic
def hold_confirm(*, reference: str) -> Hold:
    """HELD -> CONFIRMED: the held units become sold. Confirming twice is a no-op."""
    for _ in range(_MAX_RACES):
        hold = _hold_get(reference=reference)
        if hold.status == Status.CONFIRMED:
            return hold
        if hold.status != Status.HELD:
            raise InvalidHoldState(reference, hold.status, "confirmed")
        if _hold_move(hold=hold, source=Status.HELD, target=Status.CONFIRMED, held=-1, sold=+1):
            return hold
    raise _too_many_races(reference=reference, action="confirmed")


@transaction.atomic
def hold_release(*, reference: str) -> Hold | None:
    """Give a held or sold hold's units back to available.

    Returns the hold if this call released it, ``None`` if there is no such
    hold or it was already released: the caller's compensation had nothing to
    undo.
    """
    for _ in range(_MAX_RACES):
        hold = Hold.objects.filter(reference=reference).first()
        if hold is None or hold.status == Status.RELEASED:
            return None
        counter = "held" if hold.status == Status.HELD else "sold"
        if _hold_move(
            hold=hold, source=hold.status, target=Status.RELEASED, **{counter: -1, "available": +1}
        ):
            return hold
    raise _too_many_races(reference=reference, action="released")


@transaction.atomic
def hold_reinstate(*, reference: str) -> Hold | None:
    """RELEASED -> CONFIRMED again, taking the units back from available.

    Undoes a cancellation. Raises ``OutOfStock`` if the units were sold to
    someone else in the meantime; ``None`` if there is no such hold; a hold that
    is already CONFIRMED is returned as it is.
    """
    for _ in range(_MAX_RACES):
        hold = Hold.objects.filter(reference=reference).first()
        if hold is None:
            return None
        if hold.status == Status.CONFIRMED:
            return hold
        if hold.status != Status.RELEASED:
            raise InvalidHoldState(reference, hold.status, "reinstated")
        if _hold_move(
            hold=hold, source=Status.RELEASED, target=Status.CONFIRMED, available=-1, sold=+1
        ):
            return hold
    raise _too_many_races(reference=reference, action="reinstated")


def _hold_get(*, reference: str) -> Hold:
    hold = Hold.objects.filter(reference=reference).first()
    if hold is None:
        raise HoldNotFound(reference)
    return hold


def _hold_move(*, hold: Hold, source: str, target: str, **signs: int) -> bool:
    """Move ``hold`` from ``source`` to ``target`` and shift its item's counters.

    ``signs`` maps counter names to +1 or -1 (times the hold's quantity). False
    if the hold was no longer in ``source``: another call moved it first and the
    counters were left alone. Must run inside the caller's transaction, so a
    refused counter update (OutOfStock) also undoes the status change.
    """
    now = timezone.now()
    moved = Hold.objects.filter(pk=hold.pk, status=source).update(status=target, updated_at=now)
    if not moved:
        return False
    quantity = hold.quantity
    # Only ``available`` can honestly run short (the units went to someone
    # else). ``held`` and ``sold`` always cover the hold's own units; if they do
    # not, the check constraints fail loudly with an IntegrityError.
    guard = {"available__gte": quantity} if signs.get("available", 0) < 0 else {}
    changes = {name: F(name) + sign * quantity for name, sign in signs.items()}
    shifted = Item.objects.filter(pk=hold.item_id, **guard).update(**changes, updated_at=now)
    if not shifted:
        item = Item.objects.filter(pk=hold.item_id).values("sku", "available").get()
        raise OutOfStock(item["sku"], quantity, item["available"])
    hold.status = target
    hold.updated_at = now
    return True


def _too_many_races(*, reference: str, action: str) -> InvalidHoldState:
    status = Hold.objects.filter(reference=reference).values_list("status", flat=True).first()
    return InvalidHoldState(reference, f"{status} (changing concurrently)", action)


@transaction.atomic
def items_purge(*, skus: list[str]) -> dict[str, int]:
    """Delete items and every hold on them: for test and harness runs that made their own stock.

    Never for stock customers booked: their holds and history go with it.
    """
    holds, _ = Hold.objects.filter(item__sku__in=skus).delete()
    items, _ = Item.objects.filter(sku__in=skus).delete()
    return {"holds": holds, "items": items}
