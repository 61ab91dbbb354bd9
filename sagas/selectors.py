"""Reads of the saga engine: lookups, the filtered list and the stats."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Aggregate, Count, FloatField, QuerySet

from sagas.errors import SagaNotFound
from sagas.models import Saga, SagaLog

Status = Saga.Status


def saga_get(*, saga_id) -> Saga:
    """The saga, or ``SagaNotFound``."""
    saga = Saga.objects.filter(pk=saga_id).first()
    if saga is None:
        raise SagaNotFound(f"saga {saga_id} does not exist")
    return saga


def saga_log(*, saga_id) -> QuerySet[SagaLog]:
    """Its history in the order the database recorded it: one row per step attempt and phase,
    plus operators' notes (not by ``started_at``: that is each worker's own clock)."""
    return SagaLog.objects.filter(saga_id=saga_id).order_by("id")


def saga_status(*, saga_id) -> str | None:
    """Its status alone (one indexed read), or None if there is no such saga."""
    return Saga.objects.filter(pk=saga_id).values_list("status", flat=True).first()


def sagas_visible_to(user) -> QuerySet[Saga]:
    """Staff see every saga; anyone else the sagas that act for them."""
    sagas = Saga.objects.all()
    return sagas if user.is_staff else sagas.filter(owner=user)


class PercentileCont(Aggregate):
    """PostgreSQL's percentile_cont: the interpolated percentile of an ordered set."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=fraction, **extra)


def percentile(sorted_values: list[int], fraction: float) -> float | None:
    """The same interpolation as percentile_cont, for databases without it."""
    if not sorted_values:
        return None
    position = fraction * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def saga_stats(
    *,
    sagas: QuerySet[Saga],
    created_after: datetime | None = None,
    created_before: datetime | None = None,
) -> dict[str, Any]:
    """Counts by status and type, success and compensation rates, p50/p95 duration by type."""
    if created_after is not None:
        sagas = sagas.filter(created_at__gte=created_after)
    if created_before is not None:
        sagas = sagas.filter(created_at__lt=created_before)

    by_type: dict[str, dict[str, int]] = {}
    by_status = dict.fromkeys(Status.values, 0)
    # COUNT(*), not COUNT(id): PostgreSQL can then answer from saga_type_status alone.
    for row in sagas.order_by().values("saga_type", "status").annotate(n=Count("*")):
        by_type.setdefault(row["saga_type"], dict.fromkeys(Status.values, 0))[row["status"]] = row[
            "n"
        ]
        by_status[row["status"]] += row["n"]

    durations = _duration_percentiles(sagas.filter(duration_ms__isnull=False))
    types = {
        saga_type: {
            "total": sum(counts.values()),
            "by_status": counts,
            **_rates(counts),
            "duration_ms": durations.get(saga_type, {"p50": None, "p95": None}),
        }
        for saga_type, counts in sorted(by_type.items())
    }
    return {
        "window": {"created_after": created_after, "created_before": created_before},
        "total": sum(by_status.values()),
        "by_status": by_status,
        **_rates(by_status),
        "by_type": types,
    }


def _rates(counts: dict[str, int]) -> dict[str, float | None]:
    finished = sum(counts[status] for status in Saga.TERMINAL)
    if not finished:
        return {"success_rate": None, "compensation_rate": None}
    return {
        "success_rate": round(counts[Status.COMPLETED] / finished, 4),
        "compensation_rate": round(counts[Status.COMPENSATED] / finished, 4),
    }


def _duration_percentiles(finished: QuerySet[Saga]) -> dict[str, dict[str, float | None]]:
    if connection.vendor == "postgresql":
        with transaction.atomic():
            # percentile_cont sorts every duration; at a million rows the
            # default 4 MB spills to disk (measured: 206 ms -> 97 ms in memory).
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL work_mem = '64MB'")
            rows = list(
                finished.order_by()
                .values("saga_type")
                .annotate(
                    p50=PercentileCont("duration_ms", 0.5), p95=PercentileCont("duration_ms", 0.95)
                )
            )
        return {row["saga_type"]: {"p50": _ms(row["p50"]), "p95": _ms(row["p95"])} for row in rows}
    values: dict[str, list[int]] = {}
    for saga_type, duration in finished.order_by("saga_type", "duration_ms").values_list(
        "saga_type", "duration_ms"
    ):
        values.setdefault(saga_type, []).append(duration)
    return {
        saga_type: {
            "p50": _ms(percentile(durations, 0.5)),
            "p95": _ms(percentile(durations, 0.95)),
        }
        for saga_type, durations in values.items()
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
