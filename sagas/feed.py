"""The live feed: what changed since a cursor, for the admin's live pages and API clients.

Pages poll it (``GET /api/sagas/<id>/?after=<cursor>`` and
``GET /api/sagas/live/?after=<cursor>``) instead of holding a stream open:
each poll is a short request of a few indexed queries, so a few open pages
cost a web worker a few milliseconds a second, not a whole sync worker each
(see the README, "Watching a saga").

Cursors are SagaLog ids. Ids are taken at INSERT, but rows commit in any
order: a row with a smaller id can become visible after a larger one was read.

- One saga's cursor (``next_cursor``) never passes a row that finished less
  than ``SAGA_FEED_SETTLE_S`` ago: those few rows come again on the next polls
  (clients keep the latest copy of each id), and a row whose transaction commits within
  that time after it finished is never skipped.
- The fleet's cursor (``FleetCursor``) cannot hold back that way: a burst
  leaves more rows unsettled than a page holds, and the reader would fall
  behind. It carries the ids it found missing instead, and asks for them again
  until they appear or ``SAGA_FEED_SETTLE_S`` has passed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Count, Max, Q, QuerySet
from django.urls import reverse
from django.utils import timezone

from sagas.definitions import registry
from sagas.errors import UnknownSagaType
from sagas.graph import TimelineCell, saga_timeline, step_now
from sagas.models import Saga, SagaLog
from sagas.selectors import saga_log

Status = Saga.Status
LogStatus = SagaLog.Status
IN_FLIGHT = (Status.PENDING, Status.RUNNING, Status.COMPENSATING)
# A page's first poll shows this many of the latest transitions; later polls at most EVENTS_PAGE.
FIRST_EVENTS = 30
EVENTS_PAGE = 200
# Ids of uncommitted and of started rows a fleet cursor remembers (see FleetCursor),
# and how long it follows a started row for its outcome (a call's timeout, retries).
MAX_GAPS = 100
OPEN_FOLLOW_S = 300
RATE_WINDOW_S = 60
AWAITING_SHOWN = 20
# "1000+": counting every FAILED saga at a million rows is not worth a poll.
AWAITING_COUNTED = 1000


def settle_s() -> float:
    return float(settings.SAGA_FEED_SETTLE_S)


def next_cursor(rows: Sequence[SagaLog], after: int) -> int:
    """The id to read after next time: the last row read, held back behind unsettled rows
    and behind a started row (a call out whose outcome will be written into it)."""
    settled_before = timezone.now() - timedelta(seconds=settle_s())
    cursor = after
    for row in rows:
        if row.finished_at > settled_before or row.status == LogStatus.STARTED:
            break
        cursor = max(cursor, row.id)
    return cursor


# --- one saga's graph -------------------------------------------------------------------


def graph_data(saga: Saga, rows: Sequence[SagaLog]) -> dict[str, Any] | None:
    """The saga's graph as JSON-ready data (see ``sagas.graph``), or None for a saga of
    a type this deployment does not declare. Errors stay out: customers read this too."""
    definition = _definition(saga.saga_type)
    if definition is None:
        return None
    timeline = saga_timeline(saga, definition, rows)
    return {
        "status": saga.status,
        "terminal": saga.is_terminal,
        "resolved": saga.is_resolved,
        "step_now": step_now(saga, definition),
        "compensating": timeline.compensating,
        "failing_action": timeline.failing_action,
        "failing_compensation": timeline.failing_compensation,
        "notes": timeline.notes,
        "steps": [
            {
                "index": column.index,
                "action": _cell_data(column.action),
                "compensation": _cell_data(column.compensation),
                "flows_right": column.flows_right,
                "flows_left": column.flows_left,
                "turn": column.turn,
            }
            for column in timeline.columns
        ],
    }


def saga_graph_page(saga_id) -> dict[str, Any]:
    """The saga (``saga``, None if there is none) and what ``graph.html`` needs to draw it."""
    saga = Saga.objects.filter(pk=saga_id).first() if saga_id else None
    return {"saga": saga, **(graph_page_context(saga) if saga is not None else {})}


def graph_page_context(saga: Saga) -> dict[str, Any]:
    """What ``admin/sagas/saga/graph.html`` needs: the first drawing and where to follow it."""
    rows = list(saga_log(saga_id=saga.pk))
    cursor = next_cursor(rows, 0)
    return {
        "graph": graph_data(saga, rows),
        "graph_feed_url": reverse("saga-detail", args=[saga.pk]),
        "graph_cursor": cursor,
        # Rows past the cursor that the page already lists (in its log): the first
        # poll sends them again, and the page shows them only if they changed.
        "graph_seen": " ".join(f"{row.id}:{row.status}" for row in rows if row.id > cursor),
        "graph_follow": not saga.is_terminal,
    }


def _cell_data(cell: TimelineCell | None) -> dict[str, Any] | None:
    if cell is None:
        return None
    data = {name: value for name, value in cell.__dict__.items() if name != "error"}
    for name in ("started_at", "finished_at"):
        data[name] = data[name].isoformat() if data[name] is not None else None
    return data


# --- the transitions stream -----------------------------------------------------------


# What a log row means for its saga (``_kind``), as the live feed names it.
KINDS = (
    "started",
    "step_done",
    "called_out",
    "retrying",
    "completed",
    "compensating",
    "undone",
    "compensated",
    "failed",
    "ignored",
    "redelivered",
    "operator",
)


def step_running(saga: Saga) -> str:
    """The action or compensation running now (``sagas.graph.step_now``); "" when none is,
    or the saga's type is not declared here."""
    definition = _definition(saga.saga_type)
    return step_now(saga, definition) if definition is not None else ""


def _definition(saga_type: str):
    try:
        return registry.get(saga_type)
    except UnknownSagaType:
        return None


def _kind(row: SagaLog) -> str:
    """What a log row means for its saga, in an operator's words."""
    if row.phase == SagaLog.Phase.OPERATOR:
        return "operator"
    if row.status in (LogStatus.DUPLICATE, LogStatus.IGNORED):
        return "ignored"
    if row.status == LogStatus.LOST:
        return "redelivered"
    if row.status == LogStatus.STARTED:
        return "called_out"
    action = row.phase == SagaLog.Phase.ACTION
    if row.status == LogStatus.RETRYING or (not action and row.status == LogStatus.TIMED_OUT):
        return "retrying"
    definition = _definition(row.saga.saga_type)
    if action:
        if row.status in (LogStatus.FAILED, LogStatus.TIMED_OUT):
            return "compensating"
        if definition is not None and row.step_index == len(definition.steps) - 1:
            return "completed"
        return "started" if row.step_index == 0 else "step_done"
    if row.status == LogStatus.FAILED:
        return "failed"
    if definition is not None and definition.next_to_undo(row.step_index) is None:
        return "compensated"
    return "undone"


_FLEET_CURSOR = re.compile(rf"(\d{{1,18}})((?:[~!]\d{{1,18}}\.\d{{1,12}}){{0,{MAX_GAPS}}})")
_CURSOR_PART = re.compile(r"([~!])(\d+)\.(\d+)")


@dataclass(frozen=True)
class FleetCursor:
    """Where a reader of the fleet's transitions is.

    - ``high``: every id up to it was read,
    - ``gaps``: except these ids, not visible then (their transactions had not
      committed yet),
    - ``opens``: and these rows were read as ``started`` (a call out to another
      system); the call's outcome is written into the same row later.

    Each with when it was first noted (Unix seconds). Written ``<high>``, then
    ``~<id>.<seconds>`` per gap and ``!<id>.<seconds>`` per open row, e.g.
    ``812~809.1764677000!805.1764676990``.
    """

    high: int
    gaps: tuple[tuple[int, int], ...] = ()
    opens: tuple[tuple[int, int], ...] = ()

    @classmethod
    def parse(cls, text: str) -> FleetCursor:
        match = _FLEET_CURSOR.fullmatch(text)
        if match is None:
            raise ValueError(
                "must be the cursor of an earlier answer (digits, then at most "
                f"{MAX_GAPS} '~<id>.<seconds>' or '!<id>.<seconds>' parts)"
            )
        parts = _CURSOR_PART.findall(match.group(2))
        return cls(
            int(match.group(1)),
            tuple((int(i), int(t)) for mark, i, t in parts if mark == "~"),
            tuple((int(i), int(t)) for mark, i, t in parts if mark == "!"),
        )

    def __str__(self) -> str:
        return (
            str(self.high)
            + "".join(f"~{gap}.{seen}" for gap, seen in self.gaps)
            + "".join(f"!{row}.{seen}" for row, seen in self.opens)
        )


def _missing(after: int, present: list[int]) -> list[int]:
    """Ids between ``after`` and the last of ``present`` (ascending) that are not in it,
    at most MAX_GAPS before each present id: a longer run was never going to commit."""
    missing: list[int] = []
    previous = after
    for row_id in present:
        missing.extend(range(max(previous + 1, row_id - MAX_GAPS), row_id))
        previous = row_id
    return missing


def transitions(*, owner, after: FleetCursor | None) -> tuple[list[dict[str, Any]], FleetCursor]:
    """The log rows after the cursor, oldest first, and the next cursor: of every
    saga, or of the sagas that act for ``owner``.

    Each poll reads the next ids of the whole table (at most EVENTS_PAGE, by the
    primary key) and the gaps of the last poll, so the cursor always moves on
    past other owners' rows and a burst never holds it back; a row that commits
    after a newer one was read comes as soon as it is visible, once. A gap not
    filled within ``SAGA_FEED_SETTLE_S`` is dropped (its transaction rolled back).

    Without a cursor: the latest few rows, so a page opens on recent history.
    """
    rows = SagaLog.objects.select_related("saga").only(
        "id",
        "step",
        "step_index",
        "phase",
        "status",
        "attempt",
        "finished_at",
        "duration_ms",
        "saga__id",
        "saga__saga_type",
        "saga__status",
    )
    if owner is not None:
        rows = rows.filter(saga__owner=owner)
    if after is None:
        high = SagaLog.objects.aggregate(high=Max("id"))["high"] or 0
        if owner is not None:
            # The owner's latest sagas by their index, not a walk back through every row.
            latest = Saga.objects.filter(owner=owner).order_by("-created_at")[:FIRST_EVENTS]
            rows = rows.filter(saga__in=latest)
        batch = list(rows.filter(id__lte=high).order_by("-id")[:FIRST_EVENTS])[::-1]
        # Ids just below the newest that are not visible yet may still commit: follow them.
        recent = list(
            SagaLog.objects.filter(id__gt=high - MAX_GAPS, id__lte=high).values_list(
                "id", flat=True
            )
        )
        now = int(time.time())
        gaps = tuple((gap, now) for gap in _missing(max(high - MAX_GAPS, 0), sorted(recent)))
        opens = tuple((row.id, now) for row in batch if row.status == LogStatus.STARTED)
        return _events(batch), FleetCursor(high, gaps, opens)

    now = int(time.time())
    old_gaps = dict(after.gaps)
    old_opens = dict(after.opens)
    ids = list(
        SagaLog.objects.filter(Q(id__gt=after.high) | Q(id__in=old_gaps))
        .order_by("id")
        .values_list("id", flat=True)[: EVENTS_PAGE + len(old_gaps)]
    )
    filled = [row_id for row_id in ids if row_id in old_gaps]
    ahead = [row_id for row_id in ids if row_id > after.high][:EVENTS_PAGE]
    wanted = filled + ahead + list(old_opens)
    batch = list(rows.filter(id__in=wanted).order_by("id")) if wanted else []
    # A row read as started comes again once its outcome is written into it.
    still_open = {
        row.id for row in batch if row.id in old_opens and row.status == LogStatus.STARTED
    }
    fresh = [row for row in batch if row.id not in still_open]
    settle = settle_s()
    gaps = [
        (gap, seen) for gap, seen in after.gaps if gap not in filled and now - seen <= settle
    ] + [(gap, now) for gap in _missing(after.high, ahead)]
    opens = [
        (row_id, seen)
        for row_id, seen in after.opens
        if row_id in still_open and now - seen <= OPEN_FOLLOW_S
    ] + [
        (row.id, now)
        for row in fresh
        if row.status == LogStatus.STARTED and row.id not in old_opens
    ]
    room = max(MAX_GAPS - len(opens), 0)
    cursor = FleetCursor(
        ahead[-1] if ahead else after.high,
        tuple(gaps[-room:] if room else ()),
        tuple(opens[-MAX_GAPS:]),
    )
    return _events(fresh), cursor


def _events(batch: list[SagaLog]) -> list[dict[str, Any]]:
    return [
        {
            "id": row.id,
            "saga_id": row.saga.id,
            "saga_type": row.saga.saga_type,
            "saga_status": row.saga.status,
            "step": row.step,
            "phase": row.phase,
            "status": row.status,
            "attempt": row.attempt,
            "kind": _kind(row),
            "at": row.finished_at,
            "duration_ms": row.duration_ms,
        }
        for row in batch
    ]


# --- the fleet now -------------------------------------------------------------------


def in_flight(sagas: QuerySet[Saga]) -> list[dict[str, Any]]:
    """Sagas not yet ended, by type, status and the step running now."""
    counts: dict[tuple[str, str, str], int] = {}
    grouped = (
        sagas.filter(status__in=IN_FLIGHT)
        .order_by()
        .values_list("saga_type", "status", "steps_done", "undo_cursor")
        .annotate(n=Count("*"))
    )
    for saga_type, status, steps_done, undo_cursor, n in grouped:
        step = step_running(
            Saga(saga_type=saga_type, status=status, steps_done=steps_done, undo_cursor=undo_cursor)
        )
        key = (saga_type, status, step)
        counts[key] = counts.get(key, 0) + n
    return [
        {"saga_type": saga_type, "status": status, "step": step, "count": n}
        for (saga_type, status, step), n in sorted(counts.items())
    ]


def rates(sagas: QuerySet[Saga]) -> dict[str, dict[str, int]]:
    """Sagas started and ended in the last minute, by type (indexed range reads only)."""
    since = timezone.now() - timedelta(seconds=RATE_WINDOW_S)
    names = registry.names()
    by_type = {name: _no_rates() for name in names}
    started = (
        sagas.filter(created_at__gte=since)
        .order_by()
        .values_list("saga_type")
        .annotate(n=Count("*"))
    )
    for saga_type, n in started:
        by_type.setdefault(saga_type, _no_rates())
        by_type[saga_type]["started"] = n
    # saga_type_finished (saga_type, finished_at) answers this per registered type.
    ended = (
        sagas.filter(saga_type__in=names, finished_at__gte=since)
        .order_by()
        .values_list("saga_type", "status")
        .annotate(n=Count("*"))
    )
    for saga_type, status, n in ended:
        if status in _ENDED:
            by_type[saga_type][_ENDED[status]] = n
    return by_type


_ENDED = {
    Status.COMPLETED: "completed",
    Status.COMPENSATED: "compensated",
    Status.FAILED: "failed",
}


def _no_rates() -> dict[str, int]:
    return dict.fromkeys(("started", *_ENDED.values()), 0)


def awaiting_operator(sagas: QuerySet[Saga]) -> tuple[list[Saga], int]:
    """The newest FAILED sagas no operator has settled, and how many there are (capped)."""
    failed = sagas.filter(status=Status.FAILED, resolved_at__isnull=True).order_by("-created_at")
    shown = list(failed[:AWAITING_SHOWN])
    count = len(shown) if len(shown) < AWAITING_SHOWN else failed[: AWAITING_COUNTED + 1].count()
    return shown, count
