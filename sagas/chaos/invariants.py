"""The engine's own invariants (DESIGN.md section 4), checked over one run's sagas.

Whatever the saga type: every saga terminal, none FAILED, at most one
successful action and compensation per (saga, step), compensations in the
exact reverse order of the actions. The saga type's plug-in adds its domain
invariants (stock, money) with :meth:`SagaHarness.invariants`.

Each check returns an ``InvariantResult`` naming its offenders with a reason
for the first few. Saga history is read from SagaLog directly, since the
order of its rows is what is being checked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db.models import Count

from sagas.definitions import SagaDefinition, registry
from sagas.harness.plugin import InvariantResult, SagaHarness, chunks
from sagas.models import Saga, SagaLog

Status = Saga.Status


@dataclass
class RunRows:
    """What the checks read, loaded once."""

    sagas: dict[str, dict[str, Any]]
    done_logs: dict[str, list[dict[str, Any]]]  # by saga id, in (started_at, id) order

    @classmethod
    def load(cls, *, saga_ids: Iterable) -> RunRows:
        ids = [str(saga_id) for saga_id in saga_ids]
        sagas: dict[str, dict[str, Any]] = {}
        done_logs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for chunk in chunks(ids):
            for row in Saga.objects.filter(pk__in=chunk).values(
                "id", "saga_type", "status", "steps_done", "duration_ms"
            ):
                sagas[str(row["id"])] = row
            logs = (
                SagaLog.objects.filter(saga_id__in=chunk, status__in=SagaLog.DONE)
                .order_by("id")
                .values("id", "saga_id", "step", "phase", "status", "started_at")
            )
            for row in logs:
                done_logs[str(row["saga_id"])].append(row)
        return cls(sagas=sagas, done_logs=done_logs)


def check_run(
    *,
    saga_ids: Iterable,
    harness: SagaHarness | None = None,
    undispatched: int = 0,
    unsubmitted: int = 0,
) -> list[InvariantResult]:
    """The generic invariants, then the plug-in's.

    ``undispatched``: sagas the run never got to (it timed out first), a
    violation. ``unsubmitted``: sagas whose start failed (the database was
    away): the run has that many fewer sagas, which the check notes.
    """
    ids = [str(saga_id) for saga_id in saga_ids]
    rows = RunRows.load(saga_ids=ids)
    checks = [
        check_all_terminal(rows, undispatched=undispatched, unsubmitted=unsubmitted),
        check_no_failed(rows),
        check_one_success_per_step(rows),
        check_compensation_order(rows),
    ]
    if harness is not None:
        checks += harness.invariants(ids)
    return checks


def check_all_terminal(
    rows: RunRows, *, undispatched: int = 0, unsubmitted: int = 0
) -> InvariantResult:
    result = InvariantResult("all_terminal", "every saga reached COMPLETED, COMPENSATED or FAILED")
    if unsubmitted:
        result.note = (
            f"{unsubmitted} saga(s) could not be submitted (their start failed, see "
            "submit_failures) and are not part of the run"
        )
    for saga_id, saga in rows.sagas.items():
        if saga["status"] not in Saga.TERMINAL:
            result.flag(saga_id, f"still {saga['status']} after step {saga['steps_done']}")
    if undispatched:
        result.flag("(not dispatched)", f"{undispatched} saga(s) never started: timed out")
    return result


def check_no_failed(rows: RunRows) -> InvariantResult:
    result = InvariantResult(
        "no_failed",
        "no saga ended FAILED (injected compensation failures heal, by themselves or "
        "through the run's operator retries)",
    )
    for saga_id, saga in rows.sagas.items():
        if saga["status"] == Status.FAILED:
            result.flag(saga_id, "FAILED: a compensation exhausted its retries")
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
