"""What tracing costs the workers: the same sagas with tracing off and with spans made and dropped.

``bench --tracing drop`` runs this after the other phases. Workers are
started in turns (off, drop, drop, off), each for one burst and a few lone
sagas, so that a machine whose speed drifts weighs on both alike; the drop
workers run with ``OTEL_TRACES_EXPORTER=drop``: every instrumentation and
the engine's attempt spans, a BatchSpanProcessor, and an exporter that
throws the batches away, so nothing is sent and nothing is waited for. This
process makes each saga's span the same way (the saga's ``trace_context``
is written), as the web process would; its Django and publish spans are
not made (they cost the web, not the workers).

Reported per variant: sagas/s over the bursts, worker CPU ms per saga
(user + system of the worker's main process and children, through the
burst), and the lone sagas' latency; and drop's ratio to off for each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sagas import tracing
from sagas.bench import report as reporting
from sagas.bench.throughput import lone_sagas, saga_job, saga_run
from sagas.bench.workers import BenchError, WorkerPool
from sagas.harness.plugin import SagaHarness

VARIANTS = ("off", "drop", "drop", "off")
WARMUP = 3
EXPORTER = {"off": "none", "drop": "drop"}


def sagas_needed(*, burst: int, lone: int) -> int:
    return len(VARIANTS) * (WARMUP + burst + lone)


def tracing_cost(
    harness: SagaHarness,
    *,
    queues: tuple[str, ...],
    concurrency: int,
    burst: int,
    lone: int,
    submitters: int,
    timeout: float,
    next_offset: Callable[[int], int],
    echo: Callable[[str], None],
) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {"off": [], "drop": []}
    for variant in VARIANTS:
        pool = WorkerPool(
            concurrency=concurrency,
            queues=queues,
            includes=harness.worker_includes,
            env={"OTEL_TRACES_EXPORTER": EXPORTER[variant]},
        )
        echo(
            f"tracing {variant}: {burst} sagas in a burst, then {lone} lone, on a worker with "
            f"OTEL_TRACES_EXPORTER={EXPORTER[variant]} (log {pool.logfile})"
        )
        try:
            with tracing.dropping(on=variant == "drop"):
                pool.start()
                lone_sagas(saga_job(harness, offset=next_offset(WARMUP)), WARMUP, timeout=timeout)
                before = pool.cpu_seconds()
                run = saga_run(
                    saga_job(harness, offset=next_offset(burst)),
                    burst,
                    submitters=submitters,
                    timeout=timeout,
                )
                cpu = pool.cpu_seconds() - before
                alone = lone_sagas(
                    saga_job(harness, offset=next_offset(lone)), lone, timeout=timeout
                )
        except BenchError as exc:
            raise BenchError(f"{exc}\n--- worker log (tail) ---\n{pool.log_tail()}") from None
        finally:
            pool.stop()
            pool.discard_log()
        rounds[variant].append(
            {"per_s": run.per_s, "cpu_ms_per_saga": cpu * 1000 / burst, "lone": alone.latencies_ms}
        )
        echo(f"  {run.per_s:.1f} sagas/s, worker CPU {cpu * 1000 / burst:.2f} ms per saga")
    figures = {variant: _figures(runs) for variant, runs in rounds.items()}
    off, drop = figures["off"], figures["drop"]
    return {
        **figures,
        "ratio_drop_to_off": {
            "sagas_per_s": _ratio(drop["sagas_per_s"], off["sagas_per_s"]),
            "cpu_ms_per_saga": _ratio(drop["cpu_ms_per_saga"], off["cpu_ms_per_saga"]),
            "lone_p50_ms": _ratio(drop["lone_latency_ms"]["p50"], off["lone_latency_ms"]["p50"]),
        },
        "measured": (
            f"workers started in turns {' '.join(VARIANTS)}; each: a burst of {burst} sagas "
            f"from {submitters} submitters, then {lone} lone sagas"
        ),
    }


def _figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "sagas_per_s": round(sum(r["per_s"] for r in runs) / len(runs), 2),
        "bursts_per_s": [round(r["per_s"], 2) for r in runs],
        "cpu_ms_per_saga": round(sum(r["cpu_ms_per_saga"] for r in runs) / len(runs), 2),
        "lone_latency_ms": reporting.summary([ms for r in runs for ms in r["lone"]]),
    }


def _ratio(value: float | None, base: float | None) -> float | None:
    if not value or not base:
        return None
    return round(value / base, 3)
