"""One bench run: SQL counts, then sagas and bare chains against workers it starts itself.

The saga type's plug-in starts the sagas and, if it has one, the bare-chain
baseline; everything the run created is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import redis
from django.utils import timezone

from sagas import tracing
from sagas.bench import profile as profiling
from sagas.bench import report as reporting
from sagas.bench import tracing_cost
from sagas.bench.cpu import BurstMeters
from sagas.bench.sqlcount import count_sql, counting, time_steps
from sagas.bench.tasks import BENCH_QUEUE, NOOP
from sagas.bench.throughput import (
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
from sagas.bench.workers import (
    BenchError,
    WorkerPool,
    broker_url,
    check_flags,
    clear_queues,
    refuse_foreign_workers,
    worker_flag_checks,
)
from sagas.definitions import SagaDefinition
from sagas.errors import UnknownSagaType
from sagas.harness.plugin import (
    HarnessError,
    SagaHarness,
    clean_up_run,
    harness_for,
)
from sagas.harness.processes import describe_backends, queues_of
from sagas.models import Saga

Echo = Callable[[str], None]
STEP_TIMING_SAGAS = 20
TRACING_OFF = {"OTEL_TRACES_EXPORTER": "none"}
# Sagas and no-op chains the profiling worker runs before the profiled ones.
PROFILE_WARMUP = 2


@dataclass(frozen=True)
class BenchConfig:
    saga_type: str = "trip_booking"
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
    keep: bool = False
    profile_sagas: int = 20  # 0: no per-step profile
    # "drop": also measure the workers with tracing on, spans made and dropped (tracing_cost).
    tracing: str = "off"

    def __post_init__(self) -> None:
        check_flags(
            [
                (self.sagas >= 1, "--sagas must be at least 1"),
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
                (0 <= self.profile_sagas <= 1000, "--profile-sagas must be between 0 and 1000"),
                (self.tracing in ("off", "drop"), "--tracing must be off or drop"),
                *worker_flag_checks(
                    submitters=self.submitters,
                    concurrency=self.concurrency,
                    timeout=self.timeout,
                ),
            ]
        )

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
    def timed_sagas(self) -> int:
        return min(STEP_TIMING_SAGAS, self.sagas)

    @property
    def sagas_needed(self) -> int:
        """Every saga and bare run the bench starts, for the plug-in to prepare for."""
        per_kind = 2 * (self.warmup + self.sagas + self.lone) + self.half_load_count
        per_kind += self.profile_sagas + PROFILE_WARMUP if self.profile_sagas else 0
        in_process = 3 + 2 * self.timed_sagas  # SQL count, step timing
        traced = 0
        if self.tracing == "drop":  # the SQL count again, traced, and the tracing rounds
            traced = 3 + tracing_cost.sagas_needed(burst=self.tracing_burst, lone=self.tracing_lone)
        return per_kind + self.failure_count + 1 + in_process + traced

    @property
    def tracing_burst(self) -> int:
        return max(1, self.sagas // 2)

    @property
    def tracing_lone(self) -> int:
        return max(1, self.lone // 2)


def _failing_saga_tasks(definition: SagaDefinition) -> tuple[int, int]:
    """Tasks of a saga that succeeds, and of one that fails at its last step."""
    steps = definition.steps
    undo = sum(1 for step in steps[:-1] if step.compensation is not None)
    return len(steps), len(steps) + 1 + undo + 1  # actions, errback, compensations, finish


def _profile(
    harness: SagaHarness,
    *,
    queues: tuple[str, ...],
    concurrency: int,
    count: int,
    offset: int,
    timeout: float,
    echo: Echo,
    bare_ids: list[str],
) -> dict[str, Any]:
    """``count`` lone sagas and no-op chains on a worker of their own that profiles every task.

    After the measured phases, so the profiling's own cost (a few timers and
    a Redis push per task) touches none of the figures above.
    """
    definition = harness.definition
    key = f"bench:profile:{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(broker_url())
    pool = WorkerPool(
        concurrency=concurrency,
        queues=queues,
        includes=(*harness.worker_includes, profiling.MODULE),
        env={profiling.ENV: key, **TRACING_OFF},
    )
    echo(
        f"profile: {count} lone sagas and {count} lone no-op chains on a profiling worker "
        f"({concurrency} prefork processes, log {pool.logfile})"
    )

    def noop(n: int) -> None:
        run = lone_bare(noop_job(definition), n, timeout=timeout)
        bare_ids.extend(s.key for s in run.submitted)

    try:
        pool.start()
        lone_sagas(saga_job(harness, offset=offset), PROFILE_WARMUP, timeout=timeout)
        noop(PROFILE_WARMUP)
        time.sleep(profiling.FLUSH_S)
        client.delete(key)
        with profiling.publishes_recorded() as first_publishes:
            lone_sagas(saga_job(harness, offset=offset + PROFILE_WARMUP), count, timeout=timeout)
            noop(count)
        time.sleep(profiling.FLUSH_S)
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- worker log (tail) ---\n{pool.log_tail()}") from None
    finally:
        pool.stop()
        pool.discard_log()
    rows = profiling.hops(profiling.read_records(client, key), first_publishes)
    return profiling.profile_summary(
        rows,
        step_names=[definition.action_task_name(i) for i in range(len(definition.steps))],
        noop_name=NOOP,
        covered=(
            f"{count} lone sagas and {count} lone no-op chains, one at a time, on a worker "
            "started for the profile after the figures above; the saga's steps as its "
            "worker ran them"
        ),
    )


def _latency(run, **extra: Any) -> dict[str, Any]:
    return {**reporting.summary(run.latencies_ms), **extra}


def run_bench(config: BenchConfig, echo: Echo) -> dict[str, Any]:
    with harness_run(config.saga_type, keep=config.keep, echo=echo, title="bench run") as run:
        return _run(config, run.harness, run.broker, echo, run.bare_ids)


@dataclass
class HarnessRun:
    harness: SagaHarness
    broker: str
    bare_ids: list[str]  # the bare and no-op chains' last task ids, for the clean-up


@contextmanager
def harness_run(saga_type: str, *, keep: bool, echo: Echo, title: str) -> Iterator[HarnessRun]:
    """The saga type's plug-in for one run, which says where it runs, and whose sagas,
    stock and task results are deleted at the end unless ``keep``."""
    run_id = uuid.uuid4().hex[:8]
    try:
        harness = harness_for(saga_type, purpose="bench", run_id=run_id)
    except (UnknownSagaType, HarnessError) as exc:
        raise ValueError(f"--saga-type: {exc}") from None
    broker = broker_url()
    echo(f"{title} {run_id}: {saga_type} sagas; using {describe_backends(broker_url=broker)}")
    started = timezone.now()
    run = HarnessRun(harness=harness, broker=broker, bare_ids=[])
    try:
        yield run
    finally:
        if keep:
            echo(f"kept what run {run_id} created (--keep)")
        else:
            clean_up_run(harness, task_ids=run.bare_ids, since=started, say=echo)


def _run(
    config: BenchConfig, harness: SagaHarness, broker: str, echo: Echo, bare_ids: list[str]
) -> dict[str, Any]:
    definition = harness.definition
    has_bare = harness.has_bare_chain
    report: dict[str, Any] = {
        "saga_type": definition.name,
        "steps": len(definition.steps),
        "machine": reporting.machine(broker),
        "config": asdict(config),
    }
    harness.prepare(sagas=config.sagas_needed)

    echo("counting SQL statements per step (in this process, through the step wrapper)")
    sql = count_sql(harness)
    echo(f"timing the step bodies in this process ({config.timed_sagas} sagas each way)")
    in_process = time_steps(harness, sagas=config.timed_sagas, offset=3)

    queues = (*queues_of(definition), BENCH_QUEUE)
    clear_queues(queues, purge=config.purge)
    # The figures are tracing's "off", whatever this process's environment says.
    pool = WorkerPool(
        concurrency=config.concurrency,
        queues=queues,
        includes=harness.worker_includes,
        env=TRACING_OFF,
    )
    refuse_foreign_workers(pool.nodename, allow=config.allow_foreign_workers)

    offset = 3 + 2 * config.timed_sagas  # sagas started in this process so far
    timeout = config.timeout

    def next_offset(count: int) -> int:
        nonlocal offset
        offset += count
        return offset - count

    def bare(run: Run) -> Run:
        bare_ids.extend(s.key for s in run.submitted)
        return run

    started = timezone.now()
    echo(f"starting the worker: {config.concurrency} prefork processes, log {pool.logfile}")
    try:
        pool.start()
        meters = BurstMeters(pool.process.pid)
        metered = meters.run
        # One of each, counting what submitting costs (the publish included).
        with counting() as submit_saga:
            first_saga = saga_job(harness, offset=next_offset(1))(0)
        wait_sagas([first_saga.key], timeout=timeout, expect=Saga.Status.COMPLETED)
        submit_bare = None
        if has_bare:
            with counting() as submit_bare:
                first_chain = bare_job(harness, offset=next_offset(1))(0)
            bare_ids.append(first_chain.key)
            wait_bare([first_chain], timeout=timeout, since=started)
        if config.warmup:
            echo(f"warming up: {config.warmup} sagas" + (" and bare chains" if has_bare else ""))
            saga_run(
                saga_job(harness, offset=next_offset(config.warmup)),
                config.warmup,
                submitters=config.submitters,
                timeout=timeout,
            )
            if has_bare:
                bare(
                    bare_run(
                        bare_job(harness, offset=next_offset(config.warmup)),
                        config.warmup,
                        submitters=config.submitters,
                        timeout=timeout,
                    )
                )

        # Saga and bare bursts alternate (saga, bare, bare, saga, ...) so that a
        # load that drifts during the run weighs on both alike.
        saga_bursts: list[Run] = []
        bare_bursts: list[Run] = []
        kinds = ("saga", "bare") if has_bare else ("saga",)
        for number, size in enumerate(config.round_sizes):
            order = kinds if number % 2 == 0 else tuple(reversed(kinds))
            for kind in order:
                if kind == "saga":
                    echo(
                        f"burst: {size} {definition.name} sagas "
                        f"from {config.submitters} submitter threads"
                    )
                    run = metered(
                        "sagas",
                        lambda size=size: saga_run(
                            saga_job(harness, offset=next_offset(size)),
                            size,
                            submitters=config.submitters,
                            timeout=timeout,
                        ),
                    )
                    saga_bursts.append(run)
                    echo(f"  {run.per_s:.1f} sagas/s")
                else:
                    echo(f"burst: {size} bare chains")
                    run = bare(
                        metered(
                            "bare_chains",
                            lambda size=size: bare_run(
                                bare_job(harness, offset=next_offset(size)),
                                size,
                                submitters=config.submitters,
                                timeout=timeout,
                            ),
                        )
                    )
                    bare_bursts.append(run)
                    echo(f"  {run.per_s:.1f} bare chains/s")
        burst = Bursts(saga_bursts)
        bare_burst = Bursts(bare_bursts) if bare_bursts else None
        steps = len(definition.steps)
        echo(f"burst: {config.sagas} chains of {steps} no-op tasks (Celery's own floor)")
        noop_burst = bare(
            metered(
                "noop_chains",
                lambda: bare_run(
                    noop_job(definition),
                    config.sagas,
                    submitters=config.submitters,
                    timeout=timeout,
                ),
            )
        )
        echo(f"  {noop_burst.per_s:.1f} no-op chains/s")

        half_rate = burst.per_s / 2
        half = None
        if config.half_load_count:
            echo(f"open loop: {config.half_load_count} sagas at {half_rate:.1f}/s")
            half = saga_run(
                saga_job(harness, offset=next_offset(config.half_load_count)),
                config.half_load_count,
                submitters=config.submitters,
                timeout=timeout,
                rate=half_rate,
            )

        ok_tasks, failing_tasks = _failing_saga_tasks(definition)
        failure_rate = half_rate * ok_tasks / failing_tasks
        last_step = definition.steps[-1].name
        echo(
            f"open loop: {config.failure_count} sagas failing at {last_step} "
            f"at {failure_rate:.1f}/s (half the capacity in tasks: {failing_tasks} per saga)"
        )
        failing = saga_run(
            saga_job(
                harness, offset=next_offset(config.failure_count), chaos={"fail": [last_step]}
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
            saga_job(harness, offset=next_offset(config.lone)), config.lone, timeout=timeout
        )
        lone_chains = (
            bare(
                lone_bare(
                    bare_job(harness, offset=next_offset(config.lone)), config.lone, timeout=timeout
                )
            )
            if has_bare
            else None
        )
        lone_noop = bare(lone_bare(noop_job(definition), config.lone, timeout=timeout))
        rss = pool.rss()
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- worker log (tail) ---\n{pool.log_tail()}") from None
    finally:
        pool.stop()
        pool.discard_log()  # a failure's message above carries its tail

    if config.profile_sagas:
        profile_offset = next_offset(config.profile_sagas + PROFILE_WARMUP)
        report["profile"] = _profile(
            harness,
            queues=queues,
            concurrency=config.concurrency,
            count=config.profile_sagas,
            offset=profile_offset,
            timeout=timeout,
            echo=echo,
            bare_ids=bare_ids,
        )

    if config.tracing == "drop":
        echo("counting SQL statements per step again, with tracing on (spans dropped)")
        with tracing.dropping():
            traced_sql = count_sql(harness, offset=next_offset(3))
        report["tracing"] = tracing_cost.tracing_cost(
            harness,
            queues=queues,
            concurrency=config.concurrency,
            burst=config.tracing_burst,
            lone=config.tracing_lone,
            submitters=config.submitters,
            timeout=timeout,
            next_offset=next_offset,
            echo=echo,
        )
        report["tracing"]["sql_per_step"] = {
            key: traced_sql[key] for key in ("action", "compensation", "bookkeeping_per_step_mean")
        }

    sql["saga_level"]["submit"] = submit_saga.summary()
    sql["saga_level"]["submit_bare"] = submit_bare.summary() if submit_bare else None
    report.update(
        {
            "sagas_per_s": round(burst.per_s, 2),
            "bare_chains_per_s": round(bare_burst.per_s, 2) if bare_burst else None,
            "bursts_per_s": {
                "sagas": burst.rates,
                "bare_chains": bare_burst.rates if bare_burst else [],
            },
            "overhead_ratio": round(burst.per_s / bare_burst.per_s, 3) if bare_burst else None,
            "noop_ratio": round(burst.per_s / noop_burst.per_s, 3),
            "latency_ms": _latency(burst, measured="created_at -> finished_at, burst"),
            "bare_latency_ms": (
                _latency(bare_burst, measured="rows created -> last commit") if bare_burst else None
            ),
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
            "bare_lone_latency_ms": _latency(lone_chains) if lone_chains else None,
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
            "burst_cpu": meters.as_dict(),
            "worker_rss_mb": rss["total"],
            "worker_rss": rss,
        }
    )
    report["machine"]["load_average_at_end"] = reporting.load_average()
    report["targets"] = reporting.judge(report)
    return report
