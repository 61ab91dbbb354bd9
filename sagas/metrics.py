"""GET /metrics: saga counters, durations and backlog for Prometheus, read from the database.

Every number is derived at scrape time from the Saga and SagaLog tables by a
custom collector on a dedicated ``CollectorRegistry`` (not prometheus-client's
global one), instead of being counted in memory where sagas run. The tables
are the source of truth, so:

- nothing is lost when a worker process is SIGKILLed (chaos does that) or a
  worker host disappears: the rows it committed are counted, nothing else;
- no multiprocess directory has to be shared between web and worker
  containers, and any number of worker processes and hosts can run;
- one endpoint on any web process gives the whole system's numbers, and every
  web process answers the same.

Families (``saga_type`` is ``Saga.saga_type``):

- ``backtrack_sagas_{started,completed,compensated,failed}_total`` counters:
  started counts every saga row (PENDING ones included), the others count rows
  in that terminal status;
- ``backtrack_sagas_in_progress{saga_type,status}`` gauge for PENDING,
  RUNNING and COMPENSATING;
- ``backtrack_sagas_awaiting_operator{saga_type}`` gauge: FAILED sagas that no
  operator has resolved yet (``Saga.resolved_at`` is null), the ones someone
  has to look at; counted by the same query as the others;
- ``backtrack_saga_duration_seconds{saga_type}`` histogram of
  ``Saga.duration_ms`` (set when a saga ends);
- ``backtrack_saga_step_duration_seconds{step,phase}`` histogram of
  ``SagaLog.duration_ms`` over every attempt (retries, failures and ignored
  duplicate deliveries included: each one took worker time) of the ``action``
  and ``compensation`` phases. Step names are unique within a saga type; a
  ``saga_type`` label would need a join of SagaLog to Saga on every refresh.

Cost: two GROUP BY queries, buckets and unresolved FAILED sagas by
conditional aggregation: one over Saga for every saga family at once, one
over the recent SagaLog rows. They run at most once per ``METRICS_CACHE_S``
seconds (default 15) per process; in between, scrapes are served from the
families cached in the process, without a query. The Saga query scans the
table: about 0.3 s for 1,000,000 sagas on PostgreSQL 15 (parallel seq scan),
so a warm refresh takes ~0.3 s.

SagaLog is append-only and grows fastest (5,000,000 rows is plausible), so
the step histogram is aggregated incrementally. Each process keeps the
cumulative bucket counts of the rows that finished before a watermark ``W``
(``now - METRICS_STEP_LAG_S``, default 60 s), and on each refresh adds the
rows with ``W < finished_at <= new W``, and reads the rows finished after the
new watermark afresh without keeping them. So every committed row is counted
at once, a row is added to the kept counts exactly once, and the counts never
fall between scrapes. The watermark is on ``finished_at``, not on the id:
ids are taken at INSERT but rows commit in any order, so a row with a smaller
id can appear after a larger one was read, and would be skipped forever by an
``id > last_id`` watermark. The id serves only as a lower bound that keeps
the query on the primary key index: a row that finished more than one lag
before ``W`` was inserted before any row that finished after ``W``, so the
largest such id bounds the rows still to read (a few ms for the rows of the
last two minutes). The first refresh of a process reads the whole table once:
2-3.5 s for 5,000,000 rows on PostgreSQL 15, well inside Prometheus' default
10 s scrape timeout. Re-aggregating the whole table on every refresh instead
("simply cache") would cost those seconds every ``METRICS_CACHE_S``.

Caveats:

- The step histogram assumes a SagaLog row commits within the lag after its
  ``finished_at`` (stamped by the worker's clock, compared with the web
  host's): commit delay plus clock skew must stay well under
  ``METRICS_STEP_LAG_S``. A row that commits later is missed by processes that
  had already passed it, until they restart.
- The saga counters are counts of rows, not of events: they fall when a
  retention job deletes sagas, and a FAILED saga retried by an operator goes
  back to COMPENSATING, so ``failed_total`` falls and ``in_progress`` rises.
  Prometheus takes any fall for a counter reset, so ``rate``/``increase``
  overshoot across it; the gauge and the raw counts stay exact.
- Deleted SagaLog rows stay in a process's kept step counts until it restarts,
  when it reads the table again: processes of different ages can then differ.
- Numbers are at most ``METRICS_CACHE_S`` seconds old; each process (each
  gunicorn worker) keeps its own cache and step counts.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import Count, Max, Q, Sum
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from prometheus_client import generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector, CollectorRegistry
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.permissions import BasePermission
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sagas.definitions import registry as saga_registry
from sagas.models import Saga, SagaLog

# Upper bounds in seconds; durations are stored in whole milliseconds.
SAGA_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30)

Status = Saga.Status
IN_PROGRESS = (Status.PENDING, Status.RUNNING, Status.COMPENSATING)
FINISHED = {
    Status.COMPLETED: "completed",
    Status.COMPENSATED: "compensated",
    Status.FAILED: "failed",
}
STEP_PHASES = (SagaLog.Phase.ACTION, SagaLog.Phase.COMPENSATION)


def _ms(bound_s: float) -> int:
    return round(bound_s * 1000)


def _bucket_aggregates(buckets_s: Sequence[float], *, prefix: str = "", where=None) -> dict:
    """Cumulative bucket counts ``<prefix>b0..bn``, count and sum of ``duration_ms``.

    One aggregate per bound, each filtered (``COUNT(*) FILTER (WHERE ...)`` on
    PostgreSQL, ``CASE`` on SQLite), so one scan fills every bucket.
    """
    where = where or Q()
    aggregates = {
        f"{prefix}b{i}": Count("id", filter=where & Q(duration_ms__lte=_ms(bound)))
        for i, bound in enumerate(buckets_s)
    }
    aggregates[f"{prefix}n"] = Count("duration_ms", filter=where)
    aggregates[f"{prefix}ms"] = Sum("duration_ms", filter=where)
    return aggregates


class _Histogram:
    """Cumulative bucket counts, count and sum (ms) of one label set."""

    __slots__ = ("buckets", "count", "sum_ms")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.count = 0
        self.sum_ms = 0

    def add_row(self, row: dict, prefix: str = "") -> None:
        for i in range(len(self.buckets)):
            self.buckets[i] += row[f"{prefix}b{i}"]
        self.count += row[f"{prefix}n"]
        self.sum_ms += row[f"{prefix}ms"] or 0

    def __add__(self, other: _Histogram) -> _Histogram:
        total = _Histogram(len(self.buckets))
        total.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        total.count = self.count + other.count
        total.sum_ms = self.sum_ms + other.sum_ms
        return total

    def samples(self, bounds_s: Sequence[float]) -> list[tuple[str, float]]:
        pairs = [(repr(float(b)), float(n)) for b, n in zip(bounds_s, self.buckets, strict=True)]
        pairs.append(("+Inf", float(self.count)))
        return pairs


def _step_histogram() -> _Histogram:
    return _Histogram(len(STEP_BUCKETS_S))


class StepDurations:
    """The step histogram, kept incrementally behind a ``finished_at`` watermark.

    See the module docstring for why the watermark is a time and the id only a bound.
    """

    def __init__(self) -> None:
        self.kept: dict[tuple[str, str], _Histogram] = {}
        self.watermark: datetime | None = None
        self.min_id = 0

    def read(self, *, now: datetime, lag: timedelta) -> dict[tuple[str, str], _Histogram]:
        """Add the rows that passed the watermark to the kept counts; return kept + recent."""
        # max(): if the clock steps back, rows already kept are not kept twice.
        watermark = max(filter(None, (self.watermark, now - lag)))
        new = Q(finished_at__lte=watermark)
        if self.watermark is not None:
            new &= Q(finished_at__gt=self.watermark)
        # Grouped by step and phase only, with the split into new and recent
        # rows done by filtered aggregates: grouping by the split as well made
        # PostgreSQL misjudge the number of groups and sort 5M rows on disk.
        # Rows kept earlier are read only for the id bound; there are few of
        # them, because the bound trails the watermark by one lag.
        rows = (
            SagaLog.objects.filter(id__gt=self.min_id, phase__in=STEP_PHASES)
            # A call still out has no duration yet; its row is counted once it ends.
            .exclude(status=SagaLog.Status.STARTED)
            .values("step", "phase")
            .annotate(
                **_bucket_aggregates(STEP_BUCKETS_S, prefix="new_", where=new),
                **_bucket_aggregates(
                    STEP_BUCKETS_S, prefix="recent_", where=Q(finished_at__gt=watermark)
                ),
                old_id=Max("id", filter=Q(finished_at__lte=watermark - lag)),
            )
            .order_by()
        )
        kept = dict(self.kept)
        recent: dict[tuple[str, str], _Histogram] = {}
        min_id = self.min_id
        for row in rows:
            key = (row["step"], row["phase"])
            if row["new_n"]:
                kept[key] = kept.get(key, _step_histogram()) + _from_row(row, "new_")
            if row["recent_n"]:
                recent[key] = _from_row(row, "recent_")
            min_id = max(min_id, row["old_id"] or 0)
        # The state moves on only once the query succeeded.
        self.kept, self.watermark, self.min_id = kept, watermark, min_id
        return {
            key: kept.get(key, _step_histogram()) + recent.get(key, _step_histogram())
            for key in kept.keys() | recent.keys()
        }


def _from_row(row: dict, prefix: str) -> _Histogram:
    histogram = _step_histogram()
    histogram.add_row(row, prefix)
    return histogram


class SagaCollector(Collector):
    """Builds every family from the database; serves them from memory for ``METRICS_CACHE_S``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: list[Metric] = []
        self._built_at: float | None = None
        self._steps = StepDurations()

    def reset(self) -> None:
        """Forget the cache and the kept step counts (a fresh process)."""
        with self._lock:
            self._families, self._built_at, self._steps = [], None, StepDurations()

    def collect(self) -> Iterable[Metric]:
        ttl = getattr(settings, "METRICS_CACHE_S", 15)
        with self._lock:
            fresh = self._built_at is not None and time.monotonic() - self._built_at < ttl
            if not fresh:
                self._families = self._build()
                self._built_at = time.monotonic()
            return list(self._families)

    def _build(self) -> list[Metric]:
        known_types = set(saga_registry.names())
        return [
            *self._saga_families(known_types),
            self._step_family(known_types),
        ]

    def _saga_families(self, known_types: set[str]) -> list[Metric]:
        rows = (
            Saga.objects.values("saga_type", "status")
            .annotate(
                sagas=Count("id"),
                # A filtered count in the same scan, not a second query.
                unresolved=Count("id", filter=Q(status=Status.FAILED, resolved_at__isnull=True)),
                **_bucket_aggregates(SAGA_BUCKETS_S),
            )
            .order_by()
        )
        by_status: dict[str, dict[str, int]] = defaultdict(dict)
        unresolved: dict[str, int] = defaultdict(int)
        durations: dict[str, _Histogram] = {}
        for row in rows:
            by_status[row["saga_type"]][row["status"]] = row["sagas"]
            unresolved[row["saga_type"]] += row["unresolved"]
            durations.setdefault(row["saga_type"], _Histogram(len(SAGA_BUCKETS_S))).add_row(row)
        saga_types = sorted(known_types | by_status.keys())

        started = CounterMetricFamily(
            "backtrack_sagas_started",
            "Sagas started (saga rows, PENDING included).",
            labels=["saga_type"],
        )
        finished = {
            status: CounterMetricFamily(
                f"backtrack_sagas_{word}",
                f"Sagas now in status {status}.",
                labels=["saga_type"],
            )
            for status, word in FINISHED.items()
        }
        in_progress = GaugeMetricFamily(
            "backtrack_sagas_in_progress",
            "Sagas not finished yet, by status.",
            labels=["saga_type", "status"],
        )
        awaiting_operator = GaugeMetricFamily(
            "backtrack_sagas_awaiting_operator",
            "FAILED sagas no operator has resolved yet.",
            labels=["saga_type"],
        )
        duration = HistogramMetricFamily(
            "backtrack_saga_duration_seconds",
            "Duration of finished sagas, from start to their terminal status.",
            labels=["saga_type"],
        )
        for saga_type in saga_types:
            counts = by_status.get(saga_type, {})
            started.add_metric([saga_type], sum(counts.values()))
            for status, family in finished.items():
                family.add_metric([saga_type], counts.get(status, 0))
            for status in IN_PROGRESS:
                in_progress.add_metric([saga_type, status], counts.get(status, 0))
            awaiting_operator.add_metric([saga_type], unresolved.get(saga_type, 0))
            histogram = durations.get(saga_type) or _Histogram(len(SAGA_BUCKETS_S))
            duration.add_metric(
                [saga_type], histogram.samples(SAGA_BUCKETS_S), histogram.sum_ms / 1000
            )
        unknown = GaugeMetricFamily(
            "backtrack_sagas_unknown_type",
            "Sagas in flight whose type no deployed saga_steps module declares: recovery "
            "skips them until one does.",
            labels=["saga_type"],
        )
        for saga_type in sorted(by_status.keys() - known_types):
            waiting = sum(by_status[saga_type].get(status, 0) for status in IN_PROGRESS)
            if waiting:
                unknown.add_metric([saga_type], waiting)
        return [started, *finished.values(), in_progress, awaiting_operator, duration, unknown]

    def _step_family(self, known_types: set[str]) -> Metric:
        lag = timedelta(seconds=getattr(settings, "METRICS_STEP_LAG_S", 60))
        histograms = self._steps.read(now=timezone.now(), lag=lag)
        for saga_type in known_types:
            definition = saga_registry.get(saga_type)
            for step in definition.action_names:
                histograms.setdefault((step, SagaLog.Phase.ACTION), _step_histogram())
            for step in definition.compensation_names:
                histograms.setdefault((step, SagaLog.Phase.COMPENSATION), _step_histogram())
        family = HistogramMetricFamily(
            "backtrack_saga_step_duration_seconds",
            "Duration of step attempts (actions and compensations, retries included).",
            labels=["step", "phase"],
        )
        for (step, phase), histogram in sorted(histograms.items()):
            family.add_metric(
                [step, str(phase)], histogram.samples(STEP_BUCKETS_S), histogram.sum_ms / 1000
            )
        return family


collector = SagaCollector()
metrics_registry = CollectorRegistry(auto_describe=False)
metrics_registry.register(collector)


def metrics_exposition() -> bytes:
    """The text exposition format, version 0.0.4."""
    return generate_latest(metrics_registry)


# --- the view ------------------------------------------------------------------


class PrometheusTextRenderer(BaseRenderer):
    media_type = "text/plain"
    format = "txt"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None) -> bytes:
        if isinstance(data, bytes):
            return data
        if isinstance(data, dict) and "detail" in data:  # an error from DRF
            data = data["detail"]
        return f"{data}\n".encode()


class PlainTextOnly(BaseContentNegotiation):
    """Prometheus asks for OpenMetrics first; the answer is always text 0.0.4."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class CanReadMetrics(BasePermission):
    """Staff users, or a scraper with ``Authorization: Bearer <METRICS_TOKEN>`` if one is set.

    "Bearer", not "Token": DRF's TokenAuthentication reads ``Token <key>`` from
    the same header, and ignores other keywords.
    """

    message = "Metrics are for staff users and for the metrics token."

    def has_permission(self, request: Request, view) -> bool:
        token = getattr(settings, "METRICS_TOKEN", "")
        if token:
            scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode(), token.encode()
            ):
                return True
        user = request.user
        return bool(user and user.is_authenticated and user.is_staff)


class MetricsApi(APIView):
    """Prometheus scrape endpoint: ``GET /metrics``."""

    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [CanReadMetrics]
    renderer_classes = [PrometheusTextRenderer]
    content_negotiation_class = PlainTextOnly

    @extend_schema(exclude=True)
    def get(self, request: Request) -> Response:
        return Response(metrics_exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
