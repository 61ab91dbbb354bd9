"""Declaring saga types: ordered steps with their tasks, retry policies and timeouts.

    trip = SagaDefinition(
        "trip_booking",
        steps=[
            Step("reserve_flight", action=reserve_flight, compensation=release_flight,
                 queue="inventory"),
            ...
        ],
        on_compensated=mark_rejected,
    )

Each step becomes up to two named Celery tasks, ``<saga>.<step>`` and
``<saga>.<compensation>`` (e.g. ``trip_booking.release_hotel``), routed to
the step's queue, so Flower and the result store show what ran. Step
functions take the locked ``Saga`` row and return a small JSON-serialisable
dict (stored in SagaLog) or ``None``; a compensation returning ``None`` found
nothing to undo and is logged as skipped.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import chain, shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError

from sagas.errors import TransientError, UnknownSagaType

if TYPE_CHECKING:
    from celery.canvas import Signature

    from sagas.models import Saga

# Saga-level tasks (errbacks, finishing, reconciling) run here; steps name their own.
SAGA_QUEUE = "sagas"

StepFn = Callable[["Saga"], dict[str, Any] | None]
Hook = Callable[["Saga"], None]

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (
    TransientError,
    SoftTimeLimitExceeded,
    OperationalError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits in [d/2, d], d = base * 2**n."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = DEFAULT_RETRY_ON

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be 0 or more")
        if self.backoff_s <= 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("backoff_s must be positive and at most max_backoff_s")

    def delay(self, retries: int) -> float:
        cap = min(self.max_backoff_s, float(settings.SAGA_MAX_RETRY_DELAY_S))
        delay = min(cap, self.backoff_s * (2**retries))
        delay *= getattr(settings, "SAGA_RETRY_DELAY_SCALE", 1.0)
        if self.jitter:
            delay = random.uniform(delay / 2, delay)
        return round(delay, 3)

    def retries(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on)

    def worst_case_s(self, attempt_limit_s: float) -> float:
        """How long every attempt plus every backoff can take: after that, nothing is coming."""
        cap = min(self.max_backoff_s, float(settings.SAGA_MAX_RETRY_DELAY_S))
        delays = sum(min(cap, self.backoff_s * (2**n)) for n in range(self.max_retries))
        return (self.max_retries + 1) * attempt_limit_s + delays


# Compensations must finish: every error is worth another try until the budget runs out.
COMPENSATION_RETRY = RetryPolicy(max_retries=5, backoff_s=0.5, retry_on=(Exception,))


@dataclass(frozen=True)
class Step:
    name: str
    action: StepFn
    compensation: StepFn | None = None
    queue: str = "sagas"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = COMPENSATION_RETRY
    timeout_s: int = 10
    # Errors after which the action may have had its effect (a request that left
    # the process and timed out): when retries run out, it is compensated too.
    uncertain_on: tuple[type[BaseException], ...] = ()
    # The compensation's name in logs, task names and chaos plans; defaults to
    # the compensation function's name (e.g. "release_hotel").
    compensation_name: str = ""

    @property
    def hard_limit_s(self) -> int:
        return self.timeout_s + 5

    def stall_after_s(self, phase: str) -> float:
        """No progress for this long means the step's messages were lost, not slow."""
        policy = self.retry if phase == "action" else self.compensation_retry
        return policy.worst_case_s(self.hard_limit_s) + settings.SAGA_STALL_GRACE_S

    @property
    def undo_name(self) -> str:
        if self.compensation is None:
            return ""
        return self.compensation_name or self.compensation.__name__


class SagaDefinition:
    def __init__(
        self,
        name: str,
        *,
        steps: list[Step],
        deadline_s: int = 300,
        on_compensated: Hook | None = None,
        on_failed: Hook | None = None,
    ) -> None:
        names = [step.name for step in steps] + [s.undo_name for s in steps if s.compensation]
        if not steps:
            raise ValueError(f"saga {name!r} has no steps")
        if len(set(names)) != len(names):
            raise ValueError(f"saga {name!r} repeats a step or compensation name: {names}")
        self.name = name
        self.steps = tuple(steps)
        self.deadline_s = deadline_s
        self.on_compensated = on_compensated
        self.on_failed = on_failed
        self.action_tasks = [self._action_task(i) for i in range(len(steps))]
        self.compensation_tasks = [
            self._compensation_task(i) if step.compensation else None
            for i, step in enumerate(steps)
        ]
        registry.register(self)

    def __repr__(self) -> str:
        return f"<SagaDefinition {self.name}: {' -> '.join(s.name for s in self.steps)}>"

    @property
    def action_names(self) -> list[str]:
        return [step.name for step in self.steps]

    @property
    def compensation_names(self) -> list[str]:
        return [step.undo_name for step in self.steps if step.compensation]

    def next_to_undo(self, undo_cursor: int) -> int | None:
        """The newest step below the cursor that has a compensation, if any."""
        for index in reversed(range(min(undo_cursor, len(self.steps)))):
            if self.steps[index].compensation is not None:
                return index
        return None

    def index_of(self, step_name: str) -> int:
        for index, step in enumerate(self.steps):
            if step.name == step_name:
                return index
        raise KeyError(f"saga {self.name!r} has no step {step_name!r}")

    # --- signatures ------------------------------------------------------------
    def action_signature(self, index: int, saga_id: str) -> Signature:
        from sagas.tasks import step_failed

        step = self.steps[index]
        return (
            self.action_tasks[index]
            .si(saga_id=saga_id)
            .set(queue=step.queue)
            .on_error(step_failed.s(saga_id=saga_id).set(queue=SAGA_QUEUE))
        )

    def compensation_signature(self, index: int, saga_id: str) -> Signature:
        from sagas.tasks import compensation_failed

        task = self.compensation_tasks[index]
        if task is None:
            raise ValueError(f"step {self.steps[index].name!r} has no compensation")
        return (
            task.si(saga_id=saga_id)
            .set(queue=self.steps[index].queue)
            .on_error(compensation_failed.s(saga_id=saga_id).set(queue=SAGA_QUEUE))
        )

    def action_chain(self, saga_id: str, start: int = 0) -> Signature:
        """The actions from ``start`` on: 0 to run a saga, ``steps_done`` to resume one."""
        return chain(*(self.action_signature(i, saga_id) for i in range(start, len(self.steps))))

    def compensation_chain(self, saga_id: str, undo_count: int) -> Signature:
        """Compensations of steps ``undo_count - 1`` down to 0, newest first, then finish."""
        from sagas.tasks import finish_compensation

        signatures = [
            self.compensation_signature(i, saga_id)
            for i in reversed(range(undo_count))
            if self.compensation_tasks[i] is not None
        ]
        signatures.append(finish_compensation.si(saga_id=saga_id).set(queue=SAGA_QUEUE))
        return chain(*signatures)

    # --- tasks -----------------------------------------------------------------
    def _task_options(self, step: Step) -> dict[str, Any]:
        return {
            "bind": True,
            "soft_time_limit": step.timeout_s,
            "time_limit": step.hard_limit_s,
            "acks_late": True,
            "reject_on_worker_lost": True,
            # SagaLog records every attempt; a stored result per step would
            # write it twice. Failures are still stored (task_store_errors_even_if_ignored).
            "ignore_result": not getattr(settings, "SAGA_STORE_STEP_RESULTS", False),
        }

    def _action_task(self, index: int):
        from sagas.runtime import run_action

        step = self.steps[index]
        definition = self

        def action(task, *, saga_id: str, **_ignored: Any) -> dict[str, Any]:
            return run_action(task, definition, index, saga_id)

        action.__doc__ = f"Action of step {step.name!r} of saga {self.name!r}."
        return shared_task(name=f"{self.name}.{step.name}", **self._task_options(step))(action)

    def _compensation_task(self, index: int):
        from sagas.runtime import run_compensation

        step = self.steps[index]
        definition = self

        def compensate(task, *, saga_id: str, **_ignored: Any) -> dict[str, Any]:
            return run_compensation(task, definition, index, saga_id)

        compensate.__doc__ = f"{step.undo_name}: undoes {step.name!r} of saga {self.name!r}."
        return shared_task(name=f"{self.name}.{step.undo_name}", **self._task_options(step))(
            compensate
        )


class Registry:
    def __init__(self) -> None:
        self._definitions: dict[str, SagaDefinition] = {}

    def register(self, definition: SagaDefinition) -> None:
        existing = self._definitions.get(definition.name)
        if existing is not None and existing is not definition:
            raise ValueError(f"saga type {definition.name!r} is defined twice")
        self._definitions[definition.name] = definition

    def get(self, name: str) -> SagaDefinition:
        try:
            return self._definitions[name]
        except KeyError:
            raise UnknownSagaType(
                f"unknown saga type {name!r}; known: {sorted(self._definitions)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._definitions)


registry = Registry()
