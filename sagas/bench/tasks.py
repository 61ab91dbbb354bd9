"""Celery's own floor for the bench: chains of no-op tasks, one per step of a saga type.

Only the bench's worker imports this module (``celery worker --include``) and
consumes ``BENCH_QUEUE``, where the bench's own chains (no-op and bare) go:
production workers never register these tasks, and a foreign worker on the
same broker (``--allow-foreign-workers``) never receives one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import chain, current_app, shared_task, signature
from celery.canvas import Signature
from celery.signals import worker_init
from django.conf import settings

from sagas.definitions import SagaDefinition

NOOP = "bench.noop"
NOOP_FAILED = "bench.noop_failed"
BENCH_QUEUE = "bench"
# ``manage.py bench --hops`` starts workers with this set to what the variant
# changes (a JSON object): see :func:`_apply_variant`.
VARIANT_ENV = "BENCH_WORKER_VARIANT"


@shared_task(
    name=NOOP,
    acks_late=True,
    reject_on_worker_lost=True,
    # As saga steps: no stored result, except the chain's last task, whose
    # result carries the time the bench measures to.
    ignore_result=not getattr(settings, "SAGA_STORE_STEP_RESULTS", False),
)
def noop(**_ignored: Any) -> dict[str, Any]:
    return {"done_at": time.time()}


@shared_task(bind=True, name=NOOP_FAILED, acks_late=True)
def noop_failed(self, failed_task_id: str = "", **_ignored: Any) -> None:
    """The errback a no-op chain may carry, shaped like the saga's; no-op tasks never fail."""


def noop_chain(
    definition: SagaDefinition, *, last_task_id: str, link_error: bool = False
) -> Signature:
    """One no-op task per step of ``definition``, touching no table.

    With ``link_error`` every task carries an errback as a saga step does,
    so its messages have the saga's shape.
    """
    signatures = []
    for index, step in enumerate(definition.steps):
        sig = noop.si(step=step.name).set(queue=BENCH_QUEUE)
        if link_error:
            sig = sig.on_error(signature(NOOP_FAILED, kwargs={"step": index}, queue=BENCH_QUEUE))
        signatures.append(sig)
    signatures[-1] = signatures[-1].set(task_id=last_task_id, ignore_result=False)
    return chain(*signatures)


@worker_init.connect
def _apply_variant(sender: Any = None, **_kwargs: Any) -> None:
    """A ``--hops`` variant: change one piece of per-task machinery before the worker starts.

    ``worker_init`` comes after the worker read its settings and before its
    consumer and pool exist, so the worker's own attributes are what count.
    Unset (every worker but ``--hops``'), nothing changes.
    """
    variant = json.loads(os.environ.get(VARIANT_ENV) or "{}")
    if not variant or sender is None:
        return
    task = current_app.tasks[NOOP]
    if "task_events" in variant:
        sender.task_events = variant["task_events"]
        current_app.conf.worker_send_task_events = variant["task_events"]
    if "disable_rate_limits" in variant:
        sender.disable_rate_limits = variant["disable_rate_limits"]
    if "acks_late" in variant:
        task.acks_late = variant["acks_late"]
    if "store_results" in variant:
        task.ignore_result = not variant["store_results"]
