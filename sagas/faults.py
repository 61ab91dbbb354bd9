"""Faults injected into one saga, read from its own context (``context["chaos"]``).

The step wrapper calls ``before_action`` / ``before_compensation`` before each
step body; the chaos harness (``sagas.chaos``) and the API write the plans.

The plan is written when the saga starts, by code that was allowed to (the
API checks SAGA_CHAOS_ENABLED or staff; the chaos command owns its sagas), so
a worker needs no global switch and every fault is tied to one saga:

    {
        "fail": ["reserve_car"],                  # action fails permanently
        "transient": {"reserve_hotel": 2},        # first 2 attempts fail, then it works
        "compensation_fail": ["release_hotel"],   # compensation always fails
        "compensation_transient": {"refund_payment": 1},
        "delay_ms": {"reserve_hotel": 200},       # sleep before the action (or compensation)
        "crash": ["reserve_car", "release_hotel"],  # kill the worker process, first delivery
    }

A ``crash`` ends the process running the step with ``os._exit`` on the
step's first delivery, as a segfault or an OOM kill would: the broker hands
the message out again (``task_reject_on_worker_lost``) and the copy, no
longer a first delivery, runs normally.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

from sagas.errors import ChaosFailure, ChaosTransientError
from sagas.models import Saga

PLAN_KEYS = frozenset(
    {"fail", "transient", "compensation_fail", "compensation_transient", "delay_ms", "crash"}
)
# The exit status of a process a ``crash`` fault ended (EX_SOFTWARE).
CRASH_EXIT_STATUS = 70


def validate_plan(plan: Any, *, actions: list[str], compensations: list[str]) -> dict[str, Any]:
    """Return the plan if it names only known keys and steps; else ValueError naming the problem."""
    if not isinstance(plan, dict):
        raise ValueError("chaos must be an object")
    unknown = set(plan) - PLAN_KEYS
    if unknown:
        raise ValueError(f"unknown chaos keys {sorted(unknown)}; allowed: {sorted(PLAN_KEYS)}")
    for key, value in plan.items():
        if key in {"fail", "compensation_fail", "crash"}:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"chaos.{key} must be a list of step names")
            names = value
        else:
            if not isinstance(value, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value.values()
            ):
                raise ValueError(f"chaos.{key} must map step names to whole numbers >= 0")
            names = list(value)
        known = compensations if key.startswith("compensation") else actions
        if key in {"delay_ms", "crash"}:
            known = actions + compensations
        bad = [name for name in names if name not in known]
        if bad:
            raise ValueError(f"chaos.{key} names unknown steps {bad}; known: {known}")
    return plan


def before_action(saga: Saga, step: str, attempt: int, *, first_delivery: bool = True) -> None:
    """Inject the plan's faults for action ``step``.

    ``first_delivery``: this is the message's first delivery (attempt 1, not
    redelivered); only then does a planned crash happen.
    """
    plan = saga.context.get("chaos")
    if not plan:
        return
    _maybe_crash(plan, step, first_delivery=first_delivery)
    _maybe_delay(plan, step)
    if step in plan.get("fail", ()):
        raise ChaosFailure(f"chaos: {step} fails")
    if attempt <= plan.get("transient", {}).get(step, 0):
        raise ChaosTransientError(f"chaos: {step} fails transiently (attempt {attempt})")


def before_compensation(
    saga: Saga, step: str, attempt: int, *, first_delivery: bool = True
) -> None:
    """Inject the plan's faults for compensation ``step`` (see ``before_action``)."""
    plan = saga.context.get("chaos")
    if not plan:
        return
    _maybe_crash(plan, step, first_delivery=first_delivery)
    _maybe_delay(plan, step)
    if step in plan.get("compensation_fail", ()):
        raise ChaosFailure(f"chaos: compensation of {step} fails")
    if attempt <= plan.get("compensation_transient", {}).get(step, 0):
        raise ChaosTransientError(
            f"chaos: compensation of {step} fails transiently (attempt {attempt})"
        )


def _maybe_delay(plan: dict[str, Any], step: str) -> None:
    delay_ms = plan.get("delay_ms", {}).get(step)
    if delay_ms:
        time.sleep(delay_ms / 1000)


def _maybe_crash(plan: dict[str, Any], step: str, *, first_delivery: bool) -> None:
    if not first_delivery or step not in plan.get("crash", ()):
        return
    # Whatever was logged so far reaches the log; then the process is gone at
    # once, with no exception handler, atexit hook or broker acknowledgement.
    logging.getLogger(__name__).warning("chaos: %s crashes its worker process", step)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(CRASH_EXIT_STATUS)
