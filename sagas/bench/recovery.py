"""How fast the sweeper moves on sagas whose messages the broker lost (``bench --scale``).

``--stalled N`` (default 10,000) writes N RUNNING sagas of a saga type of the
bench's own (``bench_recovery``: one step on the ``bench-recovery`` queue,
which no worker consumes), quiet for an hour and with no message anywhere,
which is what a flushed broker leaves behind. Then it calls the sweeper
(``sagas_recover_stalled``, for that type alone: the sagas of the database
are left as they are) back to back, as beat would at its interval,
until every one of them was claimed and its chain published again, and
reports the time. The run's sagas and their messages are deleted afterwards.
The target: 10,000 within 120 s.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from typing import Any

import redis
from celery import current_app
from django.db import transaction
from django.utils import timezone

from sagas.bench.workers import BenchError
from sagas.definitions import SagaDefinition, Step, registry
from sagas.errors import UnknownSagaType
from sagas.models import Saga
from sagas.services import sagas_recover_stalled
from sagas.tasks import register_step_tasks

RECOVERY_TYPE = "bench_recovery"
RECOVERY_QUEUE = "bench-recovery"
TARGET_S = 120.0
BATCH = 2_000


def _noop(saga: Saga) -> dict:
    return {}


def recovery_definition() -> SagaDefinition:
    """The bench's saga type, declared in this process only (no worker ever runs it)."""
    try:
        return registry.get(RECOVERY_TYPE)
    except UnknownSagaType:
        definition = SagaDefinition(
            RECOVERY_TYPE, steps=[Step("probe", _noop, queue=RECOVERY_QUEUE)]
        )
        register_step_tasks()
        return definition


def run_recovery(*, stalled: int, timeout: float, echo) -> dict[str, Any]:
    definition = recovery_definition()
    run = uuid.uuid4().hex[:8]
    key = f"bench-recovery:{run}"
    client = redis.Redis.from_url(current_app.conf.broker_url)
    echo(f"writing {stalled:,} stalled sagas (no message in the broker)")
    long_ago = timezone.now() - timedelta(hours=1)
    later = timezone.now() + timedelta(hours=1)
    for start in range(0, stalled, BATCH):
        with transaction.atomic():
            Saga.objects.bulk_create(
                Saga(
                    saga_type=definition.name,
                    business_key=key,
                    status=Saga.Status.RUNNING,
                    created_at=long_ago,
                    updated_at=long_ago,
                    started_at=long_ago,
                    deadline=later,
                )
                for _ in range(min(BATCH, stalled - start))
            )
    mine = Saga.objects.filter(business_key=key)
    try:
        echo("sweeping until every one of them moved on")
        began = time.monotonic()
        sweeps, resumed = 0, 0
        while mine.filter(updated_at__lt=long_ago + timedelta(minutes=1)).exists():
            if time.monotonic() - began > timeout:
                raise BenchError(f"the sweeper had not moved every stalled saga on in {timeout}s")
            resumed += sagas_recover_stalled(saga_types=[RECOVERY_TYPE])["resumed"]
            sweeps += 1
        elapsed = time.monotonic() - began
        published = client.llen(RECOVERY_QUEUE)
    finally:
        client.delete(RECOVERY_QUEUE)
        mine.delete()
    return {
        "stalled": stalled,
        "resumed": resumed,
        "republished_messages": published,
        "sweeps": sweeps,
        "seconds": round(elapsed, 2),
        "per_second": round(resumed / elapsed, 1) if elapsed else None,
        "target_s": TARGET_S,
        "pass": resumed == stalled and elapsed <= TARGET_S,
    }
