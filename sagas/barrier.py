"""The barrier's statements: claim a step and record it in as few round trips as it allows.

A step's bookkeeping is two statements when nothing is out of the ordinary.

A step inside our database claims its saga with one conditional
``UPDATE ... RETURNING`` (:func:`claim_action`, :func:`claim_compensation`).
It checks the status and the counter, moves the counter, locks the row until
the step's transaction ends (so a concurrent copy, or the errback's claim,
waits and then finds the row moved) and returns the row for the step to read
(its ``CLAIMED_FIELDS``; the others are deferred). The step's log row is the
second statement. A claim that matches nothing returns None; the caller then
reads the row to tell a duplicate from a copy that came too late or too early.

An external step's call runs with no transaction open, so no claim is held
across it. It reads the saga and writes its in-flight STARTED row before the
call (:func:`open_call`); after the call it moves the counter and closes that
row (:func:`close_call`), or, for a compensation, writes its log row
(:func:`close_compensation_call`). On PostgreSQL each of these is one statement
(a data-modifying ``WITH``); other databases (SQLite) take two.

Every timestamp a claim writes on the saga comes from the database's clock,
as the sweeper's comparisons do.
"""

from __future__ import annotations

import uuid
from functools import lru_cache
from typing import Any

from django.db import connection, transaction
from django.db.models import F, Func, IntegerField, QuerySet
from django.db.models.functions import Coalesce, Now
from django.db.models.sql import UpdateQuery

from sagas.models import Saga, SagaLog

Status = Saga.Status
_RUNNABLE = (Status.PENDING, Status.RUNNING)
# What an attempt's outcome writes over its STARTED row.
CLOSING_FIELDS = ("status", "error", "result", "may_have_effect", "finished_at", "duration_ms")


class MillisecondsSince(Func):
    """Whole milliseconds from a timestamp expression to the database's ``now``, never negative."""

    output_field = IntegerField()

    def as_postgresql(self, compiler, connection, **extra):
        return self.as_sql(
            compiler,
            connection,
            template=(
                "GREATEST(0, (EXTRACT(EPOCH FROM (STATEMENT_TIMESTAMP() - %(expressions)s))"
                " * 1000)::integer)"
            ),
            **extra,
        )

    def as_sqlite(self, compiler, connection, **extra):
        return self.as_sql(
            compiler,
            connection,
            template=(
                "MAX(0, CAST((JULIANDAY('now') - JULIANDAY(%(expressions)s))"
                " * 86400000 AS INTEGER))"
            ),
            **extra,
        )


def claim_action(saga_id, *, index: int, step: str, last: bool) -> Saga | None:
    """Move the saga past action ``index`` if it is due there; the row as moved, or None.

    The last action's claim makes the saga COMPLETED (seen once the step
    commits); :func:`end_saga` stamps when it ended, after the step's work.
    """
    return _returning(*_move("action", saga_id, index=index, step=step, last=last, ended=False))


def end_saga(saga_id, *, row: SagaLog) -> None:
    """Stamp the claimed saga's end and duration and insert its last step's ``row``.

    One statement on PostgreSQL, two elsewhere; in the step's transaction.
    """
    end_sql, end_params = _move("end", saga_id)
    if connection.vendor != "postgresql":
        _execute(end_sql, end_params)
        insert_log(row)
        return
    _insert_from(f"WITH ended AS ({end_sql} RETURNING 1)", "ended", end_params, row)


def claim_compensation(saga_id, *, index: int, name: str, due_below: int) -> Saga | None:
    """Move the undo cursor to ``index`` if that compensation is due; the row as moved, or None.

    It is due while the cursor is above ``index`` and at most ``due_below``:
    the next step up that has a compensation of its own (or the step count),
    so compensations run strictly newest first.
    """
    return _returning(*_move("compensation", saga_id, index=index, name=name, due_below=due_below))


def open_call(saga_id, *, index: int, marker: SagaLog) -> tuple[Saga | None, SagaLog | None]:
    """The saga, and ``marker`` (the call's STARTED row) written if action ``index`` is due.

    On PostgreSQL both happen in one statement for a saga without a fault
    plan: the row is written only while the saga runs with its counter at
    ``index``. Elsewhere, and for a saga with a fault plan (whose faults must
    strike before the call is marked, as a crash before the call would), the
    saga is only read, and the caller checks it and writes the marker itself.
    ``(None, None)`` if the saga does not exist.
    """
    if connection.vendor != "postgresql":
        return Saga.objects.filter(pk=saga_id).first(), None
    columns, values, params = _insert_parts(marker)
    sagas, logs = _qn(Saga._meta.db_table), _qn(SagaLog._meta.db_table)
    saga_columns = _saga_columns()
    # Names come from the models' meta; every value is a parameter.
    sql = (
        f"WITH s AS (SELECT {saga_columns} FROM {sagas} WHERE id = %s),"  # noqa: S608
        f" m AS (INSERT INTO {logs} ({columns}) SELECT {values} FROM s"
        " WHERE s.status IN (%s, %s) AND s.steps_done = %s AND s.context -> 'chaos' IS NULL"
        " RETURNING id)"
        " SELECT s.*, (SELECT id FROM m) AS marker_id FROM s"
    )
    runnable = [status.value for status in _RUNNABLE]
    with connection.cursor() as cursor:
        cursor.execute(sql, [_saga_pk(saga_id), *params, *runnable, index])
        found = cursor.fetchone()
    if found is None:
        return None, None
    saga, marker_id = _saga_from(found[:-1]), found[-1]
    if marker_id is None:
        return saga, None
    return saga, _saved(marker, marker_id)


def insert_log(row: SagaLog) -> SagaLog:
    """Insert a new log row: ``row.save()``'s one INSERT, without the model machinery around it."""
    columns, values, params = _insert_parts(row)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_qn(SagaLog._meta.db_table)} ({columns})"  # noqa: S608
            f" VALUES ({values}) RETURNING id",
            params,
        )
        _saved(row, cursor.fetchone()[0])
    return row


def close_call(saga_id, *, index: int, step: str, last: bool, marker: SagaLog) -> bool:
    """Move the saga past external action ``index`` and save ``marker`` (its outcome), both or none.

    False, writing nothing, if the counter was not where the action expects it.
    """
    move_sql, move_params = _move("action", saga_id, index=index, step=step, last=last, ended=last)
    if connection.vendor != "postgresql":
        with transaction.atomic():
            if not _execute(move_sql, move_params):
                return False
            marker.save(update_fields=CLOSING_FIELDS)
        return True
    closing = [SagaLog._meta.get_field(name) for name in CLOSING_FIELDS]
    close_sql = (
        f"UPDATE {_qn(SagaLog._meta.db_table)} SET "  # noqa: S608 - names from the model
        + ", ".join(f"{_qn(field.column)} = %s" for field in closing)
        + " WHERE id = %s AND EXISTS (SELECT 1 FROM moved)"
    )
    close_params = [
        *(field.get_db_prep_save(getattr(marker, field.attname), connection) for field in closing),
        marker.pk,
    ]
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH moved AS ({move_sql} RETURNING 1) {close_sql}", (*move_params, *close_params)
        )
        return cursor.rowcount == 1


def close_compensation_call(
    saga_id, *, index: int, name: str, due_below: int, row: SagaLog
) -> bool:
    """Move the undo cursor to external compensation ``index`` and insert ``row``, both or none."""
    move_sql, move_params = _move(
        "compensation", saga_id, index=index, name=name, due_below=due_below
    )
    if connection.vendor != "postgresql":
        with transaction.atomic():
            if not _execute(move_sql, move_params):
                return False
            insert_log(row)
        return True
    return _insert_from(f"WITH moved AS ({move_sql} RETURNING 1)", "moved", move_params, row)


# --- the statements ------------------------------------------------------------------


def _action_move(
    saga_id, *, index: int, step: str, last: bool, ended: bool
) -> tuple[QuerySet, dict]:
    moves = Saga.objects.filter(pk=saga_id, steps_done=index, status__in=_RUNNABLE)
    return moves, {
        "steps_done": index + 1,
        "current_step": step,
        "status": Status.COMPLETED if last else Status.RUNNING,
        "started_at": Coalesce(F("started_at"), Now()),
        **(_ended() if ended else {"updated_at": Now()}),
    }


def _ended() -> dict[str, Any]:
    """The saga ends now, by the database's clock (a NULL start: it started now too)."""
    return {
        "finished_at": Now(),
        "duration_ms": MillisecondsSince(Coalesce(F("started_at"), Now())),
        "updated_at": Now(),
    }


def _compensation_move(saga_id, *, index: int, name: str, due_below: int):
    moves = Saga.objects.filter(
        pk=saga_id,
        status=Status.COMPENSATING,
        undo_cursor__gt=index,
        undo_cursor__lte=due_below,
    )
    return moves, {"undo_cursor": index, "current_step": name, "updated_at": Now()}


def _update_sql(queryset: QuerySet, values: dict[str, Any]) -> tuple[str, tuple]:
    """The UPDATE ``queryset.update(**values)`` would run, as SQL and parameters."""
    query = queryset.query.chain(UpdateQuery)
    query.add_update_values(values)
    sql, params = query.get_compiler(queryset.db).as_sql()
    return sql, tuple(params)


def _end_move(saga_id) -> tuple[QuerySet, dict]:
    return Saga.objects.filter(pk=saga_id), _ended()


_MOVES = {"action": _action_move, "compensation": _compensation_move, "end": _end_move}
# Compiled with this stand-in for the saga's id, which each call puts in its place.
_ANY_SAGA = uuid.UUID(int=0)


def _move(kind: str, saga_id, **key: Any) -> tuple[str, list]:
    """The UPDATE of move ``kind`` for one saga: compiled once per step, then reused.

    Compiling the ORM's UPDATE costs about as much as running it; only the
    saga's id differs from one saga to the next.
    """
    sql, params, at = _compiled(connection.vendor, kind, tuple(sorted(key.items())))
    params = list(params)
    params[at] = _saga_pk(saga_id)
    return sql, params


@lru_cache(maxsize=1024)
def _compiled(vendor: str, kind: str, key: tuple) -> tuple[str, tuple, int]:
    queryset, values = _MOVES[kind](_ANY_SAGA, **dict(key))
    sql, params = _update_sql(queryset, values)
    return sql, params, params.index(_saga_pk(_ANY_SAGA))


def _execute(sql: str, params: list) -> int:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


def _saga_pk(saga_id):
    return Saga._meta.pk.get_db_prep_value(saga_id, connection)


def _returning(sql: str, params: list) -> Saga | None:
    """Run an UPDATE of one saga with RETURNING its columns: the row as updated, or None."""
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING {_saga_columns()}", params)
        found = cursor.fetchone()
    return None if found is None else _saga_from(found)


# What a claim returns of the saga: what the step wrapper, fault plans, tracing and
# the steps read of it. The other columns (timestamps, owner, failure, resolution)
# come back deferred: loaded on first access, one query, as ``.only()`` would. A
# claim returning and converting all of them took a third longer.
CLAIMED_FIELDS = frozenset(
    {
        "id",
        "saga_type",
        "status",
        "business_key",
        "context",
        "steps_done",
        "undo_cursor",
        "round",
        "trace_context",
    }
)


@lru_cache(maxsize=1)
def _claimed() -> tuple[str, ...]:
    """``CLAIMED_FIELDS`` in the model's order, as ``Model.from_db`` takes a subset."""
    return tuple(f.attname for f in Saga._meta.concrete_fields if f.attname in CLAIMED_FIELDS)


def _saga_columns() -> str:
    return _columns(connection.vendor, Saga, _claimed())


@lru_cache(maxsize=64)
def _columns(vendor: str, model, attnames: tuple[str, ...]) -> str:
    """The quoted column list of ``model``'s fields ``attnames``, built once per list."""
    return ", ".join(_qn(model._meta.get_field(name).column) for name in attnames)


def _saga_from(values) -> Saga:
    """A Saga from the raw values of its claimed fields, converted as a query's rows are."""
    converted = []
    for value, (column, converters) in zip(values, _converters(connection.vendor), strict=True):
        for converter in converters:
            value = converter(value, column, connection)
        converted.append(value)
    return Saga.from_db(connection.alias, _claimed(), converted)


@lru_cache(maxsize=4)
def _converters(vendor: str) -> list[tuple[Any, list]]:
    table = Saga._meta.db_table
    pairs = []
    for name in _claimed():
        field = Saga._meta.get_field(name)
        column = field.get_col(table)
        converters = connection.ops.get_db_converters(column) + field.get_db_converters(connection)
        pairs.append((column, converters))
    return pairs


def _insert_parts(row: SagaLog) -> tuple[str, str, list]:
    """Columns, placeholders and parameters that insert ``row`` from a SELECT.

    Fields left None are left out (the column's own NULL), so no untyped NULL
    meets a typed column in the SELECT list.
    """
    fields, values = [], []
    for field in SagaLog._meta.concrete_fields:
        value = None if field.primary_key else field.pre_save(row, add=True)
        if value is not None:
            fields.append(field)
            values.append(field.get_db_prep_save(value, connection))
    columns = _columns(connection.vendor, SagaLog, tuple(field.attname for field in fields))
    return columns, ", ".join(["%s"] * len(fields)), values


def _insert_from(with_clause: str, source: str, with_params: tuple, row: SagaLog) -> bool:
    """Run ``with_clause`` and insert ``row`` once per row of its ``source``; whether it was."""
    columns, selected, params = _insert_parts(row)
    with connection.cursor() as cursor:
        cursor.execute(
            f"{with_clause} INSERT INTO {_qn(SagaLog._meta.db_table)} ({columns})"  # noqa: S608
            f" SELECT {selected} FROM {source} RETURNING id",
            (*with_params, *params),
        )
        inserted = cursor.fetchone()
    if inserted is None:
        return False
    _saved(row, inserted[0])
    return True


def _saved(row: SagaLog, pk: int) -> SagaLog:
    """``row`` as saved with ``pk``: a later ``save()`` updates it."""
    row.pk = pk
    row._state.adding = False
    row._state.db = connection.alias
    return row


def _qn(name: str) -> str:
    return connection.ops.quote_name(name)
