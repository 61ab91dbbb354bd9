"""Reads behind the saga admin: cheap counts, human durations and the step timeline.

Kept out of ``admin.py`` so the timeline can be tested without a request and
reused by anything else that shows a saga to a person.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Model, QuerySet
from django.utils.functional import cached_property

from sagas.definitions import SagaDefinition
from sagas.models import Saga, SagaLog

# Below this many rows an exact COUNT(*) is cheap, and a planner estimate of a
# freshly created or recently emptied table can be far off.
EXACT_COUNT_BELOW = 10_000


def estimated_row_count(model: type[Model], *, using: str) -> int | None:
    """The PostgreSQL planner's row estimate for the model's table, or None.

    None on other databases, and when the table was never vacuumed or analysed
    (``reltuples`` is -1 then).
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            [connection.ops.quote_name(model._meta.db_table)],
        )
        row = cursor.fetchone()
    if row is None or row[0] is None or row[0] < 0:
        return None
    return int(row[0])


class EstimatedCountPaginator(Paginator):
    """Counts an unfiltered table from the planner's estimate instead of COUNT(*).

    COUNT(*) over millions of rows reads the whole table (or index) on every
    page view. A filtered queryset is counted exactly: its filters are indexed
    and the operator wants the real number of, say, FAILED sagas.
    """

    estimated = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and not queryset.query.where:
            estimate = estimated_row_count(queryset.model, using=queryset.db)
            if estimate is not None and estimate >= EXACT_COUNT_BELOW:
                self.estimated = True
                return estimate
        return super().count


def humanize_ms(ms: int | None) -> str:
    """850 ms, 2.4 s, 3 min 12 s, 2 h 5 min, 1 d 3 h; an em dash when unknown."""
    if ms is None:
        return "\u2014"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


# --- timeline -----------------------------------------------------------------

ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION
LogStatus = SagaLog.Status
Status = Saga.Status
# Rows that say nothing about the step's own outcome.
_NOISE = (LogStatus.DUPLICATE, LogStatus.IGNORED, LogStatus.NOTE)


@dataclass(frozen=True)
class TimelineCell:
    """One box of the timeline: an action or a compensation of one step."""

    name: str
    state: str
    label: str
    attempts: int = 0
    retries: int = 0
    error: str = ""
    # The action that made the saga compensate, or the compensation that made it FAILED.
    failing: bool = False
    # 1-based order in which the compensations ran (0: did not run).
    order: int = 0


@dataclass(frozen=True)
class TimelineColumn:
    index: int
    action: TimelineCell
    # None: the step has nothing to undo (no compensation declared).
    compensation: TimelineCell | None
    # The forward flow reached this step from the previous one.
    flows_right: bool = False
    # The compensation flow passed from this step back to the previous one.
    flows_left: bool = False
    # Compensation turned back here.
    turn: bool = False


@dataclass(frozen=True)
class Timeline:
    columns: list[TimelineColumn]
    # Whether the compensation lane is drawn (the saga compensated, or tried to).
    compensating: bool
    failing_action: str
    failing_compensation: str
    notes: int


def _outcome_rows(rows: list[SagaLog]) -> list[SagaLog]:
    return [row for row in rows if row.status not in _NOISE]


def _action_cell(
    saga: Saga, index: int, name: str, rows: list[SagaLog], *, compensating: bool
) -> TimelineCell:
    outcomes = _outcome_rows(rows)
    retries = sum(row.status == LogStatus.RETRYING for row in rows)
    attempts = max((row.attempt for row in outcomes), default=0)
    last = outcomes[-1] if outcomes else None
    error = last.error if last is not None else ""
    common = {"attempts": attempts, "retries": retries, "error": error}
    if index < saga.steps_done or any(row.status in SagaLog.DONE for row in outcomes):
        return TimelineCell(name, "succeeded", "succeeded", **common)
    stopped_here = compensating and index == saga.steps_done
    if last is not None and last.status == LogStatus.TIMED_OUT:
        return TimelineCell(name, "failed", "timed out", failing=stopped_here, **common)
    if last is not None and last.status == LogStatus.FAILED:
        return TimelineCell(name, "failed", "failed", failing=stopped_here, **common)
    if last is not None and last.status == LogStatus.RETRYING and not compensating:
        return TimelineCell(name, "retrying", "failed, retrying", **common)
    if stopped_here:
        # The errback ran but the last attempt left no final row: the worker
        # died, hit its hard time limit, or the sweeper gave up on the step.
        return TimelineCell(name, "failed", "stopped, no result", failing=True, **common)
    if saga.status in (Status.PENDING, Status.RUNNING) and index == saga.steps_done:
        label = "queued" if saga.status == Status.PENDING else "in progress"
        return TimelineCell(name, "running", label, **common)
    return TimelineCell(name, "not_reached", "not reached", **common)


def _compensation_cell(
    saga: Saga,
    index: int,
    name: str,
    rows: list[SagaLog],
    *,
    needed: bool,
    order: int,
    failing: bool,
) -> TimelineCell:
    outcomes = _outcome_rows(rows)
    retries = sum(row.status == LogStatus.RETRYING for row in rows)
    attempts = max((row.attempt for row in outcomes), default=0)
    last = outcomes[-1] if outcomes else None
    common = {
        "attempts": attempts,
        "retries": retries,
        "error": last.error if last is not None else "",
        "order": order,
    }
    if any(row.status == LogStatus.SUCCEEDED for row in outcomes):
        return TimelineCell(name, "undone", "undone", **common)
    if any(row.status == LogStatus.SKIPPED for row in outcomes):
        return TimelineCell(name, "skipped", "nothing to undo", **common)
    active = saga.status == Status.COMPENSATING
    if last is not None and active:
        label = "failed, retrying" if last.status == LogStatus.RETRYING else "retried"
        return TimelineCell(name, "retrying", label, **common)
    if last is not None:
        return TimelineCell(name, "failed", "failed", failing=failing, **common)
    if active and needed and index < saga.undo_cursor:
        return TimelineCell(name, "pending", "to undo", **common)
    if needed:
        return TimelineCell(name, "not_reached", "not reached", **common)
    return TimelineCell(name, "idle", "not needed", **common)


def saga_timeline(saga: Saga, definition: SagaDefinition, logs: Iterable[SagaLog]) -> Timeline:
    """Each step's action and compensation outcome, read from the saga's log rows.

    ``logs`` must be in time order (``started_at``, ``id``), as
    ``sagas.selectors.saga_log`` returns them.
    """
    by_key: dict[tuple[str, str], list[SagaLog]] = defaultdict(list)
    compensation_order: list[str] = []
    # The compensation whose exhausted retries made the saga FAILED is the
    # last one that did not finish.
    last_unfinished = ""
    notes = 0
    for row in logs:
        if row.phase == SagaLog.Phase.OPERATOR:
            notes += 1
            continue
        by_key[(row.phase, row.step)].append(row)
        if row.phase == COMPENSATION and row.step not in compensation_order:
            compensation_order.append(row.step)
        if row.phase == COMPENSATION and row.status not in (*SagaLog.DONE, *_NOISE):
            last_unfinished = row.step

    undoing = (Status.COMPENSATING, Status.COMPENSATED, Status.FAILED)
    compensating = saga.status in undoing or bool(compensation_order)
    cells: list[tuple[TimelineCell, TimelineCell | None]] = []
    for index, step in enumerate(definition.steps):
        action = _action_cell(
            saga, index, step.name, by_key[(ACTION, step.name)], compensating=compensating
        )
        compensation = None
        if step.compensation is not None:
            rows = by_key[(COMPENSATION, step.undo_name)]
            # An action that succeeded, or timed out (it may have had its
            # effect), is undone; one that never ran has nothing to undo.
            needed = compensating and (
                action.state == "succeeded" or bool(rows) or action.label == "timed out"
            )
            order = (
                compensation_order.index(step.undo_name) + 1
                if step.undo_name in compensation_order
                else 0
            )
            compensation = _compensation_cell(
                saga,
                index,
                step.undo_name,
                rows,
                needed=needed,
                order=order,
                failing=saga.status == Status.FAILED and step.undo_name == last_unfinished,
            )
        cells.append((action, compensation))

    def undoes(cell: TimelineCell | None) -> bool:
        return cell is not None and cell.state != "idle"

    turn = -1
    if compensating:
        turn = next(
            (i for i, (action, _) in enumerate(cells) if action.failing),
            max((i for i, (_, comp) in enumerate(cells) if undoes(comp)), default=-1),
        )
    columns = [
        TimelineColumn(
            index,
            action,
            compensation,
            flows_right=index > 0 and action.state != "not_reached",
            flows_left=0 < index <= turn and undoes(cells[index - 1][1]),
            turn=index == turn,
        )
        for index, (action, compensation) in enumerate(cells)
    ]
    failing_action = next((c.action.name for c in columns if c.action.failing), "")
    failing_compensation = next(
        (c.compensation.name for c in columns if c.compensation and c.compensation.failing), ""
    )
    return Timeline(columns, compensating, failing_action, failing_compensation, notes)


class ReadOnlyAdminMixin:
    """Admin pages that show history: nothing can be added, changed or deleted."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
