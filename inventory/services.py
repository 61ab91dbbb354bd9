"""Writes of inventory: items and holds on their stock.

The hold services take many references at once (``holds_place``,
``holds_confirm``, ``holds_release``, ``holds_reinstate``; ``hold_*`` are the
same for one reference) and do one thing per statement: the holds change state
in one conditional ``UPDATE ... WHERE status = <expected> RETURNING`` (or, to
place them, ``INSERT ... ON CONFLICT DO NOTHING RETURNING``), then each item's
counters move in one conditional UPDATE (``counter = counter + delta``). The
statements are SQL built once, not ORM queries compiled on every call. Nothing
is read before it is written; only a reference the write did not return costs
a read, to tell why (held before, already moved, missing).

Concurrency. On PostgreSQL a concurrent UPDATE of the same row waits and then
re-evaluates its WHERE clause against the committed row, and a concurrent
INSERT of the same reference waits on the unique index, so two callers can
never both take the last unit nor both move one hold: the conditional writes
are the race guard. Rows are locked in one order, holds (by reference to
insert them, by id to move them) before items (by id), so two calls cannot
deadlock whatever references they name, in whatever order.

Transactions. A service runs in the caller's transaction when one is open (a
saga step's) and in one of its own otherwise; never in a savepoint. A crash
between two statements rolls back the transaction, the call's writes with it.
A domain error (``InventoryError``) leaves nothing of the call behind even when
the caller catches it and commits: the call undoes its own writes before
raising. Any other error marks the caller's transaction for rollback, so
nothing half done can be committed.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import ParamSpec, TypeVar

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from inventory.errors import (
    HoldNotFound,
    InvalidHoldState,
    InvalidQuantity,
    InventoryError,
    OutOfStock,
    UnknownItem,
)
from inventory.models import Hold, Item

Status = Hold.Status

# A hold changes state at most a few times; more lost races than this in one
# call means something keeps moving it, and the caller had better retry.
_MAX_RACES = 5

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _one_transaction(service: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``service`` in the caller's transaction if one is open, else in its own.

    Never a savepoint: a saga step's transaction is already the unit. The
    service must undo its own writes before raising an ``InventoryError``, so
    that a caller who catches one may go on; any other error marks the
    caller's transaction for rollback (a caller that must survive those keeps
    a savepoint of its own: ``with transaction.atomic(): ...``).
    """

    @functools.wraps(service)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if not transaction.get_connection().in_atomic_block:
            with transaction.atomic():
                return service(*args, **kwargs)
        try:
            return service(*args, **kwargs)
        except InventoryError:
            raise
        except BaseException:
            transaction.set_rollback(True)
            raise

    return run


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


@dataclass(frozen=True)
class HoldRequest:
    """``quantity`` units of ``sku`` to hold under ``reference`` (the caller's handle)."""

    sku: str
    quantity: int
    reference: str


def hold_place(*, sku: str, quantity: int, reference: str) -> Hold:
    """Move ``quantity`` units of ``sku`` from available to held (``holds_place`` for one)."""
    return holds_place(requests=[HoldRequest(sku=sku, quantity=quantity, reference=reference)])[0]


@_one_transaction
def holds_place(*, requests: Sequence[HoldRequest]) -> list[Hold]:
    """Hold each request's units, moving them from available to held.

    Returns the holds in the order of ``requests``. Idempotent by reference:
    a reference that has a hold gets it back unchanged, whatever its state.
    ``UnknownItem`` or ``OutOfStock`` (naming the first item short of stock,
    in id order) leave no hold and no counter changed by the call.

    Statements: one ``INSERT ... SELECT ... ON CONFLICT DO NOTHING RETURNING``
    per request, then one conditional UPDATE per item; a reference whose
    INSERT returned nothing (held before, or an unknown SKU) adds one read.

    Interleavings it survives:
    - a duplicate call: its INSERT finds the reference taken and returns
      nothing; the read returns the first call's hold; no counter moves.
    - two calls with one reference at once: the second INSERT waits on the
      unique index until the first commits (then it does nothing, as above)
      or rolls back (then it holds as if alone).
    - two calls for the last units: the second counter UPDATE waits for the
      first's row lock, re-evaluates ``available >= quantity`` against the
      committed row and takes nothing: ``OutOfStock``.
    - a crash between statements: the transaction rolls back, holds and
      counters together.
    - a caller that catches ``OutOfStock`` or ``UnknownItem`` and commits: the
      call deleted its holds and gave back what it took before raising.
    """
    for request in requests:
        if (
            isinstance(request.quantity, bool)
            or not isinstance(request.quantity, int)
            or request.quantity < 1
        ):
            raise InvalidQuantity(request.quantity)
    now = timezone.now()
    placed: dict[str, Hold] = {}
    # By reference: two calls naming the same references insert them in one
    # order, so neither waits on a reference the other waits for.
    for request in sorted(requests, key=lambda request: request.reference):
        if request.reference not in placed:
            for hold in _holds_returned(
                _insert_sql(),
                [request.quantity, request.reference, Status.HELD, now, now, request.sku],
            ):
                placed[hold.reference] = hold
    new = list(placed.values())
    found: dict[str, Hold] = {}
    missing = [request for request in requests if request.reference not in placed]
    if missing:
        references = [request.reference for request in missing]
        found = {hold.reference: hold for hold in Hold.objects.filter(reference__in=references)}
        unknown = next((request for request in missing if request.reference not in found), None)
        if unknown is not None:
            _holds_delete(new)
            raise UnknownItem(unknown.sku)
    try:
        _counters_shift(_shifts(new, available=-1, held=+1), now=now)
    except OutOfStock:
        _holds_delete(new)
        raise
    return [placed.get(request.reference) or found[request.reference] for request in requests]


def hold_confirm(*, reference: str) -> Hold:
    """HELD -> CONFIRMED: the held units become sold (``holds_confirm`` for one)."""
    return holds_confirm(references=[reference])[0]


@_one_transaction
def holds_confirm(*, references: Sequence[str]) -> list[Hold]:
    """HELD -> CONFIRMED for the holds of ``references``: their held units become sold.

    Returns the holds in the order given. Confirming a confirmed hold is a
    no-op that returns it. ``HoldNotFound`` or ``InvalidHoldState`` (for the
    first offending reference given) leave every hold and counter as it was.

    Statements: one UPDATE of the holds, one per item; holds the UPDATE did
    not move (confirmed before, missing, released) add one read.

    Interleavings it survives:
    - a duplicate call: its UPDATE moves nothing; the read finds the holds
      CONFIRMED and returns them; no counter moves.
    - two calls at once: the second UPDATE waits on the hold rows, re-checks
      ``status = 'HELD'`` against the committed rows and moves none of them;
      it reads them CONFIRMED, as above.
    - a hold placed or released between the UPDATE and the read: placed (now
      HELD) is moved by another UPDATE; released is ``InvalidHoldState``.
    - a crash between statements: the transaction rolls back.
    - a caller that catches the error and commits: the holds this call moved
      were moved back before raising, and no counter had moved yet.
    """
    now = timezone.now()
    moved, already = _holds_move_all(
        references,
        source=Status.HELD,
        target=Status.CONFIRMED,
        action="confirmed",
        missing_ok=False,
        now=now,
    )
    _counters_shift(_shifts(moved, held=-1, sold=+1), now=now)
    holds = {hold.reference: hold for hold in [*moved, *already]}
    return [holds[reference] for reference in references]


def hold_release(*, reference: str) -> Hold | None:
    """Give a held or sold hold's units back (``holds_release`` for one).

    Returns the hold if this call released it, ``None`` if there is no such
    hold or it was already released: the caller's compensation had nothing to
    undo.
    """
    released = holds_release(references=[reference])
    return released[0] if released else None


@_one_transaction
def holds_release(*, references: Sequence[str], first: str = Status.HELD) -> list[Hold]:
    """HELD or CONFIRMED -> RELEASED: give the units of the holds of ``references`` back.

    Returns the holds this call released, in the order given; a reference
    with no hold, or an already released one, is left out (nothing to undo).
    ``first`` is the state most of the holds are expected in (HELD for a
    reservation undone, CONFIRMED for a sale cancelled): the holds in it move
    in one UPDATE, and those in the other state take a second one only if
    any reference is left.

    Statements: one or two UPDATEs of the holds, one UPDATE per item.

    Interleavings it survives:
    - a duplicate call: neither UPDATE matches a RELEASED hold; nothing moves.
    - two calls at once: the second waits on the hold rows, re-checks their
      status against the committed rows and moves none of them.
    - a hold confirmed between the two UPDATEs: the second one (CONFIRMED)
      releases it, taking its units from sold.
    - a crash between statements: the transaction rolls back.
    """
    if first not in (Status.HELD, Status.CONFIRMED):
        raise ValueError(f"first must be {Status.HELD} or {Status.CONFIRMED}, not {str(first)!r}")
    second = Status.CONFIRMED if first == Status.HELD else Status.HELD
    pending = _ordered(references)
    now = timezone.now()
    released = {first: _holds_update(pending, source=first, target=Status.RELEASED, now=now)}
    left = _without(pending, released[first])
    released[second] = (
        _holds_update(left, source=second, target=Status.RELEASED, now=now) if left else []
    )
    shifts = _shifts(released[Status.HELD], held=-1, available=+1)
    for item_id, deltas in _shifts(released[Status.CONFIRMED], sold=-1, available=+1).items():
        for name, delta in deltas.items():
            shifts[item_id][name] += delta
    _counters_shift(shifts, now=now)
    holds = {hold.reference: hold for hold in [*released[first], *released[second]]}
    return [holds[reference] for reference in _ordered(references, keep=holds)]


def hold_reinstate(*, reference: str) -> Hold | None:
    """RELEASED -> CONFIRMED again (``holds_reinstate`` for one); None if there is no such hold."""
    reinstated = holds_reinstate(references=[reference])
    return reinstated[0] if reinstated else None


@_one_transaction
def holds_reinstate(*, references: Sequence[str]) -> list[Hold]:
    """RELEASED -> CONFIRMED again, taking the units back from available.

    Undoes a cancellation. Returns the holds that are CONFIRMED now (by this
    call or before), in the order given; a reference with no hold is left
    out. ``OutOfStock`` if the units were sold to someone else in the
    meantime, ``InvalidHoldState`` for a hold still HELD: either leaves every
    hold and counter as it was.

    Statements: one UPDATE of the holds, one per item; holds the UPDATE did
    not move add one read.

    Interleavings it survives:
    - a duplicate call: its UPDATE moves nothing; the read finds the holds
      CONFIRMED and returns them; no counter moves.
    - two calls at once: the second UPDATE waits on the hold rows and moves
      none of them (as above).
    - a call taking the last units at once: the counter UPDATE re-checks
      ``available >= quantity`` after the other commits: ``OutOfStock``.
    - a crash between statements: the transaction rolls back.
    - a caller that catches the error and commits: the holds and counters
      this call moved were moved back before raising.
    """
    now = timezone.now()
    moved, already = _holds_move_all(
        references,
        source=Status.RELEASED,
        target=Status.CONFIRMED,
        action="reinstated",
        missing_ok=True,
        now=now,
    )
    try:
        _counters_shift(_shifts(moved, available=-1, sold=+1), now=now)
    except OutOfStock:
        _holds_update(
            _ordered(hold.reference for hold in moved),
            source=Status.CONFIRMED,
            target=Status.RELEASED,
            now=now,
        )
        raise
    holds = {hold.reference: hold for hold in [*moved, *already]}
    return [holds[reference] for reference in _ordered(references, keep=holds)]


# --- the statements ----------------------------------------------------------------

_HOLD_FIELDS = ("id", "item_id", "quantity", "reference", "status", "created_at", "updated_at")
_HOLD_COLUMNS = ", ".join(_HOLD_FIELDS)  # the columns are named as the fields
_INSERTED = "item_id, quantity, reference, status, created_at, updated_at"


def _insert_sql() -> str:
    hold, item = _table(Hold), _table(Item)
    # Table names come from the models; every value is a parameter. The WHERE
    # clause also keeps SQLite from reading ON CONFLICT as a join's ON.
    return (
        f"INSERT INTO {hold} ({_INSERTED}) "  # noqa: S608
        f"SELECT id, %s, %s, %s, %s, %s FROM {item} WHERE sku = %s "
        f"ON CONFLICT (reference) DO NOTHING RETURNING {_HOLD_COLUMNS}"
    )


def _holds_update(references: Sequence[str], *, source: str, target: str, now) -> list[Hold]:
    """``source`` -> ``target`` for the holds of ``references`` that are in ``source``; the moved.

    The rows are locked in id order first (``ORDER BY id FOR UPDATE``; SQLite
    has one writer at a time and needs no lock), so two calls over the same
    holds cannot deadlock. A row changed by a concurrent writer is re-checked
    against ``source`` once that writer commits, and skipped if it moved.
    """
    if not references:
        return []
    table = _table(Hold)
    marks = ", ".join(["%s"] * len(references))
    lock = " FOR UPDATE" if connection.features.has_select_for_update else ""
    sql = (
        f"UPDATE {table} SET status = %s, updated_at = %s "  # noqa: S608 - as in _insert_sql
        f"WHERE status = %s AND id IN (SELECT id FROM {table} "
        f"WHERE reference IN ({marks}) AND status = %s ORDER BY id{lock}) "
        f"RETURNING {_HOLD_COLUMNS}"
    )
    return _holds_returned(sql, [target, now, source, *references, source])


def _holds_returned(sql: str, params: list) -> list[Hold]:
    """Run ``sql`` (its rows: ``_HOLD_COLUMNS``) and make Holds of them, converted as a
    query's rows are (SQLite's timestamps come back as text). Without ``raw()``'s
    per-call column mapping, which cost a fifth of the statement."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall()
    converters = _hold_converters(connection.vendor)
    holds = []
    for row in rows:
        values = list(row)
        for at, column, functions in converters:
            for convert in functions:
                values[at] = convert(values[at], column, connection)
        holds.append(Hold.from_db(connection.alias, _HOLD_FIELDS, values))
    return holds


@functools.lru_cache(maxsize=4)
def _hold_converters(vendor: str) -> list[tuple[int, object, list]]:
    """Per column of ``_HOLD_COLUMNS`` that needs it: its index, column and converters."""
    table = Hold._meta.db_table
    converters = []
    for at, name in enumerate(_HOLD_FIELDS):
        field = Hold._meta.get_field(name)
        column = field.get_col(table)
        functions = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        if functions:
            converters.append((at, column, functions))
    return converters


def _holds_delete(holds: list[Hold]) -> None:
    if holds:
        Hold.objects.filter(pk__in=sorted(hold.pk for hold in holds)).delete()


def _holds_move_all(
    references: Sequence[str], *, source: str, target: str, action: str, missing_ok: bool, now
) -> tuple[list[Hold], list[Hold]]:
    """Move every hold of ``references`` from ``source`` to ``target``.

    Returns the holds moved by this call and those found in ``target``
    already. A reference with no hold is left out if ``missing_ok``, else
    ``HoldNotFound``; a hold in any other state is ``InvalidHoldState``. A hold
    found in ``source`` after the UPDATE passed it moved there meanwhile (it
    was placed, say): the UPDATE is tried again for it, up to _MAX_RACES times.
    On an error, the holds this call moved are moved back before raising.
    """
    moved: list[Hold] = []
    already: list[Hold] = []
    pending = _ordered(references)
    for _ in range(_MAX_RACES):
        moved += _holds_update(pending, source=source, target=target, now=now)
        pending = _without(pending, moved)
        if not pending:
            return moved, already
        current = {hold.reference: hold for hold in Hold.objects.filter(reference__in=pending)}
        retry = []
        for reference in [reference for reference in references if reference in pending]:
            hold = current.get(reference)
            if hold is not None and hold.status == target:
                already.append(hold)
            elif hold is not None and hold.status == source:
                retry.append(reference)
            elif hold is None and missing_ok:
                continue
            else:
                _holds_update(
                    _ordered(h.reference for h in moved), source=target, target=source, now=now
                )
                if hold is None:
                    raise HoldNotFound(reference)
                raise InvalidHoldState(reference, hold.status, action)
        pending = _ordered(retry)
        if not pending:
            return moved, already
    _holds_update(_ordered(h.reference for h in moved), source=target, target=source, now=now)
    raise _too_many_races(reference=pending[0], action=action)


def _counters_shift(shifts: dict[int, dict[str, int]], *, now) -> None:
    """Shift each item's counters by ``shifts[item_id]`` (counter -> units), items in id order.

    A shift that takes units from ``available`` is conditional on there being
    enough: if an item has too few, the shifts this call made are reverted
    and ``OutOfStock`` is raised for that item. ``held`` and ``sold`` always
    cover the holds' own units; if they do not, the check constraints fail
    loudly with an IntegrityError.
    """
    done: list[int] = []
    for item_id in sorted(shifts):
        deltas = {name: delta for name, delta in shifts[item_id].items() if delta}
        if not deltas:
            continue
        needed = -deltas.get("available", 0)
        if _shift(item_id, deltas, now=now, needed=needed if needed > 0 else None):
            done.append(item_id)
            continue
        item = Item.objects.filter(pk=item_id).values("sku", "available").get()
        for undone in done:
            _shift(
                undone, {name: -delta for name, delta in shifts[undone].items() if delta}, now=now
            )
        raise OutOfStock(item["sku"], needed, item["available"])


def _shift(item_id: int, deltas: dict[str, int], *, now, needed: int | None = None) -> bool:
    """Add ``deltas`` to the item's counters if it has ``needed`` units available; whether it did.

    One UPDATE, its SQL built once per set of counters: the ORM's compiling
    of the same statement took longer than running it.
    """
    names = tuple(sorted(deltas))
    stamp = Item._meta.get_field("updated_at").get_db_prep_value(now, connection)
    params = [*(deltas[name] for name in names), stamp, item_id]
    if needed is not None:
        params.append(needed)
    with connection.cursor() as cursor:
        cursor.execute(_shift_sql(connection.vendor, names, needed is not None), params)
        return cursor.rowcount == 1


@functools.lru_cache(maxsize=64)
def _shift_sql(vendor: str, names: tuple[str, ...], guarded: bool) -> str:
    def column(name: str) -> str:
        return connection.ops.quote_name(Item._meta.get_field(name).column)

    moves = ", ".join(f"{column(name)} = {column(name)} + %s" for name in names)
    guard = f" AND {column('available')} >= %s" if guarded else ""
    # Names come from the model; every value is a parameter.
    return (
        f"UPDATE {_table(Item)} SET {moves}, {column('updated_at')} = %s "  # noqa: S608
        f"WHERE {column('id')} = %s{guard}"
    )


def _shifts(holds: Iterable[Hold], **signs: int) -> defaultdict[int, defaultdict[str, int]]:
    """Per item, each counter's change: ``signs`` (+1 or -1) times the holds' quantities."""
    shifts: defaultdict[int, defaultdict[str, int]] = defaultdict(lambda: defaultdict(int))
    for hold in holds:
        for name, sign in signs.items():
            shifts[hold.item_id][name] += sign * hold.quantity
    return shifts


def _ordered(references: Iterable[str], keep=None) -> list[str]:
    """Distinct ``references``; sorted, or in the order given if ``keep`` (a filter) is given."""
    if keep is None:
        return sorted(set(references))
    return list(dict.fromkeys(reference for reference in references if reference in keep))


def _without(references: list[str], holds: list[Hold]) -> list[str]:
    done = {hold.reference for hold in holds}
    return [reference for reference in references if reference not in done]


def _table(model) -> str:
    return connection.ops.quote_name(model._meta.db_table)


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
