"""Reads behind the admin pages: cheap counts and human durations.

The saga's step graph lives in ``sagas.graph``: the API's feed draws it too.
"""

from __future__ import annotations

from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Model, QuerySet
from django.utils.functional import cached_property

# Below this many rows an exact COUNT(*) is cheap, and a planner estimate of a
# freshly created or recently emptied table can be far off.
EXACT_COUNT_BELOW = 10_000


def estimated_row_count(model: type[Model], *, using: str) -> int | None:
    """The PostgreSQL planner's row estimate for the model's table, or None.

    None on other databases, and when the table was never vacuumed or analysed
    (``reltuples`` is -1 then).
    """
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
            [connection.ops.quote_name(model._meta.db_table)],
        )
        row = cursor.fetchone()
    if row is None or row[0] is None or row[0] < 0:
        return None
    return int(row[0])


class EstimatedCountPaginator(Paginator):
    """Counts an unfiltered table from the planner's estimate instead of COUNT(*).

    COUNT(*) over millions of rows reads the whole table (or index) on every
    page view. A filtered queryset is counted exactly: its filters are indexed
    and the operator wants the real number of, say, FAILED sagas.
    """

    estimated = False

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        if isinstance(queryset, QuerySet) and not queryset.query.where:
            estimate = estimated_row_count(queryset.model, using=queryset.db)
            if estimate is not None and estimate >= EXACT_COUNT_BELOW:
                self.estimated = True
                return estimate
        return super().count


def humanize_ms(ms: int | None) -> str:
    """850 ms, 2.4 s, 3 min 12 s, 2 h 5 min, 1 d 3 h; an em dash when unknown."""
    if ms is None:
        return "\u2014"
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


class ReadOnlyAdminMixin:
    """Admin pages that show history: nothing can be added, changed or deleted."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
