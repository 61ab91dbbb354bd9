"""A million sagas: seeding them in bulk, and timing the pages that must stay fast.

``seed_sagas`` writes sagas with a realistic mix (of saga types as the
plug-in's ``seed_mix`` says, for trips 85% trip bookings and 15%
cancellations; 80% COMPLETED, 13% COMPENSATED, 5% FAILED, the rest in
flight), ``created_at`` spread over the last ``days`` days (those in flight
within the last two minutes), long-tailed durations, and exactly
``logs_per_saga`` SagaLog rows each, consistent with the saga's status. On
PostgreSQL each batch is one ``INSERT ... SELECT FROM generate_series``
(sagas) feeding one ``INSERT ... SELECT`` (their logs) in the same statement;
elsewhere ``bulk_create`` in batches. Then VACUUM ANALYZE (ANALYZE alone inside
a transaction), so that the planner knows the rows and index-only scans work,
as they would once autovacuum has seen the table.

``bench --scale`` requests the admin saga changelist, a saga's change page,
``GET /api/sagas/?status=FAILED`` and ``GET /api/sagas/stats/`` in this
process through Django's test client as a staff user, and keeps each page's
median time, its statement count and its slowest statement with the plan
(EXPLAIN ANALYZE on PostgreSQL).
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from sagas.bench import report as reporting
from sagas.bench.recovery import run_recovery
from sagas.bench.workers import BenchError, broker_url
from sagas.definitions import SagaDefinition, registry
from sagas.errors import UnknownSagaType
from sagas.harness.plugin import HarnessError, harness_class
from sagas.models import Saga, SagaLog

Echo = Callable[[str], None]
SEED_OWNER = "seed-owner"
STAFF_USER = "bench-staff"
SEED_WORKER = "celery@seed"

STATUS_MIX = [  # cumulative share, status
    (0.80, Saga.Status.COMPLETED),
    (0.93, Saga.Status.COMPENSATED),
    (0.98, Saga.Status.FAILED),
    (0.99, Saga.Status.RUNNING),
    (0.995, Saga.Status.COMPENSATING),
    (1.0, Saga.Status.PENDING),
]
IN_FLIGHT_WINDOW_S = 120


def _names(definition: SagaDefinition) -> tuple[list[str], list[str]]:
    """Action names, and per step its compensation's name (the action's if it has none)."""
    return definition.action_names, [s.undo_name or s.name for s in definition.steps]


def seed_mix(saga_type: str) -> dict[str, float]:
    """The saga types ``seed_sagas --saga-type`` writes, with their shares (summing to 1)."""
    definition = registry.get(saga_type)
    mix = {saga_type: 1.0}
    if definition.harness:
        try:
            mix = harness_class(definition).seed_mix or mix
        except HarnessError as exc:
            raise ValueError(f"--saga-type: {exc}") from None
    for name in mix:
        registry.get(name)
    total = sum(mix.values())
    return {name: share / total for name, share in mix.items()}


@dataclass(frozen=True)
class SeedConfig:
    saga_type: str = "trip_booking"
    sagas: int = 1_000_000
    logs_per_saga: int = 5
    days: int = 30
    batch_size: int = 100_000

    def __post_init__(self) -> None:
        if self.sagas < 1:
            raise ValueError("--sagas must be at least 1")
        if not 1 <= self.logs_per_saga <= 50:
            raise ValueError("--logs-per-saga must be between 1 and 50")
        if self.days < 1:
            raise ValueError("--days must be at least 1")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be at least 1")
        try:
            registry.get(self.saga_type)
        except UnknownSagaType as exc:
            raise ValueError(f"--saga-type: {exc}") from None


def seed_owner():
    user, _ = get_user_model().objects.get_or_create(
        username=SEED_OWNER, defaults={"email": "seed@example.com"}
    )
    return user


def seed_sagas(config: SeedConfig, echo: Echo) -> dict[str, Any]:
    """Insert ``config.sagas`` sagas and ``sagas * logs_per_saga`` log rows; then ANALYZE."""
    owner = seed_owner()
    started = time.monotonic()
    insert = _insert_postgresql if connection.vendor == "postgresql" else _insert_python
    mix = list(seed_mix(config.saga_type).items())
    done = 0
    for number, (saga_type, share) in enumerate(mix):
        # The last type takes what rounding left, so the total is exact.
        wanted = config.sagas - done if number == len(mix) - 1 else round(config.sagas * share)
        definition = registry.get(saga_type)
        while wanted > 0:
            n = min(config.batch_size, wanted)
            with transaction.atomic():
                insert(n, config, owner.pk, definition)
            done += n
            wanted -= n
            echo(f"  {done:,} sagas, {done * config.logs_per_saga:,} log rows")
    with connection.cursor() as cursor:
        if connection.vendor != "postgresql":
            cursor.execute("ANALYZE")
        elif connection.in_atomic_block:  # VACUUM cannot run in a transaction (tests)
            cursor.execute(f"ANALYZE {Saga._meta.db_table}, {SagaLog._meta.db_table}")
        else:
            # VACUUM too: autovacuum would set the visibility map of these
            # insert-only pages soon anyway, and index-only scans need it.
            cursor.execute(f"VACUUM (ANALYZE) {Saga._meta.db_table}, {SagaLog._meta.db_table}")
    return {
        "sagas": config.sagas,
        "saga_logs": config.sagas * config.logs_per_saga,
        "seconds": round(time.monotonic() - started, 1),
    }


# The saga's shape from its random draws, and each log row's from (saga, i).
_PG_SEED = """
WITH draws AS (
    SELECT gen_random_uuid() AS id, random() AS r_status,
           random() AS r_age, random() AS r_duration, random() AS r_step
    FROM generate_series(1, %(n)s)
), shaped AS (
    SELECT d.*,
        %(saga_type)s AS saga_type,
        CASE {status_case} END AS status
    FROM draws d
), timed AS (
    SELECT s.*,
        CASE WHEN status IN ('RUNNING', 'COMPENSATING', 'PENDING')
             THEN now() - r_age * %(in_flight_s)s * interval '1 second'
             ELSE now() - r_age * %(days)s * interval '1 day' END AS created,
        (60 + r_duration * 300
         -- the long tail; below 0.5 it is 0 (and power() would underflow)
         + CASE WHEN r_duration > 0.5 THEN power(r_duration, 60) * 30000 ELSE 0 END
        )::int AS took_ms,
        CASE WHEN status = 'COMPLETED' THEN %(steps)s WHEN status = 'PENDING' THEN 0
             ELSE floor(r_step * %(steps)s)::int END AS done,
        %(actions)s::text[] AS actions,
        %(compensations)s::text[] AS compensations
    FROM shaped s
), sagas AS (
    INSERT INTO sagas_saga (
        id, saga_type, status, business_key, owner_id, context, current_step, steps_done,
        undo_cursor, created_at, dispatched_at, started_at, updated_at, finished_at,
        duration_ms, deadline, failure_reason, resolved_at, resolved_by, resolution)
    SELECT id, saga_type, status, 'seed:' || id, %(owner)s, '{{}}'::jsonb,
        CASE WHEN status = 'COMPLETED' THEN actions[%(steps)s]
             WHEN status IN ('COMPENSATED', 'PENDING') THEN ''
             WHEN status = 'FAILED' AND done > 0 THEN compensations[done]
             ELSE actions[done + 1] END,
        done,
        CASE WHEN status = 'FAILED' THEN done ELSE 0 END,
        created,
        CASE WHEN status = 'PENDING' THEN NULL ELSE created + interval '3 ms' END,
        CASE WHEN status = 'PENDING' THEN NULL ELSE created + interval '4 ms' END,
        CASE WHEN status IN ('COMPLETED', 'COMPENSATED', 'FAILED')
             THEN created + (took_ms + 4) * interval '1 ms' ELSE created + interval '5 ms' END,
        CASE WHEN status IN ('COMPLETED', 'COMPENSATED', 'FAILED')
             THEN created + (took_ms + 4) * interval '1 ms' END,
        CASE WHEN status IN ('COMPLETED', 'COMPENSATED', 'FAILED') THEN took_ms END,
        created + interval '300 seconds',
        CASE WHEN status = 'COMPENSATED'
                 THEN 'step ' || actions[done + 1] || ' failed: ChaosFailure: seeded'
             WHEN status = 'FAILED' AND done > 0
                 THEN 'compensation of ' || compensations[done]
                      || ' exhausted its retries: ChaosFailure: seeded'
             WHEN status = 'FAILED' THEN 'step ' || actions[1] || ' failed: seeded'
             ELSE '' END,
        NULL, '', ''
    FROM timed
    RETURNING id, saga_type, status, steps_done, created_at, started_at, duration_ms
), rows AS (
    SELECT s.id AS saga_id, i, s.steps_done AS done,
        coalesce(s.started_at, s.created_at) AS t0,
        greatest(coalesce(s.duration_ms, 100)::float / %(logs)s, 1.0) AS step_ms,
        %(actions)s::text[] AS actions,
        %(compensations)s::text[] AS compensations,
        CASE
            WHEN s.status = 'COMPLETED' THEN CASE WHEN i < %(steps)s THEN 'ok' ELSE 'dup' END
            WHEN i < s.steps_done THEN 'ok'
            WHEN s.status IN ('COMPENSATED', 'FAILED') AND i = s.steps_done THEN 'fail'
            WHEN s.status = 'COMPENSATED' AND i - s.steps_done - 1 < s.steps_done THEN 'undo'
            WHEN s.status = 'FAILED' AND s.steps_done > 0 THEN 'undo_fail'
            ELSE 'retry' END AS kind
    FROM sagas s CROSS JOIN generate_series(0, %(logs)s - 1) AS i
)
INSERT INTO sagas_sagalog (
    saga_id, step, step_index, phase, status, attempt, task_id, worker, started_at,
    finished_at, duration_ms, error, result)
SELECT saga_id,
    CASE kind WHEN 'ok' THEN actions[i %% %(steps)s + 1]
              WHEN 'dup' THEN actions[i %% %(steps)s + 1]
              WHEN 'undo' THEN compensations[done - (i - done - 1)]
              WHEN 'undo_fail' THEN compensations[done]
              ELSE actions[done + 1] END,
    CASE kind WHEN 'ok' THEN i %% %(steps)s WHEN 'dup' THEN i %% %(steps)s
              WHEN 'undo' THEN done - (i - done - 1) - 1 WHEN 'undo_fail' THEN done - 1
              ELSE done END,
    CASE WHEN kind IN ('undo', 'undo_fail') THEN 'compensation' ELSE 'action' END,
    CASE kind WHEN 'ok' THEN 'succeeded' WHEN 'undo' THEN 'succeeded'
              WHEN 'dup' THEN 'duplicate' WHEN 'retry' THEN 'retrying' ELSE 'failed' END,
    1,
    gen_random_uuid()::text,
    %(worker)s,
    t0 + i * step_ms * interval '1 ms',
    t0 + (i + 0.8) * step_ms * interval '1 ms',
    (0.8 * step_ms)::int,
    CASE kind WHEN 'fail' THEN 'ChaosFailure: seeded failure'
              WHEN 'undo_fail' THEN 'ChaosFailure: seeded compensation failure'
              WHEN 'retry' THEN 'TransientError: seeded (retry in 0.5s)'
              ELSE '' END,
    NULL
FROM rows
"""


def _status_case() -> str:
    return (
        " ".join(f"WHEN r_status < {share} THEN '{status}'" for share, status in STATUS_MIX[:-1])
        + f" ELSE '{STATUS_MIX[-1][1]}'"
    )


def _insert_postgresql(
    n: int, config: SeedConfig, owner_id: int, definition: SagaDefinition
) -> None:
    actions, compensations = _names(definition)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = off")
        cursor.execute(
            _PG_SEED.format(status_case=_status_case()),
            {
                "n": n,
                "logs": config.logs_per_saga,
                "days": config.days,
                "in_flight_s": IN_FLIGHT_WINDOW_S,
                "saga_type": definition.name,
                "steps": len(actions),
                "actions": actions,
                "compensations": compensations,
                "owner": owner_id,
                "worker": SEED_WORKER,
            },
        )


def _python_saga(
    now, config: SeedConfig, owner_id: int, definition: SagaDefinition
) -> tuple[Saga, list[SagaLog]]:
    """The same shape as the PostgreSQL statement, drawn in Python (SQLite and others)."""
    actions, compensations = _names(definition)
    steps = len(actions)
    draw = random.random()
    status = next(status for share, status in STATUS_MIX if draw < share)
    terminal = status in Saga.TERMINAL
    age = random.random() * (config.days * 86400 if terminal else IN_FLIGHT_WINDOW_S)
    created = now - timedelta(seconds=age)
    r = random.random()
    took_ms = int(60 + r * 300 + r**60 * 30000)
    done = {Saga.Status.COMPLETED: steps, Saga.Status.PENDING: 0}.get(
        status, int(random.random() * steps)
    )
    started = None if status == Saga.Status.PENDING else created + timedelta(milliseconds=4)
    finished = created + timedelta(milliseconds=took_ms + 4) if terminal else None
    saga_id = uuid.uuid4()
    saga = Saga(
        id=saga_id,
        saga_type=definition.name,
        status=status,
        business_key=f"seed:{saga_id}",
        owner_id=owner_id,
        context={},
        current_step=actions[-1] if status == Saga.Status.COMPLETED else "",
        steps_done=done,
        undo_cursor=done if status == Saga.Status.FAILED else 0,
        created_at=created,
        dispatched_at=started,
        started_at=started,
        updated_at=finished or created,
        finished_at=finished,
        duration_ms=took_ms if terminal else None,
        deadline=created + timedelta(seconds=300),
        failure_reason="seeded" if status in (Saga.Status.COMPENSATED, Saga.Status.FAILED) else "",
    )
    logs = []
    step_ms = max((took_ms if terminal else 100) / config.logs_per_saga, 1.0)
    t0 = started or created
    for i in range(config.logs_per_saga):
        if status == Saga.Status.COMPLETED:
            kind = "ok" if i < steps else "dup"
        elif i < done:
            kind = "ok"
        elif status in (Saga.Status.COMPENSATED, Saga.Status.FAILED) and i == done:
            kind = "fail"
        elif status == Saga.Status.COMPENSATED and i - done - 1 < done:
            kind = "undo"
        elif status == Saga.Status.FAILED and done > 0:
            kind = "undo_fail"
        else:
            kind = "retry"
        if kind in ("ok", "dup"):
            step, index = actions[i % steps], i % steps
        elif kind == "undo":
            index = done - (i - done - 1) - 1
            step = compensations[index]
        elif kind == "undo_fail":
            step, index = compensations[done - 1], done - 1
        else:
            step, index = actions[done], done
        logs.append(
            SagaLog(
                saga_id=saga.id,
                step=step,
                step_index=index,
                phase="compensation" if kind in ("undo", "undo_fail") else "action",
                status={"ok": "succeeded", "undo": "succeeded", "dup": "duplicate"}.get(
                    kind, "retrying" if kind == "retry" else "failed"
                ),
                attempt=1,
                task_id=str(uuid.uuid4()),
                worker=SEED_WORKER,
                started_at=t0 + timedelta(milliseconds=i * step_ms),
                finished_at=t0 + timedelta(milliseconds=(i + 0.8) * step_ms),
                duration_ms=int(0.8 * step_ms),
                error="seeded" if kind in ("fail", "undo_fail", "retry") else "",
            )
        )
    return saga, logs


@contextmanager
def _timestamps_as_given() -> Iterator[None]:
    """bulk_create fills auto_now(_add) fields with "now"; the seed spreads them over days."""
    fields = [Saga._meta.get_field("created_at"), Saga._meta.get_field("updated_at")]
    saved = [(field.auto_now, field.auto_now_add) for field in fields]
    try:
        for field in fields:
            field.auto_now = field.auto_now_add = False
        yield
    finally:
        for field, (auto_now, auto_now_add) in zip(fields, saved, strict=True):
            field.auto_now, field.auto_now_add = auto_now, auto_now_add


def _insert_python(n: int, config: SeedConfig, owner_id: int, definition: SagaDefinition) -> None:
    now = timezone.now()
    chunk = 2000
    with _timestamps_as_given():
        for start in range(0, n, chunk):
            pairs = [
                _python_saga(now, config, owner_id, definition)
                for _ in range(min(chunk, n - start))
            ]
            Saga.objects.bulk_create([saga for saga, _ in pairs])
            SagaLog.objects.bulk_create([log for _, logs in pairs for log in logs])


# --- timing the pages -------------------------------------------------------------


@dataclass(frozen=True)
class ScaleConfig:
    runs: int = 5
    timeout: float = 300.0
    stalled: int = 10_000

    def __post_init__(self) -> None:
        if not 1 <= self.runs <= 100:
            raise ValueError("--runs must be between 1 and 100")
        if not 0 <= self.stalled <= 1_000_000:
            raise ValueError("--stalled must be between 0 (skip) and 1000000")
        if self.timeout <= 0:
            raise ValueError("--timeout must be a positive number of seconds")


# name, path ({saga} is a FAILED saga's id), whether issue 5 sets the 300 ms target for it
PAGES = [
    ("admin saga changelist", "/admin/sagas/saga/", True),
    ("admin saga change page", "/admin/sagas/saga/{saga}/change/", True),
    ("GET /api/sagas/?status=FAILED", "/api/sagas/?status=FAILED", True),
    ("GET /api/sagas/stats/", "/api/sagas/stats/", True),
    ("admin changelist, FAILED only", "/admin/sagas/saga/?status__exact=FAILED", False),
    ("GET /api/sagas/{id}/", "/api/sagas/{saga}/", False),
]


class _Timer:
    """An execute_wrapper keeping every statement with its duration."""

    def __init__(self) -> None:
        self.statements: list[tuple[float, str, Any]] = []

    def __call__(self, execute, sql, params, many, context):
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.statements.append(((time.perf_counter() - start) * 1000, sql, params))


def _host() -> str:
    hosts = [h for h in settings.ALLOWED_HOSTS if h != "*"]
    if not hosts or "localhost" in hosts:
        return "localhost"
    return hosts[0].lstrip(".")


def explain(sql: str, params: Any) -> str:
    if not sql.lstrip().upper().startswith("SELECT"):
        return "(not a SELECT: not explained)"
    prefix = (
        "EXPLAIN (ANALYZE, BUFFERS) "
        if connection.vendor == "postgresql"
        else "EXPLAIN QUERY PLAN "
    )
    with connection.cursor() as cursor:
        cursor.execute(prefix + sql, params)
        return "\n".join(" | ".join(str(col) for col in row) for row in cursor.fetchall())


def _time_page(client: Client, path: str, runs: int) -> dict[str, Any]:
    response = client.get(path)  # warm: templates, URL resolvers, caches
    if response.status_code != 200:
        raise BenchError(f"GET {path} answered {response.status_code}, not 200")
    times, slowest, counts = [], (0.0, "", None), []
    for _ in range(runs):
        timer = _Timer()
        with connection.execute_wrapper(timer):
            start = time.perf_counter()
            response = client.get(path)
            times.append((time.perf_counter() - start) * 1000)
        if response.status_code != 200:
            raise BenchError(f"GET {path} answered {response.status_code}, not 200")
        counts.append(len(timer.statements))
        slowest = max([slowest, *timer.statements], key=lambda statement: statement[0])
    ms, sql, params = slowest
    return {
        "path": path,
        "median_ms": round(statistics.median(times), 1),
        "runs_ms": [round(t, 1) for t in times],
        "queries": max(counts),
        "slowest_query": {
            "ms": round(ms, 1),
            "sql": sql,
            "params": params,
            "plan": explain(sql, params),
        },
    }


def run_scale(config: ScaleConfig, echo: Echo) -> dict[str, Any]:
    try:
        broker = broker_url()
    except BenchError:
        broker = ""
    report: dict[str, Any] = {"machine": reporting.machine(broker), "config": {"runs": config.runs}}
    sagas = Saga.objects.count()
    report["rows"] = {"sagas": sagas, "saga_logs": SagaLog.objects.count()}
    if sagas < 1_000_000:
        echo(f"warning: {sagas:,} sagas; the targets are for 1,000,000 (run seed_sagas first)")
    # A FAILED saga has the fullest page: failure, compensations, operator actions.
    saga_id = (
        Saga.objects.filter(status=Saga.Status.FAILED)
        .order_by("-created_at")
        .values_list("pk", flat=True)
        .first()
    ) or Saga.objects.order_by("-created_at").values_list("pk", flat=True).first()
    if saga_id is None:
        raise BenchError("no sagas to look at: run seed_sagas first")

    staff, created = get_user_model().objects.get_or_create(
        username=STAFF_USER, defaults={"is_staff": True, "is_superuser": True}
    )
    if not created and not (staff.is_staff and staff.is_superuser):
        raise BenchError(f"user {STAFF_USER!r} exists but is not a superuser")
    client = Client(HTTP_HOST=_host(), HTTP_ACCEPT="application/json")
    client.force_login(staff)

    pages = {}
    for name, path, targeted in PAGES:
        echo(f"timing {name} ({config.runs} runs)")
        page = _time_page(client, path.format(saga=saga_id), config.runs)
        page["target_ms"] = reporting.SCALE_PAGE_TARGET_MS if targeted else None
        page["pass"] = page["median_ms"] < reporting.SCALE_PAGE_TARGET_MS if targeted else None
        pages[name] = page
    report["pages"] = pages
    report["targets"] = {
        name: {
            "what": f"{name}, median ms",
            "target": f"< {reporting.SCALE_PAGE_TARGET_MS}",
            "value": page["median_ms"],
            "pass": page["pass"],
        }
        for name, page in pages.items()
        if page["target_ms"] is not None
    }
    if config.stalled:
        recovery = run_recovery(stalled=config.stalled, timeout=config.timeout, echo=echo)
        report["recovery"] = recovery
        report["targets"]["stalled sagas moved on"] = {
            "what": f"{config.stalled:,} stalled sagas moved on by the sweeper, seconds",
            "target": f"<= {recovery['target_s']:.0f}",
            "value": recovery["seconds"],
            "pass": recovery["pass"],
        }
    report["machine"]["load_average_at_end"] = reporting.load_average()
    return report


def scale_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    rows = report["rows"]
    lines = [
        f"machine: {m['cores']} cores, {m['memory_mb']} MB; {m['database']}; "
        f"load {m['load_average_at_start']} -> {m['load_average_at_end']}",
        f"rows: {rows['sagas']:,} sagas, {rows['saga_logs']:,} saga log rows",
        "",
        f"{'page':<36}{'median ms':>10}{'queries':>9}{'slowest ms':>12}  target",
    ]
    for name, page in report["pages"].items():
        verdict = {True: "PASS", False: "FAIL", None: "-"}[page["pass"]]
        target = f"< {page['target_ms']} {verdict}" if page["target_ms"] else "(informative)"
        lines.append(
            f"{name:<36}{page['median_ms']:>10.1f}{page['queries']:>9}"
            f"{page['slowest_query']['ms']:>12.1f}  {target}"
        )
    if recovery := report.get("recovery"):
        lines += [
            "",
            f"sweeper: {recovery['resumed']:,} of {recovery['stalled']:,} stalled sagas moved on "
            f"in {recovery['seconds']} s ({recovery['sweeps']} sweeps, "
            f"{recovery['per_second']}/s)  target <= {recovery['target_s']:.0f} s "
            f"{'PASS' if recovery['pass'] else 'FAIL'}",
        ]
    for name, page in report["pages"].items():
        slow = page["slowest_query"]
        lines += ["", f"--- {name}: slowest statement ({slow['ms']} ms)", slow["sql"], slow["plan"]]
    return "\n".join(lines)
