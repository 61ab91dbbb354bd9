"""SQL statements per saga step, counted through the real step wrapper.

One saga of the benched type runs in this process, step by step, through
``sagas.runtime.run_action`` / ``run_compensation`` (what the worker's task
calls) with a stand-in for the Celery task. ``connection.execute_wrapper``
sees every statement; a statement that names ``sagas_saga`` or
``sagas_sagalog`` is bookkeeping, one that names a
``django_celery_results`` table is the result backend, everything else
(the step's services, their savepoints included) is domain work.

Each step runs in autocommit mode as in a worker, so the wrapper's
transaction is the outermost one: BEGIN and COMMIT are the transaction, not
work, and are not counted on either side (SQLite's BEGIN IMMEDIATE reaches
the wrapper and is left out).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from celery import current_app
from celery.app.task import Context
from django.db import connection, transaction
from django.utils import timezone
from django_celery_results.models import TaskResult

from sagas.errors import ChaosFailure
from sagas.harness.plugin import SagaHarness
from sagas.models import Saga
from sagas.runtime import run_action, run_compensation
from sagas.services import saga_begin_compensation, saga_finish_compensation

BOOKKEEPING = "bookkeeping"
DOMAIN = "domain"
RESULT_BACKEND = "result_backend"
# SQLite's BEGIN IMMEDIATE goes through the cursor; PostgreSQL's BEGIN does not.
# Either way it is the transaction, not work: left out of every count.
TRANSACTION = "transaction"

_SAGA_TABLES = re.compile(r"\bsagas_saga(?:log)?\b", re.IGNORECASE)
_RESULT_TABLES = re.compile(r"\bdjango_celery_results_\w+", re.IGNORECASE)
_BEGIN = re.compile(r"^\s*BEGIN\b", re.IGNORECASE)
_SAVEPOINT = re.compile(r"^\s*(?:RELEASE\s+|ROLLBACK\s+TO\s+)?SAVEPOINT\b", re.IGNORECASE)


def classify(sql: str) -> str:
    if _BEGIN.match(sql):
        return TRANSACTION
    if _SAGA_TABLES.search(sql):
        return BOOKKEEPING
    if _RESULT_TABLES.search(sql):
        return RESULT_BACKEND
    return DOMAIN


def is_savepoint(sql: str) -> bool:
    return bool(_SAVEPOINT.match(sql))


@dataclass
class StatementCounter:
    """An ``execute_wrapper`` that records every statement with its category."""

    statements: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, execute: Callable, sql: str, params: Any, many: bool, context: dict):
        self.statements.append((classify(sql), sql))
        return execute(sql, params, many, context)

    def count(self, category: str | None = None, *, savepoints: bool = True) -> int:
        return sum(
            1
            for kind, sql in self.statements
            if kind != TRANSACTION
            and (category is None or kind == category)
            and (savepoints or not is_savepoint(sql))
        )

    def summary(self, *, savepoints: bool = True) -> dict[str, int]:
        return {
            "total": self.count(savepoints=savepoints),
            BOOKKEEPING: self.count(BOOKKEEPING),
            DOMAIN: self.count(DOMAIN, savepoints=savepoints),
            RESULT_BACKEND: self.count(RESULT_BACKEND),
        }

    def listing(self, width: int = 110) -> list[str]:
        return [f"{kind}: {' '.join(sql.split())[:width]}" for kind, sql in self.statements]


@contextmanager
def counting() -> Iterator[StatementCounter]:
    counter = StatementCounter()
    with connection.execute_wrapper(counter):
        yield counter


class StandInTask:
    """What the step wrapper reads from a bound Celery task: ``request`` and ``retry``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.request = SimpleNamespace(retries=0, id=str(uuid.uuid4()), hostname="bench@sql-count")

    def retry(self, **_kwargs: Any):
        raise AssertionError(f"{self.name}: the SQL count expects no retries")


def _unpublished(harness: SagaHarness, index: int, chaos: dict | None = None) -> str:
    saga_id = harness.start_unpublished(index, chaos=chaos)
    harness.saga_ids.append(saga_id)
    return saga_id


def _step_row(phase: str, name: str, counter: StatementCounter) -> dict[str, Any]:
    return {"phase": phase, "step": name, **counter.summary(), "statements": counter.listing()}


def _average(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("total", BOOKKEEPING, DOMAIN)
    return {key: round(sum(row[key] for row in rows) / len(rows), 2) for key in keys}


def result_backend_writes(task_name: str, kwargs: dict[str, Any]) -> StatementCounter:
    """What storing one task's SUCCESS costs, as the worker stores it (result_extended)."""
    task_id = str(uuid.uuid4())
    request = Context(
        id=task_id,
        task=task_name,
        args=[],
        kwargs=kwargs,
        argsrepr="()",
        kwargsrepr=repr(kwargs),
        hostname="bench@sql-count",
        delivery_info={},
        chord=None,
    )
    with counting() as counter:
        current_app.backend.mark_as_done(task_id, {"outcome": "succeeded"}, request=request)
    TaskResult.objects.filter(task_id=task_id).delete()
    return counter


def count_sql(harness: SagaHarness, *, offset: int = 0) -> dict[str, Any]:
    """Run one saga to COMPLETED, one to COMPENSATED and one bare chain, counting SQL.

    Uses the plug-in's sagas ``offset`` to ``offset + 2``.
    """
    definition = harness.definition
    steps: list[dict[str, Any]] = []

    saga_id = _unpublished(harness, offset)
    actions = []
    for index, step in enumerate(definition.steps):
        with counting() as counter:
            run_action(StandInTask(step.name), definition, index, saga_id)
        actions.append(_step_row("action", step.name, counter))
    status = Saga.objects.filter(pk=saga_id).values_list("status", flat=True).get()
    if status != Saga.Status.COMPLETED:
        raise AssertionError(f"the counted saga ended {status}, not COMPLETED")

    # The same saga failing at its last step: count the compensations.
    saga_id = _unpublished(harness, offset + 1, chaos={"fail": [definition.steps[-1].name]})
    for index in range(len(definition.steps) - 1):
        run_action(StandInTask(definition.steps[index].name), definition, index, saga_id)
    last = len(definition.steps) - 1
    # The injected failure is the point: the wrapper logs it and re-raises.
    with counting() as failed_action, suppress(ChaosFailure):
        run_action(StandInTask(definition.steps[last].name), definition, last, saga_id)
    # The errback's statements, rolled back so that its compensation chain is
    # never published (this process runs the compensations itself); the
    # savepoint that rollback needs is left out of its count.
    with counting() as errback, transaction.atomic():
        saga_begin_compensation(saga_id=saga_id, failed_task_id="bench-sql-count")
        transaction.set_rollback(True)
    undo = Saga.objects.filter(pk=saga_id)
    undo.update(status=Saga.Status.COMPENSATING, undo_cursor=last, updated_at=timezone.now())
    compensations = []
    for index in reversed(range(last)):
        step = definition.steps[index]
        if step.compensation is None:
            continue
        with counting() as counter:
            run_compensation(StandInTask(step.undo_name), definition, index, saga_id)
        compensations.append(_step_row("compensation", step.undo_name, counter))
    with counting() as finish:
        saga_finish_compensation(saga_id=saga_id)
    if undo.values_list("status", flat=True).get() != Saga.Status.COMPENSATED:
        raise AssertionError("the counted compensation did not end COMPENSATED")

    # The bare chain's steps: the same domain work without the saga.
    bare_steps = []
    if harness.has_bare_chain:
        for name, run in harness.bare_steps(offset + 2):
            with counting() as counter:
                run()
            bare_steps.append(_step_row("bare", name, counter))

    result = result_backend_writes(definition.action_task_name(0), {"saga_id": saga_id})
    steps = actions + compensations + bare_steps
    external = {step.name for step in definition.steps if step.external} | {
        step.undo_name for step in definition.steps if step.external
    }
    inside = [row for row in actions + compensations if row["step"] not in external]
    outside = [row for row in actions if row["step"] in external]
    # Steps inside our database: lock, move the counter, write the log row.
    bookkeeping_max = max(row[BOOKKEEPING] for row in inside or actions + compensations)
    counted = actions + compensations
    return {
        "action": _average(actions),
        "compensation": _average(compensations),
        # Every counted action and compensation, external ones included.
        "bookkeeping_per_step_mean": round(
            sum(row[BOOKKEEPING] for row in counted) / len(counted), 2
        ),
        "bookkeeping_per_step_max": bookkeeping_max,
        # An external action (a gateway call) also writes its in-flight row
        # before the call: read, mark, move the counter, close the mark.
        "bookkeeping_external_action_max": (
            max(row[BOOKKEEPING] for row in outside) if outside else None
        ),
        "bare_action": _average(bare_steps) if bare_steps else None,
        "result_backend_per_task": result.count(),
        "saga_level": {
            "failed_action": failed_action.summary(),
            "errback": errback.summary(savepoints=False),
            "finish_compensation": finish.summary(),
        },
        "steps": steps,
        "result_backend_statements": result.listing(),
    }


def time_steps(harness: SagaHarness, *, sagas: int, offset: int) -> dict[str, Any]:
    """Milliseconds the step bodies take in one process, commits included, Celery left out.

    The saga's steps through the step wrapper, and the bare chain's: what a
    worker process spends in the database per saga, whatever the broker adds.
    """
    definition = harness.definition
    saga_ms = [0.0] * len(definition.steps)
    bare_ms: list[float] = []
    bare_names: list[str] = []
    for n in range(sagas):
        saga_id = _unpublished(harness, offset + 2 * n)
        for index, step in enumerate(definition.steps):
            start = time.perf_counter()
            run_action(StandInTask(step.name), definition, index, saga_id)
            saga_ms[index] += (time.perf_counter() - start) * 1000
        if not harness.has_bare_chain:
            continue
        bare_steps = harness.bare_steps(offset + 2 * n + 1)
        bare_names = [name for name, _run in bare_steps]
        bare_ms = bare_ms or [0.0] * len(bare_steps)
        for index, (_name, run) in enumerate(bare_steps):
            start = time.perf_counter()
            run()
            bare_ms[index] += (time.perf_counter() - start) * 1000

    def per_saga(totals: list[float], names: list[str]) -> dict[str, Any]:
        steps = {name: round(total / sagas, 2) for name, total in zip(names, totals, strict=True)}
        return {"per_saga": round(sum(totals) / sagas, 1), "per_step": steps}

    return {
        "sagas": sagas,
        "saga": per_saga(saga_ms, definition.action_names),
        "bare": per_saga(bare_ms, bare_names) if bare_names else None,
    }
