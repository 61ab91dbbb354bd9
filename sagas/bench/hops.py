"""``manage.py bench --hops``: what Celery's per-task machinery costs each hop of a chain.

No-op chains (one task per step of the saga type) run against a worker
restarted for every variant, each variant changing one thing against the
production worker (``config/Procfile``'s options): task events, the
"received/succeeded" log lines, gossip and mingle, late acks, a stored
result per task, rate limits, an errback in every message. Variants are
taken in turns, reversed every round, and judged as ratios to the
production variant's figures of the same run, since the machine's load
drifts. Beside them, measured in this process: the bytes of each hop's
message and what (de)serializing it costs, and what the Django fixup's
per-task checks cost.
"""

from __future__ import annotations

import json
import statistics
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from celery import current_app
from django.utils import timezone
from django_celery_results.models import TaskResult

from sagas.bench import report as reporting
from sagas.bench.tasks import BENCH_QUEUE, NOOP, VARIANT_ENV, noop_chain
from sagas.bench.throughput import Submitted, bare_run, lone_bare, noop_job
from sagas.bench.workers import (
    BenchError,
    WorkerPool,
    broker_url,
    check_flags,
    clear_queues,
    refuse_foreign_workers,
    worker_flag_checks,
)
from sagas.canvas import action_chain
from sagas.definitions import SagaDefinition, registry
from sagas.errors import UnknownSagaType

# The production worker (config/Procfile, docker-compose.yml): task events
# (CELERY_WORKER_SEND_TASK_EVENTS, no -E so that setting decides), INFO
# logging, gossip and mingle.
PRODUCTION = {"events": False, "loglevel": "INFO", "gossip": True}


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    options: dict[str, Any] = field(default_factory=dict)  # worker_argv's, over PRODUCTION
    worker: dict[str, Any] = field(default_factory=dict)  # sagas.bench.tasks._apply_variant
    env: dict[str, str] = field(default_factory=dict)  # the worker's environment
    link_error: bool = False  # chains whose every task carries an errback

    @property
    def argv_options(self) -> dict[str, Any]:
        return {**PRODUCTION, **self.options}


BASELINE = "production"
VARIANTS = [
    Variant(BASELINE, "the production worker: task events, --loglevel INFO, gossip and mingle"),
    Variant(
        "no task events",
        "worker_send_task_events off (Flower shows no tasks until it enables them)",
        options={"events": False},
        worker={"task_events": False},
    ),
    Variant(
        "log WARNING",
        "--loglevel WARNING: no 'received'/'succeeded' INFO line per task",
        options={"loglevel": "WARNING"},
    ),
    Variant("no gossip/mingle", "--without-gossip --without-mingle", options={"gossip": False}),
    Variant(
        "early ack",
        "acks_late off: acked before running (gives up redelivery)",
        worker={"acks_late": False},
    ),
    Variant(
        "result per task",
        "every task stores its result (steps: ignore_result off)",
        worker={"store_results": True},
    ),
    Variant("rate limits off", "worker_disable_rate_limits", worker={"disable_rate_limits": True}),
    Variant("errback per task", "every message carries a link_error, as a saga's", link_error=True),
]


@dataclass(frozen=True)
class HopsConfig:
    saga_type: str = "trip_booking"
    chains: int = 300
    lone: int = 30
    rounds: int = 2
    submitters: int = 4
    concurrency: int = 2
    timeout: float = 300.0
    purge: bool = False
    allow_foreign_workers: bool = False

    def __post_init__(self) -> None:
        check_flags(
            [
                (self.chains >= 1, "--sagas must be at least 1"),
                (self.lone >= 1, "--lone must be at least 1"),
                (1 <= self.rounds <= 20, "--rounds must be between 1 and 20"),
                *worker_flag_checks(
                    submitters=self.submitters,
                    concurrency=self.concurrency,
                    timeout=self.timeout,
                ),
            ]
        )

    @property
    def variants(self) -> list[Variant]:
        return VARIANTS


def _noop_job(definition: SagaDefinition, link_error: bool):
    if not link_error:
        return noop_job(definition)

    def job(_i: int) -> Submitted:
        last_task_id = str(uuid.uuid4())
        started = time.time()
        noop_chain(definition, last_task_id=last_task_id, link_error=True).apply_async()
        return Submitted(key=last_task_id, started=started)

    return job


def _one(variant: Variant, definition: SagaDefinition, config: HopsConfig, echo) -> dict[str, Any]:
    """One round of one variant: a fresh worker, a warm-up, a burst, lone chains."""
    pool = WorkerPool(
        concurrency=config.concurrency,
        queues=(BENCH_QUEUE,),
        env={**variant.env, VARIANT_ENV: json.dumps(variant.worker)},
        options=variant.argv_options,
    )
    job = _noop_job(definition, variant.link_error)
    try:
        pool.start()
        bare_run(job, 10, submitters=config.submitters, timeout=config.timeout)
        cpu = pool.cpu_seconds()
        burst = bare_run(job, config.chains, submitters=config.submitters, timeout=config.timeout)
        cpu = pool.cpu_seconds() - cpu
        lone = lone_bare(job, config.lone, timeout=config.timeout)
        rss = pool.rss()["total"]
    except BenchError as exc:
        raise BenchError(f"{exc}\n--- worker log (tail) ---\n{pool.log_tail()}") from None
    finally:
        pool.stop()
        pool.discard_log()
    lone_p50 = reporting.summary(lone.latencies_ms)["p50"]
    # The worker's CPU per task: what the machinery costs, whatever else the
    # machine runs meanwhile (which moves the rates far more).
    cpu_ms = cpu * 1000 / (config.chains * len(definition.steps))
    echo(
        f"  {variant.name:<18} {burst.per_s:7.1f} chains/s   CPU {cpu_ms:5.2f} ms/task   "
        f"lone p50 {lone_p50:6.1f} ms   RSS {rss:.0f} MB"
    )
    return {"chains_per_s": burst.per_s, "cpu_ms": cpu_ms, "lone_p50_ms": lone_p50, "rss_mb": rss}


def message_sizes(definition: SagaDefinition, *, repeat: int = 200) -> dict[str, Any]:
    """Each hop's message as Redis holds it, for the saga and the no-op chain, and its codec cost.

    Hop ``k``'s message carries the rest of the chain (every later
    signature, with its errback): the chain from step ``k`` on is published
    to a scratch queue nobody consumes, read back and dropped.
    """
    client = redis.Redis.from_url(broker_url())
    scratch = f"bench-sizing-{uuid.uuid4().hex[:8]}"
    steps = len(definition.steps)
    kinds = {
        "saga": lambda k: action_chain(definition, str(uuid.uuid4()), start=k),
        "no-op": lambda k: _tail(noop_chain(definition, last_task_id=str(uuid.uuid4())), k),
        "no-op + errbacks": lambda k: _tail(
            noop_chain(definition, last_task_id=str(uuid.uuid4()), link_error=True), k
        ),
    }
    sizes: dict[str, Any] = {}
    try:
        for kind, build in kinds.items():
            rows = []
            for k in range(steps):
                sig = build(k)
                for task in sig.tasks:
                    task.set(queue=scratch)
                sig.apply_async()
                raw = client.rpop(scratch)
                rows.append({"hop": k + 1, "bytes": len(raw), **_codec_ms(raw, repeat)})
            sizes[kind] = rows
    finally:
        client.delete(scratch)
    return sizes


def _tail(sig, k: int):
    from celery import chain

    return chain(*sig.tasks[k:])


def _codec_ms(raw: bytes, repeat: int) -> dict[str, float]:
    """Reading a message as the worker does (envelope, base64 body, JSON), and writing it back."""
    import base64

    from kombu.serialization import dumps, loads

    envelope = json.loads(raw)
    body = json.loads(base64.b64decode(envelope["body"]))
    start = time.perf_counter()
    for _ in range(repeat):
        dumps(body, serializer="json")
    dumped = time.perf_counter()
    for _ in range(repeat):
        message = json.loads(raw)
        loads(base64.b64decode(message["body"]), "application/json", "utf-8")
    loaded = time.perf_counter()
    return {
        "body_bytes": len(base64.b64decode(envelope["body"])),
        "serialize_ms": round((dumped - start) * 1000 / repeat, 4),
        "deserialize_ms": round((loaded - dumped) * 1000 / repeat, 4),
    }


def fixup_cost_us(repeat: int = 20_000) -> float | None:
    """Microseconds the Django fixup's task_prerun + task_postrun receivers take per task."""
    from celery.fixups.django import DjangoWorkerFixup

    fixup = DjangoWorkerFixup(current_app)
    task = current_app.tasks[NOOP]
    start = time.perf_counter()
    for _ in range(repeat):
        fixup.on_task_prerun(sender=task)
        fixup.on_task_postrun(sender=task)
    return round((time.perf_counter() - start) * 1e6 / repeat, 2)


def run_hops(config: HopsConfig, echo) -> dict[str, Any]:
    try:
        definition = registry.get(config.saga_type)
    except UnknownSagaType as exc:
        raise ValueError(f"--saga-type: {exc}") from None
    steps = len(definition.steps)
    queues = (BENCH_QUEUE,)
    clear_queues(queues, purge=config.purge)
    refuse_foreign_workers(WorkerPool(queues=queues).nodename, allow=config.allow_foreign_workers)
    report: dict[str, Any] = {
        "kind": "hops",
        "saga_type": definition.name,
        "steps": steps,
        "machine": reporting.machine(broker_url()),
        "config": asdict(config),
        "variants": {v.name: v.what for v in config.variants},
    }
    since = timezone.now()
    echo(
        f"hops: chains of {steps} no-op tasks, {len(config.variants)} worker variants, "
        f"{config.rounds} rounds of a {config.chains}-chain burst and {config.lone} lone chains "
        "each, a fresh worker every time"
    )
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in config.variants}
    try:
        for number in range(config.rounds):
            echo(f"round {number + 1}")
            order = config.variants if number % 2 == 0 else list(reversed(config.variants))
            for variant in order:
                runs[variant.name].append(_one(variant, definition, config, echo))
        echo("message sizes and codec cost, in this process")
        report["messages"] = message_sizes(definition)
        report["django_fixup_us_per_task"] = fixup_cost_us()
    finally:
        TaskResult.objects.filter(task_name__startswith="bench.", date_done__gte=since).delete()
    report["machine"]["load_average_at_end"] = reporting.load_average()
    report["results"] = _compare(runs, steps)
    return report


def _compare(runs: dict[str, list[dict[str, Any]]], steps: int) -> dict[str, Any]:
    """Medians over the rounds, and each variant against the production worker's."""
    results = {}
    for name, rounds in runs.items():
        rate = statistics.median(r["chains_per_s"] for r in rounds)
        lone = statistics.median(r["lone_p50_ms"] for r in rounds)
        cpu = statistics.median(r["cpu_ms"] for r in rounds)
        results[name] = {
            "cpu_ms_per_hop": round(cpu, 3),
            "rounds_cpu_ms_per_hop": [round(r["cpu_ms"], 3) for r in rounds],
            "chains_per_s": round(rate, 2),
            "rounds_chains_per_s": [round(r["chains_per_s"], 2) for r in rounds],
            "ms_per_hop_burst": round(1000 / (rate * steps), 3),
            "lone_p50_ms": round(lone, 2),
            "ms_per_hop_lone": round(lone / steps, 3),
            "rss_mb": statistics.median(r["rss_mb"] for r in rounds),
        }
    base = results[BASELINE]
    for result in results.values():
        result["cpu_ratio"] = round(result["cpu_ms_per_hop"] / base["cpu_ms_per_hop"], 3)
        result["cpu_ms_per_hop_delta"] = round(result["cpu_ms_per_hop"] - base["cpu_ms_per_hop"], 3)
        result["throughput_ratio"] = round(result["chains_per_s"] / base["chains_per_s"], 3)
        result["burst_ms_per_hop_delta"] = round(
            result["ms_per_hop_burst"] - base["ms_per_hop_burst"], 3
        )
        result["lone_ms_per_hop_delta"] = round(
            result["ms_per_hop_lone"] - base["ms_per_hop_lone"], 3
        )
    return results


def hops_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    steps = report["steps"]
    lines = [
        f"hops: chains of {steps} no-op tasks ({report['saga_type']}'s length), "
        f"prefork -c {report['config']['concurrency']}",
        f"machine: {m['cores']} cores, {m['cpu']}; {m['database']}, {m['redis']}; load "
        f"{m['load_average_at_start']} -> {m.get('load_average_at_end')}",
        "",
        f"{'variant':<19}{'CPU ms':>7}{'ratio':>7}{'delta':>7}"
        f"{'chains/s':>9}{'ratio':>7}{'ms/hop':>8}{'delta':>7}"
        f"{'lone p50':>10}{'ms/hop':>8}{'delta':>7}{'RSS MB':>8}  rounds (CPU ms/hop)",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"{name:<19}{r['cpu_ms_per_hop']:>7.3f}{r['cpu_ratio']:>7.3f}"
            f"{r['cpu_ms_per_hop_delta']:>+7.3f}"
            f"{r['chains_per_s']:>9.1f}{r['throughput_ratio']:>7.3f}"
            f"{r['ms_per_hop_burst']:>8.3f}{r['burst_ms_per_hop_delta']:>+7.3f}"
            f"{r['lone_p50_ms']:>10.1f}{r['ms_per_hop_lone']:>8.3f}"
            f"{r['lone_ms_per_hop_delta']:>+7.3f}{r['rss_mb']:>8.0f}  "
            + " ".join(f"{x:.2f}" for x in r["rounds_cpu_ms_per_hop"])
        )
    lines += [
        "  CPU ms: the worker's CPU (main process + pool, user + system) per task in the burst,",
        "  the steadiest figure on a shared machine; medians over the rounds.",
        "  ms/hop (burst): 1000 / (chains/s x tasks per chain), the worker's time per task;",
        "  ms/hop (lone): a lone chain's p50 latency / tasks; delta: against 'production'.",
        "",
        *(f"  {name}: {what}" for name, what in report["variants"].items()),
        "",
        "message per hop, bytes in Redis (body bytes), serialize / deserialize ms:",
    ]
    for kind, rows in report["messages"].items():
        cells = "  ".join(
            f"{r['bytes']} ({r['body_bytes']}) {r['serialize_ms']:.3f}/{r['deserialize_ms']:.3f}"
            for r in rows
        )
        lines.append(f"  {kind:<17} {cells}")
    lines.append(
        f"Django fixup's task_prerun + task_postrun checks: "
        f"{report['django_fixup_us_per_task']} us per task (CELERY_DB_REUSE_MAX set)"
    )
    return "\n".join(lines)
