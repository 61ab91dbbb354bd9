"""The step wrapper: runs one action or compensation under the barrier.

A step that stays inside our database runs in one transaction that

1. claims the saga with one conditional ``UPDATE ... RETURNING``
   (``sagas.barrier``): it checks the status and counter, moves the counter
   and keeps the row locked until the step commits, so a redelivered or
   concurrent copy waits and then finds the counter moved, an action that
   arrives after compensation began finds the status changed, and the
   errback's claim (an UPDATE of the same row) waits for a running step;
2. runs the step's effect;
3. appends the SUCCEEDED (or SKIPPED) SagaLog row, whose partial unique
   index backs the barrier.

That is two statements of bookkeeping per step beyond the step's own writes.
A claim that matches nothing reads the row (under its lock) to say why:
already done, not due yet, or too late.

An *external* step (``Step(external=True)``: a call to another company's
system, such as the payment gateway) must not hold a transaction or the saga
row while that call is out, so it runs in three parts: the same checks on a
plain read, with its in-flight STARTED row written if the step is due; the
effect, with no transaction open (the call carries an idempotency key, so two
copies running at once are harmless); then the conditional move of the
counter, which closes the STARTED row with the outcome. On PostgreSQL the
first and last parts are one statement each. A copy that finds the saga
compensated while its own effect (or an earlier copy's) may have landed
undoes it at once, through the step's compensation, if no compensation of
the saga is still going to.
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from sagas import barrier, faults, tracing
from sagas.definitions import RetryPolicy, SagaDefinition, Step
from sagas.errors import EffectUncertain, PoisonMessage, database_unavailable
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

    @property
    def outages(self) -> int:
        """Retries spent waiting out the database (they do not count against the policy)."""
        return int((getattr(self.task.request, "kwargs", None) or {}).get("outages", 0) or 0)

    @property
    def first_delivery(self) -> bool:
        return self.number == 1 and not self.redelivered

    round: int = 0
    # An external step's call went out: whatever fails after that may have had
    # an effect (a refund loop that failed halfway, a record that failed after
    # the gateway acted), and is undone to be safe.
    called_out: bool = False
    # Undoing what a late copy left behind: retried on the compensation's budget.
    undoing: bool = False
    # The STARTED row written before an external call; the attempt's outcome
    # overwrites it, so a row left STARTED is a call that may still land.
    marker: SagaLog | None = None
    # Its log context and span (sagas.tracing); the span starts once the saga row is loaded.
    trace: tracing.Attempt | None = None

    def joined(self, saga: Saga) -> Saga:
        """``saga``, this attempt's span started under its saga span (tracing on)."""
        if self.trace is not None:
            self.trace.join(saga)
        return saga

    @property
    def redelivered(self) -> bool:
        """An earlier delivery of this very message was lost with its worker, maybe mid-effect."""
        delivery = getattr(self.task.request, "delivery_info", None) or {}
        return bool(delivery.get("redelivered"))

    @property
    def last(self) -> bool:
        return self.index == len(self.definition.steps) - 1

    def mark_started(self) -> None:
        """Record, before an external call goes out, that its effect may land from now on."""
        self.marker = self.log(SagaLog.Status.STARTED, may_have_effect=True)

    def row(
        self, status: str, *, error: str = "", result: Any = None, may_have_effect: bool = False
    ) -> SagaLog:
        """This attempt's log row with ``status``, not saved: the open marker if there is one."""
        finished = timezone.now()
        if self.trace is not None:
            self.trace.outcome = status
        if self.marker is not None:
            # Kept, not dropped: if the transaction that closed it rolls back,
            # the outcome that follows closes the same row again.
            row = self.marker
            row.status, row.error, row.result = status, error, result
            row.may_have_effect = may_have_effect
            row.finished_at, row.duration_ms = finished, elapsed_ms(self.started, finished)
            return row
        return SagaLog(
            saga_id=self.saga_id,
            step=self.name,
            step_index=self.index,
            phase=self.phase,
            status=status,
            attempt=self.number,
            round=self.round,
            may_have_effect=may_have_effect,
            task_id=self.task.request.id or "",
            worker=self.task.request.hostname or "",
            started_at=self.started,
            finished_at=finished,
            duration_ms=elapsed_ms(self.started, finished),
            error=error,
            result=result,
        )

    def log(
        self, status: str, *, error: str = "", result: Any = None, may_have_effect: bool = False
    ) -> SagaLog:
        """Write this attempt's log row (close the open marker, if any) with ``status``."""
        row = self.row(status, error=error, result=result, may_have_effect=may_have_effect)
        if row is self.marker:
            row.save(update_fields=barrier.CLOSING_FIELDS)
        else:
            barrier.insert_log(row)
        return row

    def reply(self, status: str) -> dict[str, Any]:
        return {"saga_id": str(self.saga_id), "step": self.name, "outcome": status}


def elapsed_ms(start: datetime, end: datetime) -> int:
    return max(0, int((end - start).total_seconds() * 1000))


def _lock(saga_id: str) -> Saga:
    saga = Saga.objects.select_for_update().filter(pk=saga_id).first()
    if saga is None:
        raise _Outcome(SagaLog.Status.IGNORED, "saga does not exist", continue_chain=False)
    return saga


def _read(saga_id: str) -> Saga:
    saga = Saga.objects.filter(pk=saga_id).first()
    if saga is None:
        raise _Outcome(SagaLog.Status.IGNORED, "saga does not exist", continue_chain=False)
    return saga


def run_action(task: Task, definition: SagaDefinition, index: int, saga_id: str) -> dict:
    attempt = _Attempt(task, definition, index, saga_id, ACTION, timezone.now())
    with tracing.attempt(saga_id, attempt.name, ACTION, attempt.number) as trace:
        attempt.trace = trace
        return _run_action(attempt)


def _run_action(attempt: _Attempt) -> dict:
    step, saga_id = attempt.step, attempt.saga_id
    try:
        _count_lost_delivery(attempt)
        if step.external:
            _external_action(attempt)
        else:
            with transaction.atomic():
                saga = _claim_action(attempt)
                faults.before_action(
                    saga, step.name, attempt.number, first_delivery=attempt.first_delivery
                )
                result = step.action(saga)
                if attempt.last:
                    row = attempt.row(SagaLog.Status.SUCCEEDED, result=result)
                    barrier.end_saga(saga_id, row=row)  # when it ended: after the work
                else:
                    attempt.log(SagaLog.Status.SUCCEEDED, result=result)
    except _Outcome as outcome:
        return _settle(attempt, outcome)
    except (Ignore, Retry):
        raise
    except Exception as exc:
        _retry_outage(attempt, exc)
        uncertain = attempt.called_out or isinstance(exc, step.uncertain_on)
        policy = step.compensation_retry if attempt.undoing else step.retry
        _fail(attempt, exc, policy, uncertain=uncertain)
    return attempt.reply(SagaLog.Status.SUCCEEDED)


def _claim_action(attempt: _Attempt) -> Saga:
    """Move the saga past this action, in the caller's transaction; the saga as claimed."""
    claim = partial(
        barrier.claim_action,
        attempt.saga_id,
        index=attempt.index,
        step=attempt.step.name,
        last=attempt.last,
    )
    return _claimed(attempt, claim, _action_not_due)


def _claimed(
    attempt: _Attempt,
    claim: Callable[[], Saga | None],
    not_due: Callable[[_Attempt, Saga], _Outcome | None],
) -> Saga:
    """The saga as ``claim`` moved it; raises the outcome if the step is not due.

    A claim that matched nothing reads the row under its lock to say why; if
    the step became due meanwhile (its predecessor committed in between), it
    claims it then.
    """
    saga = claim()
    if saga is None:
        _raise_if(not_due(attempt, attempt.joined(_lock(attempt.saga_id))))
        saga = claim()
    if saga is None:  # pragma: no cover - the row is locked and due: the claim matches
        raise _Outcome(SagaLog.Status.IGNORED, "lost the claim", continue_chain=False)
    return attempt.joined(saga)


def _external_action(attempt: _Attempt) -> None:
    step = attempt.step
    saga, attempt.marker = barrier.open_call(
        attempt.saga_id,
        index=attempt.index,
        marker=attempt.row(SagaLog.Status.STARTED, may_have_effect=True),
    )
    if saga is None:
        raise _Outcome(SagaLog.Status.IGNORED, "saga does not exist", continue_chain=False)
    attempt.joined(saga)
    if attempt.marker is None:
        if outcome := _action_not_due(attempt, saga):
            raise _undo_stranded_effect(attempt, saga, outcome)
        # Due, and not marked yet: a fault plan's faults strike before the mark.
        faults.before_action(saga, step.name, attempt.number, first_delivery=attempt.first_delivery)
        attempt.mark_started()
    attempt.called_out = True
    result = step.action(saga)  # no transaction open: the call may take seconds
    # The conditional UPDATE is the barrier here: a concurrent copy or the
    # errback's claim waits for it, then finds the row moved.
    if barrier.close_call(
        attempt.saga_id,
        index=attempt.index,
        step=step.name,
        last=attempt.last,
        marker=attempt.row(SagaLog.Status.SUCCEEDED, result=result),
    ):
        return
    saga = _read(attempt.saga_id)
    outcome = _action_not_due(attempt, saga) or _Outcome(
        SagaLog.Status.DUPLICATE, "already done", continue_chain=True
    )
    raise _undo_stranded_effect(attempt, saga, outcome)


def _action_not_due(attempt: _Attempt, saga: Saga) -> _Outcome | None:
    """Why this delivery of the action must not run (or commit), if it must not."""
    definition, index = attempt.definition, attempt.index
    if saga.status not in (Saga.Status.PENDING, Saga.Status.RUNNING):
        return _Outcome(
            SagaLog.Status.IGNORED, f"saga is {saga.status}: action not run", continue_chain=False
        )
    if saga.steps_done > index:
        return _Outcome(SagaLog.Status.DUPLICATE, "already done", continue_chain=True)
    if saga.steps_done < index:
        # A copy published out of band (a re-published message) that
        # overtook the chain: the chain itself brings this step in turn.
        return _Outcome(
            SagaLog.Status.IGNORED,
            f"not due yet: {definition.steps[saga.steps_done].name} comes first",
            continue_chain=False,
        )
    return None


def _undo_stranded_effect(attempt: _Attempt, saga: Saga, outcome: _Outcome) -> _Outcome:
    """Undo what an external action may have done if the saga's compensation will not.

    The action never committed (``steps_done`` did not pass it), so the
    compensation chain undoes it only if it is still to come; once it has
    passed this step, or the saga ended, an effect that landed meanwhile (this
    copy's, or a lost earlier copy's) would stay. The compensation is keyed
    like the action, so running it here and there is harmless.

    The outcome is returned, its reason saying what was undone, for the
    IGNORED row that records this delivery; a failure is retried on the
    compensation's budget.
    """
    step, index = attempt.step, attempt.index
    if step.compensation is None or saga.steps_done > index:
        return outcome
    if saga.status not in (Saga.Status.COMPENSATING, Saga.Status.COMPENSATED, Saga.Status.FAILED):
        return outcome
    if saga.status != Saga.Status.COMPENSATED and saga.undo_cursor > index:
        # Its compensation is still to come (or comes with an operator's
        # retry of a FAILED saga) and settles the effect.
        return outcome
    attempt.undoing = True
    result = step.compensation(saga)
    attempt.undoing = False
    if result is None:
        return outcome
    logger.warning(
        "saga %s: %s arrived after the saga moved on; its effect was undone: %s",
        attempt.saga_id,
        step.name,
        result,
    )
    outcome.reason = f"{outcome.reason}; its late effect was undone: {result}"
    return outcome


def _raise_if(outcome: _Outcome | None) -> None:
    if outcome is not None:
        raise outcome


def run_compensation(
    task: Task, definition: SagaDefinition, index: int, saga_id: str, round: int = 1
) -> dict:
    attempt = _Attempt(task, definition, index, saga_id, COMPENSATION, timezone.now(), round)
    with tracing.attempt(saga_id, attempt.name, COMPENSATION, attempt.number, round) as trace:
        attempt.trace = trace
        return _run_compensation(attempt)


def _run_compensation(attempt: _Attempt) -> dict:
    step, saga_id, index = attempt.step, attempt.saga_id, attempt.index
    assert step.compensation is not None
    try:
        _count_lost_delivery(attempt)
        if step.external:
            saga = attempt.joined(_read(saga_id))
            _raise_if(_compensation_not_due(attempt, saga))
            faults.before_compensation(
                saga, attempt.name, attempt.number, first_delivery=attempt.first_delivery
            )
            result = step.compensation(saga)  # no transaction open: the call may take seconds
            row = attempt.row(_undone(result), result=result)
            # The conditional UPDATE is the barrier, as for external actions.
            if not barrier.close_compensation_call(
                saga_id, index=index, name=attempt.name, due_below=_due_below(attempt), row=row
            ):
                raise _Outcome(SagaLog.Status.DUPLICATE, "already undone", continue_chain=True)
        else:
            with transaction.atomic():
                saga = _claim_compensation(attempt)
                faults.before_compensation(
                    saga, attempt.name, attempt.number, first_delivery=attempt.first_delivery
                )
                result = step.compensation(saga)
                row = attempt.log(_undone(result), result=result)
    except _Outcome as outcome:
        return _settle(attempt, outcome)
    except (Ignore, Retry):
        raise
    except Exception as exc:
        _retry_outage(attempt, exc)
        _fail(attempt, exc, step.compensation_retry, uncertain=False)
    return attempt.reply(row.status)


def _undone(result: Any) -> str:
    """A compensation that found nothing to undo (None) is SKIPPED."""
    return SagaLog.Status.SKIPPED if result is None else SagaLog.Status.SUCCEEDED


def _due_below(attempt: _Attempt) -> int:
    """The highest undo cursor at which this compensation is due (see ``barrier``)."""
    steps = attempt.definition.steps
    return next(
        (above for above in range(attempt.index + 1, len(steps)) if steps[above].compensation),
        len(steps),
    )


def _claim_compensation(attempt: _Attempt) -> Saga:
    """Move the undo cursor to this compensation in the caller's transaction; see _claimed."""
    claim = partial(
        barrier.claim_compensation,
        attempt.saga_id,
        index=attempt.index,
        name=attempt.name,
        due_below=_due_below(attempt),
    )
    return _claimed(attempt, claim, _compensation_not_due)


def _compensation_not_due(attempt: _Attempt, saga: Saga) -> _Outcome | None:
    definition, index = attempt.definition, attempt.index
    if saga.status != Saga.Status.COMPENSATING:
        return _Outcome(
            SagaLog.Status.IGNORED,
            f"saga is {saga.status}: compensation not run",
            continue_chain=False,
        )
    if saga.undo_cursor <= index:
        return _Outcome(SagaLog.Status.DUPLICATE, "already undone", continue_chain=True)
    due = definition.next_to_undo(saga.undo_cursor)
    if index != due:
        # Compensations run strictly newest first, whatever order copies arrive in.
        return _Outcome(
            SagaLog.Status.IGNORED,
            f"not due yet: {definition.steps[due].undo_name} comes first",
            continue_chain=False,
        )
    return None


def _settle(attempt: _Attempt, outcome: _Outcome) -> dict:
    """Record a delivery that had nothing to do; stop the chain if the saga moved on."""
    logger.info("saga %s %s %s: %s", attempt.saga_id, attempt.name, attempt.phase, outcome.reason)
    with _bookkeeping(attempt, "record the delivery"):
        if Saga.objects.filter(pk=attempt.saga_id).exists():
            attempt.log(outcome.status, error=outcome.reason)
    if not outcome.continue_chain:
        raise Ignore(outcome.reason)
    return attempt.reply(outcome.status)


def _fail(attempt: _Attempt, exc: Exception, policy: RetryPolicy, *, uncertain: bool) -> None:
    """Retry with backoff while the policy allows it; otherwise record and re-raise.

    Re-raising after the last retry is what makes Celery call the errback.
    Every attempt records whether it may have had its effect (a lost answer,
    a time limit, or a redelivery after a lost worker), so compensation can
    tell from *any* attempt, not only the last, whether the step is undone.
    """
    error = f"{type(exc).__name__}: {exc}"
    uncertain = (
        uncertain
        or isinstance(exc, (SoftTimeLimitExceeded, EffectUncertain, PoisonMessage))
        or attempt.redelivered
    )
    # Retries spent on database outages are not the step's failures.
    retries = attempt.task.request.retries - attempt.outages
    if policy.retries(exc) and not isinstance(exc, PoisonMessage) and retries < policy.max_retries:
        countdown = policy.delay(retries)
        # A row that cannot be written (the database went away meanwhile) must
        # not turn a retry into a failure of the step, and so of the saga.
        with _bookkeeping(attempt, "record the retry"):
            attempt.log(
                SagaLog.Status.RETRYING,
                error=f"{error} (retry in {countdown}s)",
                may_have_effect=uncertain,
            )
        raise attempt.task.retry(
            exc=exc, countdown=countdown, max_retries=policy.max_retries + attempt.outages
        )
    status = SagaLog.Status.TIMED_OUT if uncertain else SagaLog.Status.FAILED
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    # Without this row the errback finds no definite failure, and undoes the
    # step too: the safe side.
    with _bookkeeping(attempt, "record the failure"):
        attempt.log(status, error=detail, may_have_effect=uncertain)
    raise exc


def _retry_outage(attempt: _Attempt, exc: Exception) -> None:
    """The database was unreachable or a bounded wait ran out: try again later.

    Such an error says nothing about the step (its transaction rolled back),
    so it is retried with backoff outside the step's own policy, up to
    ``SAGA_OUTAGE_RETRIES`` times; the broken connection is dropped so the
    next attempt connects afresh. Returns if ``exc`` is something else, or
    the outage budget is spent (the step's policy then decides). A call that
    already went out may have had its effect: the next attempt repeats it
    under the same idempotency key.
    """
    if not database_unavailable(exc) or attempt.outages >= settings.SAGA_OUTAGE_RETRIES:
        return
    drop_broken_connection()
    outages = attempt.outages + 1
    delay = min(float(settings.SAGA_OUTAGE_MAX_DELAY_S), 0.5 * 2 ** min(outages, 10))
    countdown = round(random.uniform(delay / 2, delay), 3)
    logger.warning(
        "saga %s %s %s: database unavailable (%s); trying again in %ss (outage retry %d)",
        attempt.saga_id,
        attempt.name,
        attempt.phase,
        type(exc).__name__,
        countdown,
        outages,
    )
    request = attempt.task.request
    raise attempt.task.retry(
        kwargs={**(getattr(request, "kwargs", None) or {}), "outages": outages},
        exc=exc,
        countdown=countdown,
        max_retries=request.retries + 1,
    )


def drop_broken_connection() -> None:
    """Close this thread's database connection if it no longer works (a restart, a kill)."""
    if connection.connection is not None and not connection.is_usable():
        connection.close()


class _bookkeeping:
    """Run a SagaLog write whose loss must not fail the step: log it and go on.

    Only database errors are swallowed (the connection is dropped so the
    next task reconnects); anything else is a bug and propagates.
    """

    def __init__(self, attempt: _Attempt, what: str) -> None:
        self.attempt, self.what = attempt, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or not database_unavailable(exc):
            return False
        logger.warning(
            "saga %s %s %s: could not %s (%s); going on without the row",
            self.attempt.saga_id,
            self.attempt.name,
            self.attempt.phase,
            self.what,
            exc,
        )
        drop_broken_connection()
        return True


def _count_lost_delivery(attempt: _Attempt) -> None:
    """A message delivered again after its worker was lost: record it, and stop a poison one.

    Only redelivered messages pay for this (one INSERT and one count, in a
    transaction of their own, so the record survives if this delivery
    crashes its worker too). Past ``SAGA_MAX_LOST_DELIVERIES`` the attempt
    fails for good with :class:`PoisonMessage`, whatever its retry policy:
    an action is then compensated (its effect may have landed), a
    compensation ends the saga FAILED for an operator.
    """
    if not attempt.redelivered:
        return
    try:
        # Durable: committed before the body runs, so a crash of this delivery counts too.
        with transaction.atomic(durable=True):
            attempt.log(
                SagaLog.Status.LOST,
                error="delivered again: the worker running it was lost (crashed, killed or frozen)",
                may_have_effect=True,
            )
            lost = SagaLog.objects.filter(
                saga_id=attempt.saga_id,
                step=attempt.name,
                phase=attempt.phase,
                round=attempt.round,
                status=SagaLog.Status.LOST,
            ).count()
    except IntegrityError:  # the saga is gone: the step finds that out next
        return
    if lost > settings.SAGA_MAX_LOST_DELIVERIES:
        raise PoisonMessage(
            f"{attempt.name} lost its worker {lost} times (SAGA_MAX_LOST_DELIVERIES="
            f"{settings.SAGA_MAX_LOST_DELIVERIES}): not delivered again"
        )
