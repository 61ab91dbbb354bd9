"""Retention: deletes the engine's rows that outlived their use, in short batches.

Beat runs :func:`sagas_purge_expired` on the maintenance queue (README, "Retention"):

- django-celery-results' ``TaskResult`` rows older than ``SAGA_RETENTION_TASK_RESULTS_S``;
- opt-in, terminal sagas older than ``SAGA_RETENTION_SAGAS_DAYS``, with their SagaLog
  rows. An unresolved FAILED saga waits for an operator and is never deleted.

Every batch is its own short transaction: select up to ``SAGA_RETENTION_BATCH``
primary keys oldest first (by an indexed date column), lock them, delete them.
A run stops once ``SAGA_RETENTION_MAX_S`` is spent and reports how many rows are
still due; the next run continues, so no statement ever holds locks on a
whole table's worth of rows (Celery's own ``backend_cleanup`` is one DELETE).

Domain rows reference sagas by id only. A domain that still needs some
terminal sagas (to act on them later) keeps them with :func:`keep_sagas`.
:func:`delete_in_batches` is public: domains purge their own rows with it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone
from django_celery_results.models import TaskResult

from sagas.models import Saga, SagaLog

logger = logging.getLogger(__name__)

SagaFilter = Callable[[QuerySet[Saga]], QuerySet[Saga]]
_saga_filters: list[SagaFilter] = []


def keep_sagas(narrow: SagaFilter) -> SagaFilter:
    """Register a domain's say over which expired sagas may go (usable as a decorator).

    ``narrow`` receives the queryset of sagas due for deletion and returns the
    part of it the domain lets go, e.g. with ``.exclude(Exists(...))`` on its
    own rows that still need the saga. It runs inside every batch's query, so
    it must stay a queryset filter (no Python-side loops). Registering the same
    function twice has no further effect.
    """
    if narrow not in _saga_filters:
        _saga_filters.append(narrow)
    return narrow


def int_setting(name: str, default: int, *, minimum: int) -> int:
    """A whole-number setting, validated when a run starts (settings may be overridden)."""
    value = getattr(settings, name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ImproperlyConfigured(f"{name}={value!r} is not a whole number")
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={value} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class RetentionSettings:
    batch_size: int
    max_seconds: int
    task_results_s: int
    sagas_days: int

    @classmethod
    def load(cls) -> RetentionSettings:
        return cls(
            batch_size=int_setting("SAGA_RETENTION_BATCH", 1000, minimum=1),
            max_seconds=int_setting("SAGA_RETENTION_MAX_S", 20, minimum=1),
            task_results_s=int_setting("SAGA_RETENTION_TASK_RESULTS_S", 86_400, minimum=3600),
            sagas_days=int_setting("SAGA_RETENTION_SAGAS_DAYS", 0, minimum=0),
        )


def task_time_limits(max_seconds: int) -> tuple[int, int]:
    """Soft and hard time limits of a retention task whose runs stop after ``max_seconds``.

    A run stops itself; the limits only catch one batch that hangs (each
    statement is bounded by ``statement_timeout`` on PostgreSQL as well).
    """
    return max_seconds + 20, max_seconds + 30


class Budget:
    """The time one run may spend deleting (monotonic, so clock changes do not matter)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    @property
    def spent(self) -> bool:
        return time.monotonic() >= self.deadline


@dataclass
class Purged:
    """What a purge deleted (rows per model label), in how many batches, and what is still due."""

    deleted: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    left: int = 0

    def __iadd__(self, other: Purged) -> Purged:
        self.deleted.update(other.deleted)
        self.batches += other.batches
        self.left += other.left
        return self


def delete_in_batches(rows: QuerySet, *, by: str, batch_size: int, budget: Budget) -> Purged:
    """Delete ``rows`` oldest first by the indexed date column ``by``, in batches.

    Each batch is one transaction: select up to ``batch_size`` primary keys
    (``FOR UPDATE SKIP LOCKED`` where supported, so two runs share the work
    and a row being changed right now waits for the next run), then delete
    those that still match ``rows``, cascades included. At least one batch
    runs whatever the budget, so every run makes progress; once the budget is
    spent the rows still due are counted into ``left``.

    The next batch starts at the last deleted row's date: rows a filter keeps
    (see :func:`keep_sagas`) are skipped over once per run, not once per batch.
    """
    result = Purged()
    since = None
    while True:
        if result.batches and budget.spent:
            result.left = rows.count()
            return result
        pending = rows if since is None else rows.filter(**{f"{by}__gte": since})
        with transaction.atomic(using=rows.db):
            batch = list(
                pending.select_for_update(skip_locked=True)
                .order_by(by)
                .values_list("pk", by)[:batch_size]
            )
            if not batch:
                return result
            # Deleting re-applies the filter; cascades collect the rows' keys only.
            doomed = rows.filter(pk__in=[pk for pk, _ in batch]).only("pk")
            _total, by_model = doomed.delete()
        result.deleted.update(by_model)
        result.batches += 1
        if len(batch) < batch_size:
            return result
        since = batch[-1][1]


# --- the engine's rows --------------------------------------------------------------


def expired_task_results(*, now: datetime, config: RetentionSettings) -> QuerySet[TaskResult]:
    return TaskResult.objects.filter(date_done__lt=now - timedelta(seconds=config.task_results_s))


def expired_sagas(*, now: datetime, config: RetentionSettings) -> QuerySet[Saga]:
    """Terminal sagas past the retention age that no domain keeps; none while it is 0.

    A FAILED saga counts only once an operator resolved it, and its age runs
    from the later of its end and its resolution.
    """
    if not config.sagas_days:
        return Saga.objects.none()
    cutoff = now - timedelta(days=config.sagas_days)
    sagas = Saga.objects.filter(
        Q(status__in=[Saga.Status.COMPLETED, Saga.Status.COMPENSATED])
        | Q(status=Saga.Status.FAILED, resolved_at__lt=cutoff),
        finished_at__lt=cutoff,
    )
    for narrow in _saga_filters:
        sagas = narrow(sagas)
    return sagas


def _saga_types() -> list[str]:
    return list(Saga.objects.order_by("saga_type").values_list("saga_type", flat=True).distinct())


def sagas_purge_expired(*, dry_run: bool = False, now: datetime | None = None) -> dict[str, Any]:
    """Delete expired task results and (opt-in) expired sagas with their logs.

    Returns the rows deleted (or, with ``dry_run``, due) per kind and how many
    are still due after the time budget ran out. Logs one INFO line.
    """
    config = RetentionSettings.load()
    now = now or timezone.now()
    started = time.monotonic()
    task_results = expired_task_results(now=now, config=config)
    if dry_run:
        sagas = expired_sagas(now=now, config=config)
        counts = {
            "task_results": task_results.count(),
            "sagas": sagas.count(),
            "saga_logs": SagaLog.objects.filter(saga__in=sagas).count(),
            "left": 0,
        }
    else:
        budget = Budget(config.max_seconds)
        purged = Purged()
        # Per saga type, so that each batch walks the (saga_type, finished_at) index.
        if config.sagas_days:
            for saga_type in _saga_types():
                purged += delete_in_batches(
                    expired_sagas(now=now, config=config).filter(saga_type=saga_type),
                    by="finished_at",
                    batch_size=config.batch_size,
                    budget=budget,
                )
        purged += delete_in_batches(
            task_results, by="date_done", batch_size=config.batch_size, budget=budget
        )
        counts = {
            "task_results": purged.deleted[TaskResult._meta.label],
            "sagas": purged.deleted[Saga._meta.label],
            "saga_logs": purged.deleted[SagaLog._meta.label],
            "left": purged.left,
        }
    logger.info(
        "retention%s: %s task results, %s sagas, %s saga log rows %s in %.1f s; %s left",
        " (dry run)" if dry_run else "",
        counts["task_results"],
        counts["sagas"],
        counts["saga_logs"],
        "due" if dry_run else "deleted",
        time.monotonic() - started,
        counts["left"],
    )
    return counts
