"""A saga drawn as a graph: each step's action and compensation, read from its log.

The admin's change page and the API's feed (``GET /api/sagas/<id>/``) both
show this graph, so the states are decided once, here, from the saga row, its
type's definition and its SagaLog rows. Nothing here reads the database.

States of a cell (``TimelineCell.state``):

- actions: ``running`` (queued or in progress), ``retrying``, ``succeeded``,
  ``nothing`` (it ran and had nothing to do, e.g. a trip without a car),
  ``failed``, ``timed_out`` (may have had its effect, so it is undone too),
  ``not_reached``;
- compensations: ``pending`` (due), ``retrying``, ``undone``, ``skipped``
  (nothing to undo), ``failed``, ``not_reached``, ``idle`` (not needed).

Duplicate and out-of-turn deliveries never decide a state: they are counted
on the cell (``duplicates``) so an operator sees that they happened.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sagas.definitions import SagaDefinition
from sagas.models import Saga, SagaLog

ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION
LogStatus = SagaLog.Status
Status = Saga.Status
# Rows that say nothing about the step's own outcome.
_NOISE = (LogStatus.DUPLICATE, LogStatus.IGNORED, LogStatus.NOTE)
_DELIVERIES = (LogStatus.DUPLICATE, LogStatus.IGNORED)
_EMPTY = ([], {}, "", None)
# Every state a cell can be in (the docstring above says what each means).
CELL_STATES = (
    "running",
    "retrying",
    "succeeded",
    "nothing",
    "failed",
    "timed_out",
    "not_reached",
    "pending",
    "undone",
    "skipped",
    "idle",
)


@dataclass(frozen=True)
class TimelineCell:
    """One node of the graph: an action or a compensation of one step."""

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
    # Deliveries that were ignored: duplicates and out-of-turn copies.
    duplicates: int = 0
    # Deliveries run again because the worker running an earlier one was lost.
    redelivered: int = 0
    # It failed once, and a later attempt (an operator's retry) succeeded.
    healed: bool = False
    # The first attempt's start and the deciding attempt's end and duration.
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: int | None = None


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


def _had_nothing_to_do(result: Any) -> bool:
    """``None``, or a dict whose every value is empty (``{"held": []}``): see
    ``sagas.definitions``. Zero and False are answers, not emptiness."""
    if result is None:
        return True
    return isinstance(result, dict) and all(value in _EMPTY for value in result.values())


def _common(rows: list[SagaLog], outcomes: list[SagaLog]) -> dict[str, Any]:
    last = outcomes[-1] if outcomes else None
    return {
        "attempts": max((row.attempt for row in outcomes), default=0),
        "retries": sum(row.status == LogStatus.RETRYING for row in rows),
        "error": last.error if last is not None else "",
        "duplicates": sum(row.status in _DELIVERIES for row in rows),
        "redelivered": sum(row.status == LogStatus.LOST for row in rows),
        "started_at": outcomes[0].started_at if outcomes else None,
        "finished_at": last.finished_at if last is not None else None,
        "duration_ms": last.duration_ms if last is not None else None,
    }


def _action_cell(
    saga: Saga, index: int, name: str, rows: list[SagaLog], *, compensating: bool
) -> TimelineCell:
    outcomes = _outcome_rows(rows)
    last = outcomes[-1] if outcomes else None
    common = _common(rows, outcomes)
    done = next((row for row in outcomes if row.status in SagaLog.DONE), None)
    if done is not None and done.status == LogStatus.SUCCEEDED and _had_nothing_to_do(done.result):
        return TimelineCell(name, "nothing", "nothing to do", **common)
    if done is not None or index < saga.steps_done:
        return TimelineCell(name, "succeeded", "succeeded", **common)
    stopped_here = compensating and index == saga.steps_done
    if last is not None and last.status == LogStatus.TIMED_OUT:
        return TimelineCell(name, "timed_out", "timed out", failing=stopped_here, **common)
    if last is not None and last.status == LogStatus.FAILED:
        return TimelineCell(name, "failed", "failed", failing=stopped_here, **common)
    if last is not None and last.status == LogStatus.RETRYING and not compensating:
        label = f"failed, retrying (attempt {last.attempt + 1})"
        return TimelineCell(name, "retrying", label, **common)
    if stopped_here:
        # The errback ran but the last attempt left no final row: the worker
        # died, hit its hard time limit, or the sweeper gave up on the step.
        return TimelineCell(name, "failed", "stopped, no result", failing=True, **common)
    if saga.status in (Status.PENDING, Status.RUNNING) and index == saga.steps_done:
        if saga.status == Status.PENDING:
            return TimelineCell(name, "running", "queued", **common)
        called_out = last is not None and last.status == LogStatus.STARTED
        label = "called out, awaiting answer" if called_out else "in progress"
        return TimelineCell(name, "running", label, **common)
    label = "waiting" if saga.status in (Status.PENDING, Status.RUNNING) else "not reached"
    return TimelineCell(name, "not_reached", label, **common)


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
    last = outcomes[-1] if outcomes else None
    common = {**_common(rows, outcomes), "order": order}
    healed = any(row.status == LogStatus.FAILED for row in outcomes)
    if any(row.status == LogStatus.SUCCEEDED for row in outcomes):
        label = "undone after an operator's retry" if healed else "undone"
        return TimelineCell(name, "undone", label, healed=healed, **common)
    if any(row.status == LogStatus.SKIPPED for row in outcomes):
        label = "nothing to undo, after an operator's retry" if healed else "nothing to undo"
        return TimelineCell(name, "skipped", label, healed=healed, **common)
    active = saga.status == Status.COMPENSATING
    if last is not None and active:
        if last.status == LogStatus.RETRYING:
            label = f"failed, retrying (attempt {last.attempt + 1})"
        elif last.status == LogStatus.FAILED:
            label = "failed; retried by an operator"
        else:
            label = "in progress"
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

    ``logs`` must be in the order the database recorded them, as
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
            # An action that ran, or timed out (it may have had its effect),
            # is undone; one that never ran has nothing to undo.
            # So is one whose call went out before it failed (may_have_effect).
            uncertain = any(row.may_have_effect for row in by_key[(ACTION, step.name)])
            needed = compensating and (
                action.state in ("succeeded", "nothing", "timed_out") or uncertain or bool(rows)
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


def step_now(saga: Saga, definition: SagaDefinition) -> str:
    """What runs now: the next action while running, the compensation due while
    compensating, blank once the saga has ended (``Saga.current_step`` keeps the
    last step that moved)."""
    if saga.status in (Status.PENDING, Status.RUNNING) and saga.steps_done < len(definition.steps):
        return definition.steps[saga.steps_done].name
    if saga.status == Status.COMPENSATING:
        due = definition.next_to_undo(saga.undo_cursor)
        return definition.steps[due].undo_name if due is not None else ""
    return ""
