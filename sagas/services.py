"""Writes of the saga engine. Every status change is a conditional UPDATE.

The public entry points: ``saga_start`` (what a domain calls), the errback
and finishing services the engine's tasks call, the recovery services beat
runs (``sagas_reconcile_pending``, ``sagas_recover_stalled``), and the
operator actions (``saga_retry_compensation``, ``saga_mark_resolved``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import BooleanField, Count, ExpressionWrapper, F, Q
from django.db.models.functions import Coalesce, Now
from django.utils import timezone

from sagas import broker, canvas, tracing
from sagas.definitions import SagaDefinition, registry
from sagas.errors import InvalidSagaState, SagaNotFound
from sagas.models import Saga, SagaLog
from sagas.runtime import elapsed_ms

logger = logging.getLogger(__name__)

Status = Saga.Status
HARD_LIMIT = "TimeLimitExceeded: hard time limit"


def saga_start(
    *,
    saga_type: str,
    business_key: str,
    context: dict[str, Any] | None = None,
    deadline_s: int | None = None,
    owner=None,
) -> Saga:
    """Persist a PENDING saga in the caller's transaction; publish its chain after commit.

    - ``saga_type``: a registered :class:`~sagas.definitions.SagaDefinition`'s
      name (``UnknownSagaType`` otherwise).
    - ``business_key``: what the saga acts for, e.g. ``booking:<id>``
      (searchable in the admin).
    - ``context``: JSON the steps read (``saga.context``); its ``chaos`` key,
      if any, is the saga's fault plan (``sagas.faults``).
    - ``deadline_s``: overrides the definition's deadline.
    - ``owner``: the user the saga acts for; the saga API shows it to them.

    Call it inside the transaction that writes the domain's own rows, so the
    saga exists exactly when they do. If the process dies between the commit
    and the publish, the reconciler (``sagas.reconcile_pending`` on beat)
    publishes it.
    """
    definition = registry.get(saga_type)
    lifetime = timedelta(seconds=deadline_s or definition.deadline_s)
    saga_id = uuid.uuid4()
    # The saga span (sagas.tracing): its traceparent goes in with the row.
    with tracing.saga_span(
        saga_id=saga_id, saga_type=definition.name, business_key=business_key
    ) as traceparent:
        saga = Saga.objects.create(
            id=saga_id,
            saga_type=definition.name,
            business_key=business_key,
            owner=owner,
            context=context or {},
            # The database's clock, like created_at: the sweeper compares it with no other.
            deadline=Now() + lifetime,
            trace_context=traceparent,
        )
    # The same value the INSERT computed, without reading it back.
    saga.deadline = saga.created_at + lifetime
    # robust: the caller's transaction has committed by then; whatever goes
    # wrong afterwards is the reconciler's to mend, never the caller's error.
    _after_commit(
        partial(saga_publish, saga_id=saga.id, saga_type=definition.name, traceparent=traceparent),
        "publish the saga",
    )
    return saga


def saga_publish(*, saga_id, saga_type: str, traceparent: str = "") -> bool:
    """Publish the action chain and mark the saga RUNNING. False if the broker refused.

    Never raises: it runs after the saga's transaction committed, so a broker
    or database failure here leaves a PENDING saga for the reconciler.
    ``traceparent``: the saga span's, so the publish is traced under it.
    """
    try:
        definition = registry.get(saga_type)
        with tracing.under_saga(traceparent):
            canvas.action_chain(definition, str(saga_id)).apply_async()
    except Exception:
        logger.exception("saga %s: publishing failed; the reconciler will retry", saga_id)
        return False
    try:
        Saga.objects.filter(pk=saga_id, status=Status.PENDING).update(
            status=Status.RUNNING,
            dispatched_at=Now(),
            started_at=Coalesce(F("started_at"), Now()),
            updated_at=Now(),
        )
    except Exception:
        # Published but still PENDING: the steps run all the same (they take
        # PENDING sagas), and a second publish by the reconciler is harmless.
        logger.exception("saga %s: published, but marking it RUNNING failed", saga_id)
    return True


def sagas_reconcile_pending(*, limit: int = 500) -> int:
    """Publish sagas committed but never published; end those already past their deadline.

    Safe to run on two beats at once: a saga is taken only by the process
    whose transaction locked it (``SKIP LOCKED``: a row another session holds
    is left for the next run, never waited for) and stamped its
    ``dispatched_at``. A publish that reaches the broker twice is harmless
    anyway, because every step is guarded by the barrier; a saga whose
    message is still queued (published, but marking it RUNNING failed) is
    not published again. A saga of a type this process does not know is
    reported and left alone, so it cannot block the ones behind it.
    """
    grace = timedelta(seconds=settings.SAGA_DISPATCH_GRACE_S)
    stale = Q(dispatched_at__isnull=True) | Q(dispatched_at__lt=Now() - grace)
    pending = Saga.objects.filter(stale, status=Status.PENDING, created_at__lt=Now() - grace)
    report_unknown_types()
    pending = pending.filter(saga_type__in=registry.names())
    overdue = ExpressionWrapper(Q(deadline__lt=Now()), BooleanField())
    candidates = list(
        pending.annotate(overdue=overdue)
        .order_by("created_at")
        .values_list("id", "dispatched_at", "overdue")[:limit]
    )
    # Published before, but never marked RUNNING: still queued (behind a
    # backlog, say) unless the broker has no message of it. An overdue one
    # is ended whether queued or not: its step will find it ended.
    queued = broker.sagas_with_messages(
        {str(saga_id) for saga_id, dispatched, late in candidates if dispatched and not late}
    )
    ids = [saga_id for saga_id, _, _ in candidates if str(saga_id) not in (queued or ())]
    with transaction.atomic():
        rows = list(
            pending.filter(pk__in=ids)
            .select_for_update(skip_locked=True)
            .annotate(overdue=overdue)
            .order_by("created_at")
            .values_list("id", "saga_type", "overdue")
        )
        Saga.objects.filter(pk__in=[row[0] for row in rows]).update(dispatched_at=Now())
    published = ended = 0
    for saga_id, saga_type, overdue in rows:
        if overdue:
            ended += _end_unstarted(saga_id)
        elif saga_publish(saga_id=saga_id, saga_type=saga_type):
            published += 1
    if published:
        logger.warning(
            "re-dispatched %d saga(s) that were committed but never published", published
        )
    if ended:
        logger.warning("ended %d saga(s) whose deadline passed before any step ran", ended)
    return published


def report_unknown_types() -> dict[str, int]:
    """Log the sagas in flight whose type this process does not know (see below); return them."""
    unknown = sagas_of_unknown_type()
    if unknown:
        logger.error(
            "sagas of unknown type wait, skipped by recovery (deploy the code declaring them): %s",
            ", ".join(f"{name} ({n})" for name, n in sorted(unknown.items())),
        )
    return unknown


def sagas_of_unknown_type() -> dict[str, int]:
    """Sagas in flight whose type no saga_steps module of this process declares, by type.

    Recovery skips them (so they never block the others) until code that
    declares their type is deployed, or an operator ends them. The
    reconciler logs them at every run; ``/metrics`` and the admin show them.
    """
    return dict(
        Saga.objects.filter(status__in=(Status.PENDING, Status.RUNNING, Status.COMPENSATING))
        .exclude(saga_type__in=registry.names())
        .values_list("saga_type")
        .annotate(n=Count("id"))
        .values_list("saga_type", "n")
    )


def _end_unstarted(saga_id) -> bool:
    """End a PENDING saga past its deadline without running a step: nothing was done to undo.

    It ends COMPENSATED (its type's ``on_compensated`` runs, e.g. a booking
    is rejected) with the reason. A step already running on it holds its row
    and makes this a no-op; one still queued will find it ended and do nothing.
    """
    with transaction.atomic():
        saga = (
            Saga.objects.select_for_update(skip_locked=True)
            .filter(pk=saga_id, status=Status.PENDING, steps_done=0)
            .first()
        )
        if saga is None:
            return False
        saga.failure_reason = "deadline passed before any step ran: ended without running them"
        _end_compensated(saga, registry.get(saga.saga_type))
    return True


def saga_action_failed(
    *, saga_id, failed_task_id: str = "", hard_time_limit: bool = False, step: int | None = None
) -> bool:
    """An action's last attempt failed (the errback): retry a hard time limit, else compensate.

    Celery fails a task killed by its hard time limit without retrying it,
    whatever its policy says; such an attempt may have had its effect, so it
    is retried like any other uncertain failure while the step's budget lasts.
    ``step`` (the failed action's index, from the errback's arguments) makes a
    report from a stale copy of a step the saga has passed a no-op.
    """
    if hard_time_limit and _retry_after_hard_limit(
        saga_id, failed_task_id, SagaLog.Phase.ACTION, step
    ):
        return False
    return saga_begin_compensation(saga_id=saga_id, failed_task_id=failed_task_id, step=step)


def saga_begin_compensation(
    *,
    saga_id,
    failed_task_id: str = "",
    reason: str = "",
    step: int | None = None,
    skip_locked: bool = False,
) -> bool:
    """Claim a failed saga (PENDING/RUNNING -> COMPENSATING) and queue its compensations.

    Only the caller that locked the row and moved it queues anything, so a
    second errback for the same saga is a no-op. The row is never waited for:
    an errback finding it locked (``NOWAIT``) fails with a database error and
    is retried later; the sweeper (``skip_locked``) leaves it for its next run.
    The failing step is undone too unless its last attempt is a definite
    failure and no attempt of it may have had an effect: a lost answer, a
    time limit or a lost worker in *any* attempt, an attempt still in
    flight, or a step the sweeper gave up on at the deadline may have had
    one, and compensations cope with finding nothing.

    Compensating gets a deadline of its own (the type's
    ``compensation_deadline_s``), from the database's clock.
    """
    with transaction.atomic():
        claim = Saga.objects.filter(pk=saga_id, status__in=(Status.PENDING, Status.RUNNING))
        if step is not None:
            claim = claim.filter(steps_done__lte=step)  # a stale copy's report claims nothing
        saga = _locked(claim, skip=skip_locked).first()
        if saga is None:
            logger.info(
                "saga %s: already claimed or past step %s; report of %s ignored",
                saga_id,
                step,
                failed_task_id,
            )
            return False
        definition = registry.get(saga.saga_type)
        undo = saga.steps_done
        detail = f"step {_step_name(definition, undo)} failed"
        if undo < len(definition.steps):
            attempts = SagaLog.objects.filter(
                saga=saga, step=definition.steps[undo].name, phase=SagaLog.Phase.ACTION
            )
            failed = attempts.order_by("-id").first()
            definite = failed is not None and failed.status == SagaLog.Status.FAILED
            if not definite or attempts.filter(may_have_effect=True).exists():
                undo += 1
            if failed is not None and failed.error:
                detail = f"{detail}: {failed.error}"
        Saga.objects.filter(pk=saga.pk).update(
            status=Status.COMPENSATING,
            round=1,
            undo_cursor=undo,
            failure_reason=reason or detail,
            compensation_deadline=Now() + timedelta(seconds=definition.compensation_deadline_s),
            updated_at=Now(),
        )
        _trace_event(
            "begin compensation", saga, outcome="compensating", reason=reason or detail, undo=undo
        )
        _after_commit(
            partial(_publish_compensation, definition, saga.id, undo, 1), "publish compensation"
        )
    return True


def _locked(queryset, *, skip: bool):
    """``queryset`` locking its rows without ever waiting for one another session holds.

    ``skip``: leave such rows out (SKIP LOCKED); otherwise fail at once with
    a database error (NOWAIT), for a task that is retried later. SQLite has
    no row locks: there the writes are serialised by its database lock.
    """
    return queryset.select_for_update(skip_locked=skip, nowait=not skip)


def _retry_after_hard_limit(
    saga_id, failed_task_id: str, phase: str, step: int | None = None
) -> bool:
    """Deal with an attempt killed by its hard time limit; False if it is a final failure.

    - The same kill reported again (prefork reports each twice: the pool's job
      result, then its timeout handler; a republished attempt has a new task
      id): already dealt with.
    - An action ``step`` killed after its transaction committed: no next
      message was sent, so the rest of the chain is published once.
    - Otherwise the attempt is counted from the log (the killed one wrote no
      row) and, while the budget allows, published again with Celery's retry
      count and a backoff, the way ``Task.retry`` would have.

    False when the budget is spent or the saga moved on: the caller goes on as
    for any final failure.
    """
    with transaction.atomic():
        saga = _locked(Saga.objects.filter(pk=saga_id), skip=False).first()
        if saga is None:
            return False
        if SagaLog.objects.filter(
            saga=saga, task_id=failed_task_id, error__startswith=HARD_LIMIT
        ).exists():
            return True
        definition = registry.get(saga.saga_type)
        if phase == SagaLog.Phase.ACTION:
            if saga.status not in (Status.PENDING, Status.RUNNING):
                return False
            if step is not None and saga.steps_done > step:
                _log_row(
                    saga,
                    step=definition.steps[step].name,
                    step_index=step,
                    phase=phase,
                    status=SagaLog.Status.IGNORED,
                    task_id=failed_task_id,
                    error=f"{HARD_LIMIT} exceeded after the step committed: the chain goes on",
                )
                if saga.steps_done < len(definition.steps):
                    rest = canvas.action_chain(definition, str(saga.id), start=saga.steps_done)
                    _after_commit(rest.apply_async, "publish the rest of the chain")
                return True
            index, round = saga.steps_done, 0
            if index >= len(definition.steps):
                return False
            killed = definition.steps[index]
            name, policy = killed.name, killed.retry
        else:
            index, round = definition.next_to_undo(saga.undo_cursor), saga.round
            if saga.status != Status.COMPENSATING or index is None:
                return False
            killed = definition.steps[index]
            name, policy = killed.undo_name, killed.compensation_retry
        retries = SagaLog.objects.filter(
            saga=saga, step=name, phase=phase, round=round, status=SagaLog.Status.RETRYING
        ).count()
        again = retries < policy.max_retries
        countdown = policy.delay(retries) if again else 0
        error = f"{HARD_LIMIT} ({killed.hard_limit_s}s) exceeded"
        _log_row(
            saga,
            step=name,
            step_index=index,
            phase=phase,
            status=SagaLog.Status.RETRYING if again else SagaLog.Status.TIMED_OUT,
            attempt=retries + 1,
            round=round,
            may_have_effect=True,
            task_id=failed_task_id,
            error=f"{error} (retry in {countdown}s)" if again else error,
        )
        if not again:
            return False
        Saga.objects.filter(pk=saga.pk).update(updated_at=Now())
        if phase == SagaLog.Phase.ACTION:
            signature = canvas.action_chain(definition, str(saga.id), start=index)
        else:
            signature = canvas.compensation_chain(definition, str(saga.id), saga.undo_cursor, round)
        _after_commit(
            partial(signature.apply_async, retries=retries + 1, countdown=countdown),
            "publish the retry",
        )
    logger.warning("saga %s: %s hit its hard time limit; retry %d", saga_id, name, retries + 1)
    return True


def sagas_recover_stalled(
    *, limit: int = 1000, budget_s: float | None = None, saga_types: list[str] | None = None
) -> dict[str, int]:
    """Move on every saga that stopped making progress; nothing waits forever.

    - RUNNING past its deadline: compensated (the step in flight included,
      since it may have had an effect).
    - COMPENSATING past its own deadline: FAILED, for an operator.
    - RUNNING or COMPENSATING with no progress for ``SAGA_LOST_AFTER_S``
      and no message of it left in the broker (queued, or held by a live
      worker: see ``sagas.broker``): its messages were lost (a flushed
      broker), so the rest of its chain is published again. A saga whose
      step is only queued behind a backlog is left alone. Where the broker
      cannot be inspected, a saga is taken for lost once it was quiet for
      its current step's whole retry budget; the barrier makes a publish of
      a chain that was merely slow harmless anyway.

    Rows are claimed in batches by one locking read that skips rows other
    sessions hold (a frozen worker's saga is left for a later run, never
    waited for) and one UPDATE of ``updated_at``, so two beats running this
    at once never both act on a saga. It works through batches of ``limit``
    until nothing is left or ``budget_s`` (``SAGA_SWEEP_BUDGET_S``) is spent.
    ``saga_types`` limits it to those types (default: every declared one).
    Times come from the database's clock.
    """
    budget = settings.SAGA_SWEEP_BUDGET_S if budget_s is None else budget_s
    give_up_at = time.monotonic() + budget
    counts = {
        "deadline_compensated": 0,
        "compensation_deadline_failed": 0,
        "resumed": 0,
        "compensation_requeued": 0,
    }
    known = [name for name in registry.names() if saga_types is None or name in saga_types]
    broker.restore_expired_leases()

    overdue = Saga.objects.filter(status=Status.RUNNING, deadline__lt=Now(), saga_type__in=known)
    for saga_id, step in overdue.values_list("id", "current_step")[:limit]:
        reason = f"deadline passed with no end in sight (last step: {step or '-'})"
        if saga_begin_compensation(
            saga_id=saga_id, failed_task_id="sweeper", reason=reason, skip_locked=True
        ):
            counts["deadline_compensated"] += 1

    compensating = Saga.objects.filter(status=Status.COMPENSATING, saga_type__in=known)
    _bound_compensations(compensating.filter(compensation_deadline__isnull=True))
    overdue = compensating.filter(compensation_deadline__lt=Now())
    for saga_id in overdue.values_list("id", flat=True)[:limit]:
        if _fail_overdue_compensation(saga_id):
            counts["compensation_deadline_failed"] += 1

    quiet = Now() - timedelta(seconds=settings.SAGA_LOST_AFTER_S)
    stalled = Saga.objects.filter(
        status__in=(Status.RUNNING, Status.COMPENSATING), updated_at__lt=quiet, saga_type__in=known
    )
    seen: set = set()
    present: set[str] | None = None
    read_broker = True
    while time.monotonic() < give_up_at:
        batch = list(
            stalled.exclude(pk__in=seen)
            .annotate(now=Now())
            .order_by("updated_at")
            .values("id", "saga_type", "status", "steps_done", "undo_cursor", "updated_at", "now")[
                :limit
            ]
        )
        if not batch:
            break
        seen.update(row["id"] for row in batch)
        if read_broker:
            # Once per sweep, and only when a saga is quiet: the chains later
            # batches publish are their own sagas', which no batch looks at again.
            present, read_broker = broker.sagas_in_broker(), False
        lost = _lost(batch, present)
        for saga in _claim_stalled(stalled, lost):
            definition = registry.get(saga["saga_type"])
            if saga["status"] == Status.RUNNING:
                if saga["steps_done"] >= len(definition.steps):
                    continue
                logger.info("saga %s stalled: publishing the rest again", saga["id"])
                start = saga["steps_done"]
                canvas.action_chain(definition, str(saga["id"]), start=start).apply_async()
                counts["resumed"] += 1
            else:
                logger.info("saga %s stalled compensating: publishing the rest again", saga["id"])
                _publish_compensation(definition, saga["id"], saga["undo_cursor"], saga["round"])
                counts["compensation_requeued"] += 1
        if len(batch) < limit:
            break
    if any(counts.values()):
        logger.warning("recovery moved stalled sagas on: %s", counts)
    return counts


def _lost(batch: list[dict], present: set[str] | None) -> list:
    """The ids of the sagas in ``batch`` whose messages are gone.

    No message of the saga in the broker (``present``) means lost; where the
    broker could not be read, a saga quiet for its step's whole retry budget is.
    """
    lost = []
    for row in batch:
        if present is not None:
            if str(row["id"]) not in present:
                lost.append(row["id"])
            continue
        definition = registry.get(row["saga_type"])
        if row["status"] == Status.RUNNING:
            if row["steps_done"] >= len(definition.steps):
                continue
            step, phase = definition.steps[row["steps_done"]], SagaLog.Phase.ACTION
        else:
            due = definition.next_to_undo(row["undo_cursor"])
            step = definition.steps[due] if due is not None else definition.steps[0]
            phase = SagaLog.Phase.COMPENSATION
        if row["updated_at"] <= row["now"] - timedelta(seconds=step.stall_after_s(phase)):
            lost.append(row["id"])
    return lost


def _claim_stalled(stalled, ids: list) -> list[dict]:
    """Lock the still-stalled sagas among ``ids`` (skipping locked rows) and stamp them."""
    if not ids:
        return []
    with transaction.atomic():
        claimed = list(
            _locked(stalled.filter(pk__in=ids), skip=True).values(
                "id", "saga_type", "status", "steps_done", "undo_cursor", "round"
            )
        )
        Saga.objects.filter(pk__in=[saga["id"] for saga in claimed]).update(updated_at=Now())
    return claimed


def _bound_compensations(unbounded) -> None:
    """Give compensating sagas that have no deadline (begun before there were any) one from now."""
    for saga_type in set(unbounded.values_list("saga_type", flat=True)):  # usually none
        unbounded.filter(saga_type=saga_type).update(
            compensation_deadline=Now()
            + timedelta(seconds=registry.get(saga_type).compensation_deadline_s)
        )


def _fail_overdue_compensation(saga_id) -> bool:
    """COMPENSATING past its own deadline -> FAILED with the reason; an operator must act."""
    with transaction.atomic():
        saga = (
            _locked(Saga.objects.filter(pk=saga_id, status=Status.COMPENSATING), skip=True)
            .filter(compensation_deadline__lt=Now())
            .first()
        )
        if saga is None:
            return False
        definition = registry.get(saga.saga_type)
        due = definition.next_to_undo(saga.undo_cursor)
        name = definition.steps[due].undo_name if due is not None else "the finish"
        _finish(saga, Status.FAILED)
        saga.failure_reason = (
            f"compensation did not end within {definition.compensation_deadline_s}s "
            f"(still to do: {name}); {saga.failure_reason}"
        ).strip("; ")
        saga.save(
            update_fields=["status", "failure_reason", "finished_at", "duration_ms", "updated_at"]
        )
        _mark_failed(saga, definition)
    logger.error("saga %s: compensation passed its deadline; FAILED", saga_id)
    return True


def saga_finish_compensation(*, saga_id) -> bool:
    """Every compensation ran: COMPENSATING -> COMPENSATED, then the type's ``on_compensated``.

    Only if nothing is left to undo, whichever round's chain got here: a copy
    of an earlier round's finish cannot end a saga with steps still to undo.
    """
    with transaction.atomic():
        saga = Saga.objects.select_for_update().filter(pk=saga_id).first()
        done = (
            saga is not None
            and saga.status == Status.COMPENSATING
            and registry.get(saga.saga_type).next_to_undo(saga.undo_cursor) is None
        )
        if done and _calls_in_flight(saga):
            # Ending now would let the domain move on (a booking cancelled
            # again) while a call of this saga may still land: the sweeper
            # brings the finish back once the call has ended or cannot land.
            logger.warning("saga %s: an external call may still land; finishing later", saga_id)
            return False
        if done:
            _end_compensated(saga, registry.get(saga.saga_type))
    return bool(done)


def _end_compensated(saga: Saga, definition: SagaDefinition) -> None:
    """COMPENSATED, then the type's ``on_compensated``; FAILED with the reason if it refuses."""
    _finish(saga, Status.COMPENSATED)
    saga.current_step = ""
    hook = definition.on_compensated
    if hook and (refusal := _run_hook(hook, saga)):
        # Everything is undone, but the domain disagrees about where it
        # stands: an operator must look, and the saga says why.
        saga.status = Status.FAILED
        saga.failure_reason = f"compensated, but {refusal}"
    saga.save(
        update_fields=[
            "status",
            "current_step",
            "failure_reason",
            "finished_at",
            "duration_ms",
            "updated_at",
        ]
    )
    _trace_event("finish compensation", saga, outcome=saga.status.lower())


def _mark_failed(saga: Saga, definition: SagaDefinition) -> None:
    """The type's ``on_failed`` for a saga that just became FAILED; a refusal joins the reason."""
    if definition.on_failed and (refusal := _run_hook(definition.on_failed, saga)):
        saga.failure_reason = f"{saga.failure_reason}; {refusal}"
        saga.save(update_fields=["failure_reason"])


def _calls_in_flight(saga: Saga) -> bool:
    """Whether an external step's call of this saga may still land (its STARTED row is open).

    A call lasts at most its hard time limit; a copy lost with its worker is
    delivered again within the visibility timeout and closes or undoes it.
    ``SAGA_CALL_HORIZON_S`` more covers a worker frozen mid-call for up to
    that long. Past that, a row left STARTED belongs to a process that is
    gone (or frozen for longer still: that case is beyond this bound).
    """
    external = [step for step in registry.get(saga.saga_type).steps if step.external]
    if not external:
        return False
    horizon = max(step.hard_limit_s for step in external) + settings.SAGA_CALL_HORIZON_S
    return SagaLog.objects.filter(
        saga=saga,
        status=SagaLog.Status.STARTED,
        started_at__gt=timezone.now() - timedelta(seconds=horizon),
    ).exists()


def _run_hook(hook, saga: Saga) -> str:
    """Run a domain hook in a savepoint; what it refused (its error), or "" if it ran.

    A hook that finds the domain in a state it does not expect raises; that
    must neither leave the saga stuck (its transaction rolled back, retried
    forever) nor pass quietly.
    """
    try:
        with transaction.atomic():
            hook(saga)
    except Exception as exc:
        logger.exception("saga %s: hook %s failed", saga.id, getattr(hook, "__name__", hook))
        return f"{getattr(hook, '__name__', 'its hook')} refused: {type(exc).__name__}: {exc}"
    return ""


def saga_fail_compensation(
    *,
    saga_id,
    failed_task_id: str = "",
    round: int = 1,
    hard_time_limit: bool = False,
    step: int | None = None,
) -> bool:
    """A compensation exhausted its retries: COMPENSATING -> FAILED; an operator must act.

    A report from an earlier ``round`` (a late copy from before an operator's
    retry) changes nothing. A compensation killed by its hard time limit is
    retried first while its budget lasts.
    """
    with transaction.atomic():
        saga = _locked(Saga.objects.filter(pk=saga_id), skip=False).first()
        if saga is None or saga.status != Status.COMPENSATING or saga.round != round:
            logger.info("saga %s: report of round %s ignored", saga_id, round)
            return False
        if step is not None and saga.undo_cursor <= step:
            logger.info(
                "saga %s: compensation %s failed in a stale copy; it is undone", saga_id, step
            )
            return False
        if hard_time_limit and _retry_after_hard_limit(
            saga_id, failed_task_id, SagaLog.Phase.COMPENSATION
        ):
            return False
        definition = registry.get(saga.saga_type)
        last = (
            SagaLog.objects.filter(
                saga=saga,
                phase=SagaLog.Phase.COMPENSATION,
                round=saga.round,
                status__in=(
                    SagaLog.Status.FAILED,
                    SagaLog.Status.RETRYING,
                    SagaLog.Status.TIMED_OUT,
                ),
            )
            .order_by("-id")
            .first()
        )
        undo_name = last.step if last else definition.steps[max(saga.undo_cursor - 1, 0)].undo_name
        error = f": {last.error}" if last and last.error else ""
        _finish(saga, Status.FAILED)
        poisoned = last is not None and "PoisonMessage" in last.error
        failed = "crashed its worker too often" if poisoned else "exhausted its retries"
        saga.failure_reason = f"compensation of {undo_name} {failed}{error}"
        saga.save(
            update_fields=["status", "failure_reason", "finished_at", "duration_ms", "updated_at"]
        )
        _mark_failed(saga, definition)
        _trace_event("fail compensation", saga, outcome="failed", reason=saga.failure_reason)
    return True


def saga_retry_compensation(*, saga_id, operator: str) -> Saga:
    """Operator action on a FAILED saga: compensate again from where it stopped."""
    with transaction.atomic():
        saga = _lock_unresolved_failure(saga_id, "retry compensation")
        definition = registry.get(saga.saga_type)
        saga.status = Status.COMPENSATING
        saga.round += 1
        saga.finished_at = None
        saga.duration_ms = None
        # A new round, a new bound: the compensation deadline runs from now.
        saga.compensation_deadline = Now() + timedelta(seconds=definition.compensation_deadline_s)
        saga.updated_at = Now()
        # An injected fault belongs to the run that failed; the operator's
        # retry runs without it, as it would after fixing a real cause.
        saga.context.pop("chaos", None)
        saga.save(
            update_fields=[
                "status",
                "round",
                "finished_at",
                "duration_ms",
                "compensation_deadline",
                "context",
                "updated_at",
            ]
        )
        # The database computed these from its clock: read them back for the caller.
        saga.refresh_from_db(fields=["compensation_deadline", "updated_at"])
        saga_log_note(saga=saga, text=f"compensation retried by {operator} (round {saga.round})")
        _after_commit(
            partial(_publish_compensation, definition, saga.id, saga.undo_cursor, saga.round),
            "publish compensation",
        )
    return saga


def saga_mark_resolved(*, saga_id, operator: str, reason: str) -> Saga:
    """Operator action on a FAILED saga: record that it was settled by hand, and how."""
    reason = (reason or "").strip()
    if not reason:
        raise InvalidSagaState("a reason is required to mark a saga resolved")
    with transaction.atomic():
        saga = _lock_unresolved_failure(saga_id, "be marked resolved")
        saga.resolved_at = timezone.now()
        saga.resolved_by = operator
        saga.resolution = reason
        saga.updated_at = Now()
        saga.save(update_fields=["resolved_at", "resolved_by", "resolution", "updated_at"])
        saga.refresh_from_db(fields=["updated_at"])
        saga_log_note(saga=saga, text=f"marked resolved by {operator}: {reason}")
    return saga


def _lock_unresolved_failure(saga_id, action: str) -> Saga:
    """The FAILED saga an operator acts on, locked; its absence or state is the operator's error."""
    saga = Saga.objects.select_for_update().filter(pk=saga_id).first()
    if saga is None:
        raise SagaNotFound(f"saga {saga_id} does not exist")
    if saga.status != Status.FAILED:
        raise InvalidSagaState(f"only FAILED sagas can {action}; this one is {saga.status}")
    if saga.is_resolved:
        raise InvalidSagaState(f"saga was already resolved by hand by {saga.resolved_by}")
    return saga


def _finish(saga: Saga, status: str) -> None:
    now = timezone.now()
    saga.status = status
    saga.finished_at = now
    saga.duration_ms = elapsed_ms(saga.started_at or saga.created_at, now)
    saga.updated_at = Now()


def saga_log_note(*, saga: Saga, text: str) -> SagaLog:
    """Append an operator's note (who did what) to the saga's history."""
    return _log_row(
        saga,
        step=saga.current_step or "-",
        step_index=0,
        phase=SagaLog.Phase.OPERATOR,
        status=SagaLog.Status.NOTE,
        error=text,
    )


def _trace_event(name: str, saga: Saga, **attributes: Any) -> None:
    """Mark a saga-level moment in the saga's trace (a span under its saga span); off: nothing."""
    if tracing.active():
        with tracing.saga_event(name, saga, **attributes):
            pass


def _log_row(saga: Saga, **fields: Any) -> SagaLog:
    """A SagaLog row the engine writes itself (no attempt ran it), stamped now."""
    now = timezone.now()
    return SagaLog.objects.create(saga=saga, started_at=now, finished_at=now, **fields)


def _after_commit(call: Callable[[], Any], what: str) -> None:
    """Run ``call`` once the transaction commits; its failure is logged, never raised.

    The caller's writes are committed by then, so whatever fails afterwards
    (the broker is down) is for the reconciler or the sweeper to mend, not an
    error of the request. Handed to Django as a named function: robust hooks
    log the callable's ``__qualname__``, which a ``partial`` lacks (Django
    ticket #36487), and would raise that AttributeError instead.
    """

    def after_commit() -> None:
        call()

    after_commit.__qualname__ = f"after commit: {what}"
    transaction.on_commit(after_commit, robust=True)


def _publish_compensation(definition: SagaDefinition, saga_id, undo: int, round: int) -> None:
    canvas.compensation_chain(definition, str(saga_id), undo, round).apply_async()


def _step_name(definition: SagaDefinition, index: int) -> str:
    if 0 <= index < len(definition.steps):
        return definition.steps[index].name
    return "-"
