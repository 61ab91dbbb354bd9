"""The bookings context's Celery tasks: its maintenance jobs (its saga steps live in saga_steps)."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from bookings import retention
from sagas.retention import task_time_limits

_RETENTION_SOFT_LIMIT_S, _RETENTION_HARD_LIMIT_S = task_time_limits(
    getattr(settings, "SAGA_RETENTION_MAX_S", 20)
)


@shared_task(
    name="bookings.purge_idempotency_keys",
    acks_late=True,
    soft_time_limit=_RETENTION_SOFT_LIMIT_S,
    time_limit=_RETENTION_HARD_LIMIT_S,
)
def purge_idempotency_keys(**_ignored: Any) -> dict[str, int]:
    return retention.idempotency_keys_purge()
