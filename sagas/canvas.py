"""The chain builder: a saga's steps as Celery signatures, named, never imported.

Signatures name their tasks (``trip_booking.reserve_hotel``,
``sagas.step_failed``) instead of holding task objects, so building a chain
needs no task to exist in this process: the worker that runs it has them
(``sagas.tasks`` registers them there). Every signature is immutable and
carries the saga id explicitly; nothing relies on ``root_id``, headers or
stamping, which chains do not carry reliably.

Every action carries ``link_error`` to ``sagas.step_failed`` and every
compensation to ``sagas.compensation_failed``, both bound tasks, so Celery
queues them as tasks of their own after the last retry. The errback's
arguments name the step (and the compensation round), so a report from a
stale copy of a step the saga has passed changes nothing.
"""

from __future__ import annotations

from celery import chain, current_app, signature
from celery.canvas import Signature

from sagas.definitions import SAGA_QUEUE, SagaDefinition
from sagas.errors import StepTaskMissing

STEP_FAILED = "sagas.step_failed"
COMPENSATION_FAILED = "sagas.compensation_failed"
FINISH_COMPENSATION = "sagas.finish_compensation"


def saga_task(name: str, saga_id: str, **kwargs) -> Signature:
    """A saga-level task (errback, finish) for one saga, on the saga queue."""
    return signature(name, kwargs={"saga_id": saga_id, **kwargs}, queue=SAGA_QUEUE)


def action_signature(definition: SagaDefinition, index: int, saga_id: str) -> Signature:
    """Step ``index``'s action for one saga, with its errback."""
    return _step(definition.action_task_name(index), definition, index, saga_id, STEP_FAILED)


def compensation_signature(
    definition: SagaDefinition, index: int, saga_id: str, round: int = 1
) -> Signature:
    """Step ``index``'s compensation in compensation round ``round``, with its errback."""
    name = definition.compensation_task_name(index)
    return _step(name, definition, index, saga_id, COMPENSATION_FAILED, round=round)


def _step(name: str, definition: SagaDefinition, index: int, saga_id: str, errback: str, **kwargs):
    if name not in current_app.tasks:
        # Published by name it would still go out, without the step's time
        # limits and options, and no worker would know it: refuse it here.
        raise StepTaskMissing(
            f"task {name} is not registered: declare saga type {definition.name!r} in an "
            "installed app's saga_steps module (its tasks are made once apps are ready), "
            "or call sagas.tasks.register_step_tasks() after declaring it"
        )
    return signature(
        name,
        kwargs={"saga_id": saga_id, **kwargs},
        immutable=True,
        queue=definition.steps[index].queue,
    ).on_error(saga_task(errback, saga_id, **kwargs, step=index))


def action_chain(definition: SagaDefinition, saga_id: str, start: int = 0) -> Signature:
    """The actions from ``start`` on: 0 to run a saga, ``steps_done`` to resume one."""
    return chain(
        *(action_signature(definition, i, saga_id) for i in range(start, len(definition.steps)))
    )


def compensation_chain(
    definition: SagaDefinition, saga_id: str, undo_count: int, round: int = 1
) -> Signature:
    """Compensations of steps ``undo_count - 1`` down to 0, newest first, then the finish.

    Every signature carries the compensation ``round``, so a failure reported
    by an earlier round's message is told apart from the current one's.
    """
    signatures = [
        compensation_signature(definition, i, saga_id, round)
        for i in reversed(range(undo_count))
        if definition.steps[i].compensation is not None
    ]
    signatures.append(saga_task(FINISH_COMPENSATION, saga_id, round=round).set(immutable=True))
    return chain(*signatures)
