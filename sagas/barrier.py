"""The barrier's statements: claim a step and record it in as few round trips as it allows.

A step's bookkeeping is two statements when nothing is out of the ordinary.

A step inside our database claims its saga with one conditional
``UPDATE ... RETURNING`` (:func:`claim_action`, :func:`claim_compensation`).
It checks the status and the counter, moves the counter, locks the row until
the step's transaction ends (so a concurrent copy, or the errback's claim,
waits and then finds the row moved) and returns the row for the step to read.
The step's log row is the second statement. A claim that matches nothing
returns None; the caller then reads the row to tell a duplicate from a copy
that came too late or too early.

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

from typing import Any

from django.db import connection, transaction
from django.db.models import BooleanField, F, Func, IntegerField, QuerySet
from django.db.models.expressions import RawSQL
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
    return _update_returning(*_action_move(saga_id, index=index, step=step, last=last, ended=False))


def end_saga(saga_id, *, row: SagaLog) -> None:
    """Stamp the claimed saga's end and duration and insert its last step's ``row``.

    One statement on PostgreSQL, two elsewhere; in the step's transaction.
    """
    ends, values = Saga.objects.filter(pk=saga_id), _ended()
    if connection.vendor != "postgresql":
        ends.update(**values)
        row.save(force_insert=True)
        return
    end_sql, end_params = _update_sql(ends, values)
    _insert_from(f"WITH ended AS ({end_sql} RETURNING 1)", "ended", end_params, row)


def claim_compensation(saga_id, *, index: int, name: str, due_below: int) -> Saga | None:
    """Move the undo cursor to ``index`` if that compensation is due; the row as moved, or None.

    It is due while the cursor is above ``index`` and at most ``due_below``:
    the next step up that has a compensation of its own (or the step count),
    so compensations run strictly newest first.
    """
    return _update_returning(
        *_compensation_move(saga_id, index=index, name=name, due_below=due_below)
    )


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
    saga_columns = ", ".join(_qn(field.column) for field in Saga._meta.concrete_fields)
    # Names come from the models' meta; every value is a parameter.
    sql = (
        f"WITH s AS (SELECT {saga_columns} FROM {sagas} WHERE id = %s),"  # noqa: S608
        f" m AS (INSERT INTO {logs} ({columns}) SELECT {values} FROM s"
        " WHERE s.status IN (%s, %s) AND s.steps_done = %s AND s.context -> 'chaos' IS NULL"
        " RETURNING id)"
        " SELECT s.*, (SELECT id FROM m) AS marker_id FROM s"
    )
    runnable = [status.value for status in _RUNNABLE]
    rows = list(Saga.objects.raw(sql, [saga_id, *params, *runnable, index]))
    if not rows:
        return None, None
    saga = rows[0]
    if saga.marker_id is None:
        return saga, None
    marker.pk = saga.marker_id
    marker._state.adding = False
    marker._state.db = connection.alias
    return saga, marker


def close_call(saga_id, *, index: int, step: str, last: bool, marker: SagaLog) -> bool:
    """Move the saga past external action ``index`` and save ``marker`` (its outcome), both or none.

    False, writing nothing, if the counter was not where the action expects it.
    """
    moves, values = _action_move(saga_id, index=index, step=step, last=last, ended=last)
    fields = CLOSING_FIELDS
    if connection.vendor != "postgresql":
        with transaction.atomic():
            if not moves.update(**values):
                return False
            marker.save(update_fields=fields)
        return True
    move_sql, move_params = _update_sql(moves, values)
    closes = SagaLog.objects.filter(pk=marker.pk).filter(
        RawSQL("EXISTS (SELECT 1 FROM moved)", (), output_field=BooleanField())
    )
    close_sql, close_params = _update_sql(closes, {name: getattr(marker, name) for name in fields})
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH moved AS ({move_sql} RETURNING 1) {close_sql}", (*move_params, *close_params)
        )
        return cursor.rowcount == 1


def close_compensation_call(
    saga_id, *, index: int, name: str, due_below: int, row: SagaLog
) -> bool:
    """Move the undo cursor to external compensation ``index`` and insert ``row``, both or none."""
    moves, values = _compensation_move(saga_id, index=index, name=name, due_below=due_below)
    if connection.vendor != "postgresql":
        with transaction.atomic():
            if not moves.update(**values):
                return False
            row.save(force_insert=True)
        return True
    move_sql, move_params = _update_sql(moves, values)
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


def _update_returning(queryset: QuerySet, values: dict[str, Any]) -> Saga | None:
    sql, params = _update_sql(queryset, values)
    columns = ", ".join(_qn(field.column) for field in Saga._meta.concrete_fields)
    rows = list(Saga.objects.raw(f"{sql} RETURNING {columns}", params))
    return rows[0] if rows else None


def _insert_parts(row: SagaLog) -> tuple[str, str, list]:
    """Columns, placeholders and parameters that insert ``row`` from a SELECT.

    Fields left None are left out (the column's own NULL), so no untyped NULL
    meets a typed column in the SELECT list.
    """
    fields = [
        field
        for field in SagaLog._meta.concrete_fields
        if not field.primary_key and field.pre_save(row, add=True) is not None
    ]
    params = [field.get_db_prep_save(field.pre_save(row, add=True), connection) for field in fields]
    columns = ", ".join(_qn(field.column) for field in fields)
    return columns, ", ".join(["%s"] * len(fields)), params


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
    row.pk = inserted[0]
    row._state.adding = False
    row._state.db = connection.alias
    return True


def _qn(name: str) -> str:
    return connection.ops.quote_name(name)
