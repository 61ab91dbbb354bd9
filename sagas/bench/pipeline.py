"""``manage.py bench --pipeline``: what the worker's pipeline, not the steps, bounds.

A burst on the production worker (prefork, two pool processes, prefetch
multiplier 1 with late acks) leaves part of this machine's CPU idle: each
pool process runs one task at a time, and between two tasks it waits for its
main process to take the result, acknowledge the message, fetch the next one
from Redis and hand it over. This mode measures how far that pipeline, rather
than the work in a step, sets the throughput: sagas, bare chains and no-op
chains in bursts on a worker restarted for each variant, changing one setting
of the production worker each (a third pool process, a prefetched message per
process, task events published one by one, task events off), taken in turns
(reversed every round) and judged as ratios to the production worker's
figures of the same run, with where the CPU went in each burst
(``sagas.bench.cpu``) and the worker's memory. The variants are what would
move the bound, not the product's settings: the production worker stays as
``config/Procfile`` starts it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from sagas.bench import report as reporting
from sagas.bench.cpu import BurstMeters
from sagas.bench.runner import TRACING_OFF, harness_run
from sagas.bench.tasks import BENCH_QUEUE
from sagas.bench.throughput import bare_job, bare_run, noop_job, saga_job, saga_run
from sagas.bench.workers import (
    BenchError,
    WorkerPool,
    check_flags,
    clear_queues,
    refuse_foreign_workers,
    worker_flag_checks,
)
from sagas.harness.plugin import SagaHarness
from sagas.harness.processes import queues_of

WARMUP = 10
BASELINE = "production"
# Issue 11's targets a pipeline variant can be judged on (sagas.bench.report.TARGETS).
TARGET_KEYS = ("sagas_per_s", "sagas_per_s_vs_noop", "overhead_ratio", "worker_rss_mb")


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    extra_processes: int = 0  # pool processes beyond --concurrency
    prefetch: int | None = None  # --prefetch-multiplier; None: the settings' (1)
    env: dict[str, str] = field(default_factory=dict)  # the worker's environment


VARIANTS = [
    Variant(
        BASELINE, "the Procfile's worker: prefetch multiplier 1, late acks, task events in batches"
    ),
    Variant(
        "one more process",
        "a pool process more than --concurrency: more tasks in flight, and its memory",
        extra_processes=1,
    ),
    Variant(
        "prefetch 2",
        "--prefetch-multiplier 2: a pool process's next message already in the main "
        "process (a message prefetched by a busy worker waits there, leased, instead of "
        "going to an idle one)",
        prefetch=2,
    ),
    Variant(
        "events unbatched",
        "SAGA_TASK_EVENTS_FLUSH_MS=0: Celery's own flush, one PUBLISH per task event "
        "(sagas.events)",
        env={"SAGA_TASK_EVENTS_FLUSH_MS": "0"},
    ),
    Variant(
        "no task events",
        "CELERY_WORKER_SEND_TASK_EVENTS=false: the main process publishes no task events "
        "(Flower shows no tasks)",
        env={"CELERY_WORKER_SEND_TASK_EVENTS": "false"},
    ),
]


@dataclass(frozen=True)
class PipelineConfig:
    saga_type: str = "trip_booking"
    sagas: int = 200  # per burst, of each kind
    rounds: int = 2
    submitters: int = 4
    concurrency: int = 2
    timeout: float = 300.0
    purge: bool = False
    allow_foreign_workers: bool = False
    keep: bool = False

    def __post_init__(self) -> None:
        check_flags(
            [
                (self.sagas >= 1, "--sagas must be at least 1"),
                (1 <= self.rounds <= 20, "--rounds must be between 1 and 20"),
                *worker_flag_checks(
                    submitters=self.submitters,
                    concurrency=self.concurrency,
                    timeout=self.timeout,
                ),
            ]
        )

    @property
    def sagas_needed(self) -> int:
        """Sagas and bare chains of every variant and round, warm-ups included."""
        return 2 * self.rounds * len(VARIANTS) * (WARMUP + self.sagas)


def run_pipeline(config: PipelineConfig, echo) -> dict[str, Any]:
    with harness_run(
        config.saga_type, keep=config.keep, echo=echo, title="bench --pipeline"
    ) as run:
        if not run.harness.has_bare_chain:
            raise ValueError(
                f"--pipeline compares sagas with their bare chain; {config.saga_type}'s "
                "plug-in has none"
            )
        return _run(config, run.harness, run.broker, echo, run.bare_ids)


def _run(
    config: PipelineConfig, harness: SagaHarness, broker: str, echo, bare_ids: list[str]
) -> dict[str, Any]:
    definition = harness.definition
    queues = (*queues_of(definition), BENCH_QUEUE)
    clear_queues(queues, purge=config.purge)
    refuse_foreign_workers(WorkerPool(queues=queues).nodename, allow=config.allow_foreign_workers)
    machine = reporting.machine(broker)  # its load average: before the run
    harness.prepare(sagas=config.sagas_needed)
    offset = 0

    def take(count: int) -> int:
        nonlocal offset
        offset += count
        return offset - count

    echo(
        f"{len(VARIANTS)} worker variants, {config.rounds} rounds of a {config.sagas}-saga, "
        f"{config.sagas}-bare-chain and {config.sagas}-no-op-chain burst each, a fresh worker "
        "every time"
    )
    runs: dict[str, list[dict[str, Any]]] = {variant.name: [] for variant in VARIANTS}
    for number in range(config.rounds):
        echo(f"round {number + 1}")
        order = VARIANTS if number % 2 == 0 else list(reversed(VARIANTS))
        for variant in order:
            figures = _one(variant, harness, config, queues, take, bare_ids)
            runs[variant.name].append(figures)
            idle = (figures["cpu"]["sagas"] or {}).get("idle_share")
            echo(
                f"  {variant.name:<17} sagas {figures['sagas_per_s']:5.1f}/s   "
                f"bare {figures['bare_chains_per_s']:5.1f}/s   "
                f"no-op {figures['noop_chains_per_s']:5.1f}/s   "
                f"idle {'-' if idle is None else f'{idle:.0%}'}   RSS {figures['rss_mb']:.0f} MB"
            )
    report: dict[str, Any] = {
        "kind": "pipeline",
        "saga_type": definition.name,
        "steps": len(definition.steps),
        "machine": machine,
        "config": asdict(config),
        "variants": {variant.name: variant.what for variant in VARIANTS},
        "results": _compare(runs),
    }
    report["machine"]["load_average_at_end"] = reporting.load_average()
    return report


def _one(
    variant: Variant,
    harness: SagaHarness,
    config: PipelineConfig,
    queues: tuple[str, ...],
    take,
    bare_ids: list[str],
) -> dict[str, Any]:
    """One round of one variant: a fresh worker, a warm-up, the three bursts metered."""
    pool = WorkerPool(
        concurrency=config.concurrency + variant.extra_processes,
        queues=queues,
        includes=harness.worker_includes,
        env={**TRACING_OFF, **variant.env},
        options={"prefetch": variant.prefetch},
    )
    definition = harness.definition
    size, submitters, timeout = config.sagas, config.submitters, config.timeout
    try:
        pool.start()
        saga_run(
            saga_job(harness, offset=take(WARMUP)), WARMUP, submitters=submitters, timeout=timeout
        )
        bare_ids.extend(
            s.key
            for s in bare_run(
                bare_job(harness, offset=take(WARMUP)),
                WARMUP,
                submitters=submitters,
                timeout=timeout,
            ).submitted
        )
        meters = BurstMeters(pool.process.pid)
        metered = meters.run
        sagas = metered(
            "sagas",
            lambda: saga_run(
                saga_job(harness, offset=take(size)), size, submitters=submitters, timeout=timeout
            ),
        )
        bare = metered(
            "bare_chains",
            lambda: bare_run(
                bare_job(harness, offset=take(size)), size, submitters=submitters, timeout=timeout
            ),
        )
        bare_ids.extend(s.key for s in bare.submitted)
        noop = metered(
            "noop_chains",
            lambda: bare_run(noop_job(definition), size, submitters=submitters, timeout=timeout),
        )
        bare_ids.extend(s.key for s in noop.submitted)
        rss = pool.rss()
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- worker log (tail) ---\n{pool.log_tail()}") from None
    finally:
        pool.stop()
        pool.discard_log()
    return {
        "sagas_per_s": sagas.per_s,
        "bare_chains_per_s": bare.per_s,
        "noop_chains_per_s": noop.per_s,
        "cpu": meters.as_dict(),
        "rss_mb": rss["total"],
        "processes": rss["processes"],
    }


def _compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the rounds, the issue's targets they meet, and ratios to production."""
    results: dict[str, Any] = {}
    for name, rounds in runs.items():

        def median(key: str, rounds=rounds) -> float:
            return round(statistics.median(r[key] for r in rounds), 2)

        def cpu(kind: str, key: str, rounds=rounds) -> float | None:
            values = [r["cpu"][kind][key] for r in rounds if r["cpu"].get(kind)]
            return round(statistics.median(values), 3) if values else None

        sagas, bare, noop = (
            median("sagas_per_s"),
            median("bare_chains_per_s"),
            median("noop_chains_per_s"),
        )
        figures = {
            "sagas_per_s": sagas,
            "noop_chains_per_s": noop,
            "overhead_ratio": sagas / bare,
            "worker_rss_mb": median("rss_mb"),
        }
        results[name] = {
            "sagas_per_s": sagas,
            "bare_chains_per_s": bare,
            "noop_chains_per_s": noop,
            "rounds_sagas_per_s": [round(r["sagas_per_s"], 2) for r in rounds],
            "saga_to_bare": round(sagas / bare, 3),
            "saga_to_noop": round(sagas / noop, 3),
            "idle_share": {kind: cpu(kind, "idle_share") for kind in rounds[0]["cpu"]},
            "busy_cores_sagas": cpu("sagas", "busy_cores"),
            "rss_mb": median("rss_mb"),
            "pool_processes": rounds[0]["processes"] - 1,
            "targets": {target.key: reporting.met(target, figures) for target in _targets()},
        }
    base = results[BASELINE]
    for result in results.values():
        for kind in ("sagas_per_s", "bare_chains_per_s", "noop_chains_per_s"):
            result[f"{kind}_ratio"] = round(result[kind] / base[kind], 3)
    return results


def _targets() -> list[reporting.Target]:
    return [target for target in reporting.TARGETS if target.key in TARGET_KEYS]


def pipeline_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    config = report["config"]
    lines = [
        f"pipeline: {report['saga_type']} sagas, bare chains and no-op chains of "
        f"{report['steps']} tasks; prefork -c {config['concurrency']} unless the variant "
        "says otherwise; medians of "
        f"{config['rounds']} rounds",
        f"machine: {m['cores']} cores, {m['cpu']}; {m['database']}, {m['redis']}; load "
        f"{m['load_average_at_start']} -> {m.get('load_average_at_end')}",
        "",
        f"{'variant':<18}{'sagas/s':>8}{'ratio':>7}{'bare/s':>8}{'ratio':>7}{'no-op/s':>9}"
        f"{'ratio':>7}{'saga/bare':>10}{'saga/no-op':>11}{'idle':>6}{'RSS MB':>8}  targets met",
    ]
    for name, r in report["results"].items():
        met = [target for target, ok in r["targets"].items() if ok]
        idle = r["idle_share"].get("sagas")
        lines.append(
            f"{name:<18}{r['sagas_per_s']:>8.1f}{r['sagas_per_s_ratio']:>7.3f}"
            f"{r['bare_chains_per_s']:>8.1f}{r['bare_chains_per_s_ratio']:>7.3f}"
            f"{r['noop_chains_per_s']:>9.1f}{r['noop_chains_per_s_ratio']:>7.3f}"
            f"{r['saga_to_bare']:>10.3f}{r['saga_to_noop']:>11.3f}"
            f"{'-' if idle is None else f'{idle:.0%}':>6}{r['rss_mb']:>8.0f}  "
            f"{len(met)}/{len(r['targets'])}"
        )
    where = (
        ""
        if reporting.targets_apply(report)
        else f" (PostgreSQL's, shown for comparison on {m['database']})"
    )
    lines += [
        "  ratio: against 'production' in the same run; idle: the machine's idle share during",
        f"  the saga bursts; targets met: of issue 11's{where}:",
        *(
            f"    {target.what} {reporting.SYMBOLS[target.comparison]} {target.bound:g}"
            + (f" x {target.scale}" if target.scale else "")
            for target in _targets()
        ),
        "",
        *(f"  {name}: {what}" for name, what in report["variants"].items()),
    ]
    return "\n".join(lines)
