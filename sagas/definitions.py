"""Declaring saga types: ordered steps with their retry policies and timeouts.

A saga type is declared once, in an app's ``saga_steps`` module (the sagas
app imports every one of them when Django starts), with ``RetryPolicy``,
``SagaDefinition`` and ``Step`` from this module::

    trip = SagaDefinition(
        "trip_booking",
        steps=[
            Step("reserve_flight", reserve_flight, release_flight, queue="inventory"),
            Step("charge_payment", charge_payment, refund_payment, queue="payments",
                 retry=RetryPolicy(max_retries=4), timeout_s=15),
            Step("confirm_booking", confirm_booking, queue="bookings"),
        ],
        on_compensated=mark_rejected,
    )

A declaration is plain data: nothing here builds a Celery task or chain.
Once apps are ready, ``sagas.tasks`` makes each step up to two named tasks,
``<saga>.<step>`` and ``<saga>.<compensation>`` (e.g. ``trip_booking.release_hotel``),
and ``sagas.canvas`` builds chains of them by name, so Flower and the result
store show what ran. Step functions take the locked ``Saga`` row and return a
small JSON-serialisable dict (stored in SagaLog) or ``None``; a compensation
returning ``None`` found nothing to undo and is logged as skipped. An action
that returns ``None``, or a dict whose every value is an empty list, dict or
string (``{"held": []}``), had nothing to do: the saga graph says so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import OperationalError

from sagas.errors import TransientError, UnknownSagaType
from sagas.models import Saga

# Saga-level tasks (errbacks, finishing) run here; steps name their own.
SAGA_QUEUE = "sagas"
# Beat's jobs (reconciler, sweeper, retention): a queue of their own, so that a
# backlog of saga work never delays recovery (settings.MAINTENANCE_QUEUE).
MAINTENANCE_QUEUE = "maintenance"

StepFn = Callable[["Saga"], dict[str, Any] | None]
Hook = Callable[["Saga"], None]

DEFAULT_RETRY_ON: tuple[type[BaseException], ...] = (
    TransientError,
    SoftTimeLimitExceeded,
    OperationalError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How a step retries: exponential backoff with jitter, for the errors in ``retry_on``.

    Retry ``n`` (0-based) waits ``d = backoff_s * 2**n`` seconds, capped at
    ``max_backoff_s`` and at the ``SAGA_MAX_RETRY_DELAY_S`` setting, and with
    ``jitter`` a random time in ``[d/2, d]``. After ``max_retries`` retries the
    error stands: Celery calls the saga's errback and compensation begins.
    Errors not in ``retry_on`` fail the step at once.
    """

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
    """One step of a saga: an action and, optionally, the compensation that undoes it.

    - ``name``: unique within the saga; the action's task is ``<saga>.<name>``.
    - ``action(saga) -> dict | None``: runs in the step's transaction with the
      saga row locked; its writes commit together with the step's log row, so
      a redelivered message finds the step done and does nothing.
    - ``compensation(saga) -> dict | None``: undoes the action, newest step
      first; returning ``None`` means there was nothing to undo (logged
      ``skipped``). It must cope with finding no effect at all.
    - ``queue``: the Celery queue of both tasks (scale each context on its own).
    - ``retry`` / ``compensation_retry``: their :class:`RetryPolicy`.
    - ``timeout_s``: the soft time limit of one attempt; the hard limit is 5 s more.
    - ``uncertain_on``: errors after which the action may have had its effect
      (a call that left the process and whose answer was lost); such a step
      is compensated even though it failed.
    - ``compensation_name``: the compensation's name in logs, task names and
      chaos plans; by default the compensation function's ``__name__``.
    - ``external``: the action and compensation call another company's system
      (a payment gateway). They then run with no database transaction open and
      without the saga row lock, so a slow call blocks nobody; two copies may
      run at once, so every call must carry an idempotency key. The barrier
      row is written after the call, in a short transaction of its own.
    """

    name: str
    action: StepFn
    compensation: StepFn | None = None
    queue: str = "sagas"
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = COMPENSATION_RETRY
    timeout_s: int = 10
    uncertain_on: tuple[type[BaseException], ...] = ()
    compensation_name: str = ""
    external: bool = False

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
    """A saga type: its name, its ordered steps and what happens at its end.

    - ``name``: the ``saga_type`` stored on every saga of this type.
    - ``steps``: run in order; compensated newest first when one fails.
    - ``deadline_s``: a saga still running this long after it was created is
      compensated by the recovery sweeper (``saga_start`` can override it).
      By default its steps' worst case (every attempt at its hard time limit
      plus every backoff) and ``SAGA_STALL_GRACE_S``; the ``sagas.E003``
      system check refuses a shorter one.
    - ``compensation_deadline_s``: how long compensating may take from the
      moment it begins (each operator retry starts the clock again); past it
      the sweeper ends the saga FAILED for an operator. By default the
      compensations' worst case and ``SAGA_STALL_GRACE_S``.
    - ``on_compensated(saga)`` / ``on_failed(saga)``: domain hooks run in the
      transaction that moves the saga to COMPENSATED or FAILED.
    - ``harness``: dotted path of the type's chaos and bench plug-in (a
      :class:`sagas.harness.SagaHarness` subclass), loaded only by the
      ``chaos`` and ``bench`` commands, never by web or worker processes.

    Declaring it registers it in :data:`registry`; a second type of the same
    name is refused.
    """

    def __init__(
        self,
        name: str,
        *,
        steps: list[Step],
        deadline_s: int | None = None,
        compensation_deadline_s: int | None = None,
        on_compensated: Hook | None = None,
        on_failed: Hook | None = None,
        harness: str = "",
    ) -> None:
        names = [step.name for step in steps] + [s.undo_name for s in steps if s.compensation]
        if not steps:
            raise ValueError(f"saga {name!r} has no steps")
        if len(set(names)) != len(names):
            raise ValueError(f"saga {name!r} repeats a step or compensation name: {names}")
        self.name = name
        self.steps = tuple(steps)
        self._deadline_s = deadline_s
        self._compensation_deadline_s = compensation_deadline_s
        self.on_compensated = on_compensated
        self.on_failed = on_failed
        self.harness = harness
        registry.register(self)

    def __repr__(self) -> str:
        return f"<SagaDefinition {self.name}: {' -> '.join(s.name for s in self.steps)}>"

    def worst_case_s(self, phase: str = "action") -> float:
        """How long every action (or every compensation) can take, retries and backoffs included."""
        if phase == "action":
            return sum(step.retry.worst_case_s(step.hard_limit_s) for step in self.steps)
        return sum(
            step.compensation_retry.worst_case_s(step.hard_limit_s)
            for step in self.steps
            if step.compensation is not None
        )

    @property
    def deadline_s(self) -> int:
        if self._deadline_s is not None:
            return self._deadline_s
        return math.ceil(self.worst_case_s("action") + settings.SAGA_STALL_GRACE_S)

    @property
    def compensation_deadline_s(self) -> int:
        if self._compensation_deadline_s is not None:
            return self._compensation_deadline_s
        return math.ceil(self.worst_case_s("compensation") + settings.SAGA_STALL_GRACE_S)

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

    # --- task names --------------------------------------------------------------
    def action_task_name(self, index: int) -> str:
        """``<saga>.<step>``, e.g. ``trip_booking.reserve_hotel``."""
        return f"{self.name}.{self.steps[index].name}"

    def compensation_task_name(self, index: int) -> str:
        """``<saga>.<compensation>``, e.g. ``trip_booking.release_hotel``."""
        step = self.steps[index]
        if step.compensation is None:
            raise ValueError(f"step {step.name!r} of saga {self.name!r} has no compensation")
        return f"{self.name}.{step.undo_name}"


class Registry:
    """Every declared saga type, by name."""

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

    def all(self) -> list[SagaDefinition]:
        return [self._definitions[name] for name in self.names()]


registry = Registry()
