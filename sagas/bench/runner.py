"""One bench run: SQL counts, then sagas and bare chains against workers it starts itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from django.utils import timezone

from bookings.bench import report as reporting
from bookings.bench.fixture import StockExhausted, bench_fixture
from bookings.bench.sqlcount import count_sql, counting, time_steps
from bookings.bench.throughput import (
    Bursts,
    Run,
    bare_job,
    bare_run,
    compensation_latencies_ms,
    lone_bare,
    lone_sagas,
    noop_job,
    saga_job,
    saga_run,
    wait_bare,
    wait_sagas,
)
from bookings.bench.workers import (
    BenchError,
    WorkerPool,
    broker_url,
    foreign_workers,
    purge_queues,
    queued_messages,
)
from bookings.services import TRIP_BOOKING
from sagas.definitions import registry
from sagas.models import Saga

Echo = Callable[[str], None]
STEP_TIMING_TRIPS = 20


@dataclass(frozen=True)
class BenchConfig:
    sagas: int = 500
    submitters: int = 4
    lone: int = 50
    failures: int | None = None  # default: min(100, sagas)
    half_load_sagas: int | None = None  # default: sagas // 2
    skip_half_load: bool = False
    warmup: int = 20
    rounds: int = 2
    concurrency: int = 2
    timeout: float = 300.0
    purge: bool = False
    allow_foreign_workers: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.sagas >= 1, "--sagas must be at least 1"),
            (1 <= self.submitters <= 64, "--submitters must be between 1 and 64"),
            (self.lone >= 1, "--lone must be at least 1"),
            (self.failures is None or self.failures >= 1, "--failures must be at least 1"),
            (
                self.half_load_sagas is None or self.half_load_sagas >= 1,
                "--half-load-sagas must be at least 1",
            ),
            (
                not (self.skip_half_load and self.half_load_sagas is not None),
                "--half-load-sagas and --skip-half-load contradict each other",
            ),
            (self.warmup >= 0, "--warmup must be 0 or more"),
            (1 <= self.rounds <= self.sagas, "--rounds must be between 1 and --sagas"),
            (1 <= self.concurrency <= 32, "--concurrency must be between 1 and 32"),
            (self.timeout > 0, "--timeout must be a positive number of seconds"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def round_sizes(self) -> list[int]:
        """--sagas split into --rounds bursts of (nearly) equal size."""
        size, extra = divmod(self.sagas, self.rounds)
        return [size + (1 if n < extra else 0) for n in range(self.rounds)]

    @property
    def failure_count(self) -> int:
        return self.failures if self.failures is not None else min(100, self.sagas)

    @property
    def half_load_count(self) -> int:
        if self.skip_half_load:
            return 0
        return self.half_load_sagas if self.half_load_sagas is not None else max(1, self.sagas // 2)

    @property
    def timed_trips(self) -> int:
        return min(STEP_TIMING_TRIPS, self.sagas)

    @property
    def trips_needed(self) -> int:
        """Every booking the run makes (sagas and bare chains), for the stock check."""
        per_kind = 2 * (self.warmup + self.sagas + self.lone) + self.half_load_count
        in_process = 3 + 2 * self.timed_trips  # SQL count, step timing
        return per_kind + self.failure_count + 1 + in_process


def _failing_saga_tasks() -> tuple[int, int]:
    """Tasks of a trip that succeeds, and of one that fails at its last step."""
    steps = registry.get(TRIP_BOOKING).steps
    undo = sum(1 for step in steps[:-1] if step.compensation is not None)
    return len(steps), len(steps) + 1 + undo + 1  # actions, errback, compensations, finish


def _latency(run, **extra: Any) -> dict[str, Any]:
    return {**reporting.summary(run.latencies_ms), **extra}


def run_bench(config: BenchConfig, echo: Echo) -> dict[str, Any]:
    broker = broker_url()
    report: dict[str, Any] = {"machine": reporting.machine(broker), "config": asdict(config)}
    try:
        fixture = bench_fixture(trips=config.trips_needed)
    except StockExhausted as exc:
        raise BenchError(str(exc)) from None

    echo("counting SQL statements per step (in this process, through the step wrapper)")
    sql = count_sql(fixture)
    echo(f"timing the step bodies in this process ({config.timed_trips} trips each way)")
    in_process = time_steps(fixture, trips=config.timed_trips, offset=3)

    waiting = queued_messages()
    if waiting and not config.purge:
        raise BenchError(
            f"the broker's queues hold messages from elsewhere ({waiting}); they would run "
            "during the bench: pass --purge to drop them, or use another REDIS_URL"
        )
    if config.purge:
        purge_queues()
    pool = WorkerPool(concurrency=config.concurrency)
    others = foreign_workers(pool.nodename)
    if others and not config.allow_foreign_workers:
        raise BenchError(
            f"other workers consume this broker ({', '.join(others)}) and would take the "
            "bench's tasks: stop them, use another REDIS_URL, or pass --allow-foreign-workers"
        )

    offset = 3 + 2 * config.timed_trips  # trips booked in this process so far
    timeout = config.timeout

    def next_offset(count: int) -> int:
        nonlocal offset
        offset += count
        return offset - count

    started = timezone.now()
    echo(f"starting the worker: {config.concurrency} prefork processes, log {pool.logfile}")
    try:
        pool.start()
        # One booking each way, counting what submitting costs (the publish included).
        with counting() as submit_saga:
            first_saga = saga_job(fixture, offset=next_offset(1))(0)
        with counting() as submit_bare:
            first_chain = bare_job(fixture, offset=next_offset(1))(0)
        wait_sagas([first_saga.key], timeout=timeout, expect=Saga.Status.COMPLETED)
        wait_bare([first_chain], timeout=timeout, since=started)
        if config.warmup:
            echo(f"warming up: {config.warmup} sagas and {config.warmup} bare chains")
            saga_run(
                saga_job(fixture, offset=next_offset(config.warmup)),
                config.warmup,
                submitters=config.submitters,
                timeout=timeout,
            )
            bare_run(
                bare_job(fixture, offset=next_offset(config.warmup)),
                config.warmup,
                submitters=config.submitters,
                timeout=timeout,
            )

        # Saga and bare bursts alternate (saga, bare, bare, saga, ...) so that a
        # load that drifts during the run weighs on both alike.
        saga_bursts: list[Run] = []
        bare_bursts: list[Run] = []
        for number, size in enumerate(config.round_sizes):
            order = ("saga", "bare") if number % 2 == 0 else ("bare", "saga")
            for kind in order:
                if kind == "saga":
                    echo(f"burst: {size} trip sagas from {config.submitters} submitter threads")
                    run = saga_run(
                        saga_job(fixture, offset=next_offset(size)),
                        size,
                        submitters=config.submitters,
                        timeout=timeout,
                    )
                    saga_bursts.append(run)
                    echo(f"  {run.per_s:.1f} sagas/s")
                else:
                    echo(f"burst: {size} bare chains")
                    run = bare_run(
                        bare_job(fixture, offset=next_offset(size)),
                        size,
                        submitters=config.submitters,
                        timeout=timeout,
                    )
                    bare_bursts.append(run)
                    echo(f"  {run.per_s:.1f} bare chains/s")
        burst, bare_burst = Bursts(saga_bursts), Bursts(bare_bursts)
        echo(f"burst: {config.sagas} chains of five no-op tasks (Celery's own floor)")
        noop_burst = bare_run(
            noop_job(), config.sagas, submitters=config.submitters, timeout=timeout
        )
        echo(f"  {noop_burst.per_s:.1f} no-op chains/s")

        half_rate = burst.per_s / 2
        half = None
        if config.half_load_count:
            echo(f"open loop: {config.half_load_count} sagas at {half_rate:.1f}/s")
            half = saga_run(
                saga_job(fixture, offset=next_offset(config.half_load_count)),
                config.half_load_count,
                submitters=config.submitters,
                timeout=timeout,
                rate=half_rate,
            )

        ok_tasks, failing_tasks = _failing_saga_tasks()
        failure_rate = half_rate * ok_tasks / failing_tasks
        last_step = registry.get(TRIP_BOOKING).steps[-1].name
        echo(
            f"open loop: {config.failure_count} sagas failing at {last_step} "
            f"at {failure_rate:.1f}/s (half the capacity in tasks: {failing_tasks} per saga)"
        )
        failing = saga_run(
            saga_job(
                fixture, offset=next_offset(config.failure_count), chaos={"fail": [last_step]}
            ),
            config.failure_count,
            submitters=config.submitters,
            timeout=timeout,
            rate=failure_rate,
            expect=Saga.Status.COMPENSATED,
        )
        undo_ms = compensation_latencies_ms(
            [s.key for s in failing.submitted], failing.outcomes, last_step
        )

        echo(f"lone: {config.lone} sagas one at a time, then bare and no-op chains")
        lone = lone_sagas(
            saga_job(fixture, offset=next_offset(config.lone)), config.lone, timeout=timeout
        )
        lone_chains = lone_bare(
            bare_job(fixture, offset=next_offset(config.lone)), config.lone, timeout=timeout
        )
        lone_noop = lone_bare(noop_job(), config.lone, timeout=timeout)
        rss = pool.rss()
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- worker log (tail) ---\n{pool.log_tail()}") from None
    finally:
        pool.stop()
        pool.discard_log()  # a failure's message above carries its tail

    sql["saga_level"]["submit"] = submit_saga.summary()
    sql["saga_level"]["submit_bare"] = submit_bare.summary()
    report.update(
        {
            "sagas_per_s": round(burst.per_s, 2),
            "bare_chains_per_s": round(bare_burst.per_s, 2),
            "bursts_per_s": {"sagas": burst.rates, "bare_chains": bare_burst.rates},
            "overhead_ratio": round(burst.per_s / bare_burst.per_s, 3),
            "latency_ms": _latency(burst, measured="created_at -> finished_at, burst"),
            "bare_latency_ms": _latency(bare_burst, measured="booking created_at -> last commit"),
            "half_load_latency_ms": (
                _latency(
                    half,
                    arrival_per_s=round(half_rate, 2),
                    submit_lag_ms_p99=reporting.summary(half.lags_ms)["p99"],
                )
                if half
                else {**reporting.summary([]), "arrival_per_s": None}
            ),
            "lone_latency_ms": _latency(lone),
            "bare_lone_latency_ms": _latency(lone_chains),
            "noop_chains_per_s": round(noop_burst.per_s, 2),
            "noop_lone_latency_ms": _latency(lone_noop),
            "compensation_latency_ms": {
                **reporting.summary(undo_ms),
                "measured": f"failed {last_step} log row finished_at -> saga finished_at",
                "arrival_per_s": round(failure_rate, 2),
                "submit_lag_ms_p99": reporting.summary(failing.lags_ms)["p99"],
                "end_to_end": reporting.summary(failing.latencies_ms),
            },
            "sql_per_step": sql,
            "in_process_step_ms": in_process,
            "worker_rss_mb": rss["total"],
            "worker_rss": rss,
        }
    )
    report["machine"]["load_average_at_end"] = reporting.load_average()
    report["targets"] = reporting.judge(report)
    return report
