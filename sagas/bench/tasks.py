"""Celery's own floor for the bench: chains of no-op tasks, one per step of a saga type.

Only the bench's worker imports this module (``celery worker --include``) and
consumes ``BENCH_QUEUE``, where the bench's own chains (no-op and bare) go:
production workers never register these tasks, and a foreign worker on the
same broker (``--allow-foreign-workers``) never receives one.
"""

from __future__ import annotations

import time
from typing import Any

from celery import chain, shared_task
from celery.canvas import Signature
from django.conf import settings

from sagas.definitions import SagaDefinition

NOOP = "bench.noop"
BENCH_QUEUE = "bench"


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


def noop_chain(definition: SagaDefinition, *, last_task_id: str) -> Signature:
    """One no-op task per step of ``definition``, touching no table."""
    signatures = [noop.si(step=step.name).set(queue=BENCH_QUEUE) for step in definition.steps]
    signatures[-1] = signatures[-1].set(task_id=last_task_id, ignore_result=False)
    return chain(*signatures)
