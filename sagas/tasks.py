"""The engine's Celery tasks: every saga type's step tasks, the errbacks, finishing, recovery.

This is the only module of the engine's product path that creates tasks (the
bench's no-op task in ``sagas/bench/tasks.py`` is loaded by bench workers
alone, with ``--include``). Step tasks are
made from the registry by :func:`register_step_tasks`, which the sagas app
calls once every app's ``saga_steps`` module is imported; declaring a saga
type builds none.

The errbacks are declared ``bind=True`` so Celery queues them as tasks of
their own (visible in Flower and the result store) with the failed task's id
as first argument, instead of running them inline in the failing process.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.exceptions import TimeLimitExceeded
from django.conf import settings

from sagas import retention, services
from sagas.canvas import COMPENSATION_FAILED, FINISH_COMPENSATION, STEP_FAILED
from sagas.definitions import SagaDefinition, Step, registry
from sagas.errors import DATABASE_UNAVAILABLE
from sagas.runtime import run_action, run_compensation

# Saga-level tasks (errbacks, finishing, recovery) retry database errors (a
# restart, a dropped session, a locked row they will not wait for) with
# backoff: losing one would leave its saga to the sweeper.
SAGA_TASK_OPTIONS = {
    "acks_late": True,
    "autoretry_for": DATABASE_UNAVAILABLE,
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 20,
}


@shared_task(bind=True, name=STEP_FAILED, **SAGA_TASK_OPTIONS)
def step_failed(
    self, failed_task_id: str = "", *, saga_id: str, step: int | None = None, **_ignored: Any
) -> bool:
    return services.saga_action_failed(
        saga_id=saga_id,
        failed_task_id=failed_task_id,
        hard_time_limit=_hit_hard_time_limit(self.app, failed_task_id),
        step=step,
    )


@shared_task(bind=True, name=COMPENSATION_FAILED, **SAGA_TASK_OPTIONS)
def compensation_failed(
    self,
    failed_task_id: str = "",
    *,
    saga_id: str,
    round: int = 1,
    step: int | None = None,
    **_ignored: Any,
) -> bool:
    return services.saga_fail_compensation(
        saga_id=saga_id,
        failed_task_id=failed_task_id,
        round=round,
        hard_time_limit=_hit_hard_time_limit(self.app, failed_task_id),
        step=step,
    )


@shared_task(name=FINISH_COMPENSATION, **SAGA_TASK_OPTIONS)
def finish_compensation(*, saga_id: str, **_ignored: Any) -> bool:
    # Its ``round`` argument is for the record: finishing needs nothing left to undo.
    return services.saga_finish_compensation(saga_id=saga_id)


def _hit_hard_time_limit(app, failed_task_id: str) -> bool:
    """Whether the failed task was killed by its hard time limit (its stored error says so).

    Celery fails such a task without a retry, whatever its policy; the
    services then retry it themselves. A result that cannot be read is no
    hard limit.
    """
    if not failed_task_id:
        return False
    try:
        return isinstance(app.AsyncResult(failed_task_id).result, TimeLimitExceeded)
    except Exception:  # a missing or unreadable result: an ordinary failure
        return False


@shared_task(name="sagas.reconcile_pending", **SAGA_TASK_OPTIONS)
def reconcile_pending(**_ignored: Any) -> int:
    return services.sagas_reconcile_pending()


@shared_task(
    name="sagas.recover_stalled",
    # A sweep stops taking batches after SAGA_SWEEP_BUDGET_S: room to finish the last one.
    soft_time_limit=settings.SAGA_SWEEP_BUDGET_S + 20,
    time_limit=settings.SAGA_SWEEP_BUDGET_S + 30,
    **SAGA_TASK_OPTIONS,
)
def recover_stalled(**_ignored: Any) -> dict[str, int]:
    return services.sagas_recover_stalled()


# --- step tasks ------------------------------------------------------------------

_registered: set[str] = set()


def register_step_tasks() -> list[str]:
    """Create the action and compensation tasks of every registered saga type.

    Idempotent: a type registered earlier keeps its tasks. Returns the names
    created by this call.
    """
    created = []
    for definition in registry.all():
        for index, step in enumerate(definition.steps):
            name = definition.action_task_name(index)
            if name not in _registered:
                _step_task(name, definition, index, step, run_action)
                created.append(name)
            if step.compensation is None:
                continue
            name = definition.compensation_task_name(index)
            if name not in _registered:
                _step_task(name, definition, index, step, run_compensation)
                created.append(name)
    _registered.update(created)
    return created


def _step_task(name: str, definition: SagaDefinition, index: int, step: Step, run) -> None:
    def step_task(task, *, saga_id: str, **options: Any) -> dict[str, Any]:
        if run is run_compensation:
            return run(task, definition, index, saga_id, round=options.get("round", 1))
        return run(task, definition, index, saga_id)

    step_task.__name__ = name.rsplit(".", 1)[1]
    step_task.__qualname__ = name
    step_task.__doc__ = (
        f"Action of step {step.name!r} of saga {definition.name!r}."
        if run is run_action
        else f"{step.undo_name}: undoes {step.name!r} of saga {definition.name!r}."
    )
    shared_task(
        name=name,
        bind=True,
        soft_time_limit=step.timeout_s,
        time_limit=step.hard_limit_s,
        acks_late=True,
        reject_on_worker_lost=True,
        # SagaLog records every attempt; a stored result per step would write
        # it twice. Failures are still stored (task_store_errors_even_if_ignored).
        ignore_result=not getattr(settings, "SAGA_STORE_STEP_RESULTS", False),
    )(step_task)


# --- retention ----------------------------------------------------------------------

_RETENTION_SOFT_LIMIT_S, _RETENTION_HARD_LIMIT_S = retention.task_time_limits(
    getattr(settings, "SAGA_RETENTION_MAX_S", 20)
)


@shared_task(
    name="sagas.purge_expired",
    acks_late=True,
    soft_time_limit=_RETENTION_SOFT_LIMIT_S,
    time_limit=_RETENTION_HARD_LIMIT_S,
)
def purge_expired(**_ignored: Any) -> dict[str, int]:
    return retention.sagas_purge_expired()
