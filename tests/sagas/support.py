"""Driving the step wrapper in-process, as a worker's task would."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from celery.exceptions import Retry

from sagas.models import Saga
from sagas.runtime import run_action, run_compensation


class StandInTask:
    """What the step wrapper reads from a bound Celery task: ``request`` and ``retry``.

    ``retry`` records what it was asked and hands back the ``Retry`` that
    Celery's own would raise, so the wrapper's ``raise task.retry(...)`` behaves
    as in a worker.
    """

    def __init__(self, *, retries: int = 0) -> None:
        self.request = SimpleNamespace(retries=retries, id=str(uuid.uuid4()), hostname="test@sagas")
        self.retry_calls: list[dict[str, Any]] = []

    def retry(self, **kwargs: Any) -> Retry:
        self.retry_calls.append(kwargs)
        return Retry(exc=kwargs.get("exc"), when=kwargs.get("countdown"))


def act(trip, saga: Saga, step: str, task: StandInTask | None = None) -> dict:
    """Deliver ``step``'s action of ``saga`` once, through the step wrapper."""
    return run_action(task or StandInTask(), trip, trip.index_of(step), str(saga.pk))


def undo(trip, saga: Saga, step: str, task: StandInTask | None = None) -> dict:
    """Deliver the compensation of ``step`` of ``saga`` once, through the step wrapper."""
    return run_compensation(task or StandInTask(), trip, trip.index_of(step), str(saga.pk))
