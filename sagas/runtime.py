"""The step wrapper: runs one action or compensation under the barrier.

Every step runs in one transaction that

1. locks the saga row (``SELECT ... FOR UPDATE``) and decides from its status
   and counters whether this delivery is the first, a duplicate, or too late;
2. runs the step's effect;
3. moves the counter with a conditional UPDATE and appends the SUCCEEDED (or
   SKIPPED) SagaLog row, whose partial unique index is the barrier.

So a redelivered or concurrent copy finds the counter moved and does nothing,
an action that arrives after compensation began does nothing, and the errback's
claim (an UPDATE of the same row) waits for a running step to commit. That is
three statements of bookkeeping per step beyond the step's own writes.
"""

from __future__ import annotations

import logging
import traceback
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Coalesce
from django.utils import timezone

from sagas import faults
from sagas.definitions import RetryPolicy, SagaDefinition, Step
from sagas.errors import EffectUncertain
from sagas.models import Saga, SagaLog

logger = logging.getLogger(__name__)

ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION


class _Outcome(Exception):
    """Leaves the step transaction without an effect (rolls it back)."""

    def __init__(self, status: str, reason: str, *, continue_chain: bool) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.continue_chain = continue_chain


@dataclass
class _Attempt:
    task: Task
    definition: SagaDefinition
    index: int
    saga_id: str
    phase: str
    started: datetime

    @property
    def step(self) -> Step:
        return self.definition.steps[self.index]

    @property
    def name(self) -> str:
        return self.step.name if self.phase == ACTION else self.step.undo_name

    @property
    def number(self) -> int:
        return self.task.request.retries + 1

    def log(self, status: str, *, error: str = "", result: Any = None) -> SagaLog:
        finished = timezone.now()
        return SagaLog.objects.create(
            saga_id=self.saga_id,
            step=self.name,
            step_index=self.index,
            phase=self.phase,
            status=status,
            attempt=self.number,
            task_id=self.task.request.id or "",
            worker=self.task.request.hostname or "",
            started_at=self.started,
            finished_at=finished,
            duration_ms=elapsed_ms(self.started, finished),
            error=error,
            result=result,
        )

    def reply(self, status: str) -> dict[str, Any]:
        return {"saga_id": str(self.saga_id), "step": self.name, "outcome": status}


def elapsed_ms(start: datetime, end: datetime) -> int:
    return max(0, int((end - start).total_seconds() * 1000))


def _lock(saga_id: str) -> Saga:
    saga = Saga.objects.select_for_update().filter(pk=saga_id).first()
    if saga is None:
        raise _Outcome(SagaLog.Status.IGNORED, "saga does not exist", continue_chain=False)
    return saga


def run_action(task: Task, definition: SagaDefinition, index: int, saga_id: str) -> dict:
    attempt = _Attempt(task, definition, index, saga_id, ACTION, timezone.now())
    step = attempt.step
    last = index == len(definition.steps) - 1
    try:
        with transaction.atomic():
            saga = _lock(saga_id)
            if saga.status not in (Saga.Status.PENDING, Saga.Status.RUNNING):
                raise _Outcome(
                    SagaLog.Status.IGNORED,
                    f"saga is {saga.status}: action not run",
                    continue_chain=False,
                )
            if saga.steps_done > index:
                raise _Outcome(SagaLog.Status.DUPLICATE, "already done", continue_chain=True)
            if saga.steps_done < index:
                # A copy published out of band (a re-published message) that
                # overtook the chain: the chain itself brings this step in turn.
                raise _Outcome(
                    SagaLog.Status.IGNORED,
                    f"not due yet: {definition.steps[saga.steps_done].name} comes first",
                    continue_chain=False,
                )
            faults.before_action(saga, step.name, attempt.number)
            result = step.action(saga)
            now = timezone.now()
            started = saga.started_at or attempt.started
            moved = Saga.objects.filter(
                pk=saga_id,
                steps_done=index,
                status__in=(Saga.Status.PENDING, Saga.Status.RUNNING),
            ).update(
                steps_done=index + 1,
                current_step=step.name,
                status=Saga.Status.COMPLETED if last else Saga.Status.RUNNING,
                started_at=Coalesce(F("started_at"), now),
                finished_at=now if last else None,
                duration_ms=elapsed_ms(started, now) if last else None,
                updated_at=now,
            )
            if not moved:  # lost a race the row lock cannot prevent (SQLite)
                raise _Outcome(SagaLog.Status.DUPLICATE, "already done", continue_chain=True)
            attempt.log(SagaLog.Status.SUCCEEDED, result=result)
    except _Outcome as outcome:
        return _settle(attempt, outcome)
    except (Ignore, Retry):
        raise
    except Exception as exc:
        _fail(attempt, exc, step.retry, uncertain=isinstance(exc, step.uncertain_on))
    return attempt.reply(SagaLog.Status.SUCCEEDED)


def run_compensation(task: Task, definition: SagaDefinition, index: int, saga_id: str) -> dict:
    attempt = _Attempt(task, definition, index, saga_id, COMPENSATION, timezone.now())
    step = attempt.step
    status = SagaLog.Status.SUCCEEDED
    try:
        with transaction.atomic():
            saga = _lock(saga_id)
            if saga.status != Saga.Status.COMPENSATING:
                raise _Outcome(
                    SagaLog.Status.IGNORED,
                    f"saga is {saga.status}: compensation not run",
                    continue_chain=False,
                )
            if saga.undo_cursor <= index:
                raise _Outcome(SagaLog.Status.DUPLICATE, "already undone", continue_chain=True)
            due = definition.next_to_undo(saga.undo_cursor)
            if index != due:
                # Compensations run strictly newest first, whatever order copies arrive in.
                raise _Outcome(
                    SagaLog.Status.IGNORED,
                    f"not due yet: {definition.steps[due].undo_name} comes first",
                    continue_chain=False,
                )
            faults.before_compensation(saga, attempt.name, attempt.number)
            assert step.compensation is not None
            result = step.compensation(saga)
            if result is None:
                status = SagaLog.Status.SKIPPED
            moved = Saga.objects.filter(
                pk=saga_id, status=Saga.Status.COMPENSATING, undo_cursor__gt=index
            ).update(undo_cursor=index, current_step=attempt.name, updated_at=timezone.now())
            if not moved:
                raise _Outcome(SagaLog.Status.DUPLICATE, "already undone", continue_chain=True)
            attempt.log(status, result=result)
    except _Outcome as outcome:
        return _settle(attempt, outcome)
    except (Ignore, Retry):
        raise
    except Exception as exc:
        _fail(attempt, exc, step.compensation_retry, uncertain=False)
    return attempt.reply(status)


def _settle(attempt: _Attempt, outcome: _Outcome) -> dict:
    """Record a delivery that had nothing to do; stop the chain if the saga moved on."""
    logger.info("saga %s %s %s: %s", attempt.saga_id, attempt.name, attempt.phase, outcome.reason)
    if Saga.objects.filter(pk=attempt.saga_id).exists():
        attempt.log(outcome.status, error=outcome.reason)
    if not outcome.continue_chain:
        raise Ignore(outcome.reason)
    return attempt.reply(outcome.status)


def _fail(attempt: _Attempt, exc: Exception, policy: RetryPolicy, *, uncertain: bool) -> None:
    """Retry with backoff while the policy allows it; otherwise record and re-raise.

    Re-raising after the last retry is what makes Celery call the errback.
    """
    error = f"{type(exc).__name__}: {exc}"
    retries = attempt.task.request.retries
    if policy.retries(exc) and retries < policy.max_retries:
        countdown = policy.delay(retries)
        attempt.log(SagaLog.Status.RETRYING, error=f"{error} (retry in {countdown}s)")
        raise attempt.task.retry(exc=exc, countdown=countdown, max_retries=policy.max_retries)
    uncertain = uncertain or isinstance(exc, (SoftTimeLimitExceeded, EffectUncertain))
    status = SagaLog.Status.TIMED_OUT if uncertain else SagaLog.Status.FAILED
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    attempt.log(status, error=detail)
    raise exc
