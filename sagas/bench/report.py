"""Summaries, targets, the machine a run came from, and the printed table."""

from __future__ import annotations

import os
import platform
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import celery
import django
import redis
from django.db import connection

from sagas.bench.profile import profile_lines
from sagas.selectors import percentile


# Issue 11's targets, for PostgreSQL on a 2-core machine with web, worker,
# Redis and the database on it, judged on one run. A target whose ``scale``
# names another figure is relative: the bound is ``bound`` times that figure
# of the same run (the no-op chain's rate is this machine's Celery floor).
@dataclass(frozen=True)
class Target:
    key: str  # its name in the report's "targets"
    path: str  # the figure judged, a path into the report
    comparison: str  # "<=" or ">="
    bound: float
    what: str
    scale: str | None = None  # a path: the bound is ``bound`` times this figure


TARGETS: list[Target] = [
    Target("sagas_per_s", "sagas_per_s", ">=", 40, "sagas per second (burst)"),
    Target(
        "sagas_per_s_vs_noop",
        "sagas_per_s",
        ">=",
        0.55,
        "sagas per second (burst), against the no-op chains/s",
        scale="noop_chains_per_s",
    ),
    Target("overhead_ratio", "overhead_ratio", ">=", 0.92, "saga / bare chain throughput"),
    Target("lone_latency_ms.p50", "lone_latency_ms.p50", "<=", 35, "lone saga latency p50, ms"),
    Target("lone_latency_ms.p99", "lone_latency_ms.p99", "<=", 60, "lone saga latency p99, ms"),
    Target(
        "half_load_latency_ms.p99",
        "half_load_latency_ms.p99",
        "<=",
        100,
        "latency p99 at half capacity, ms",
    ),
    Target(
        "compensation_latency_ms.p99",
        "compensation_latency_ms.p99",
        "<=",
        150,
        "last-step failure to COMPENSATED p99, ms",
    ),
    Target(
        "sql_per_step.bookkeeping_per_step_mean",
        "sql_per_step.bookkeeping_per_step_mean",
        "<=",
        2,
        "bookkeeping statements per step, mean",
    ),
    Target(
        "sql_per_step.action.domain",
        "sql_per_step.action.domain",
        "<=",
        4,
        "domain statements per action step, mean",
    ),
    Target(
        "sql_per_step.compensation.domain",
        "sql_per_step.compensation.domain",
        "<=",
        3,
        "domain statements per compensation, mean",
    ),
    Target("worker_rss_mb", "worker_rss_mb", "<=", 250, "worker RSS MB (main + 2 children)"),
]
# The database the targets were set for; runs on another are shown against
# them for comparison only.
TARGETS_DATABASE = "postgresql"
SYMBOLS = {"<=": "\u2264", ">=": "\u2265"}
SCALE_PAGE_TARGET_MS = 300


def summary(values: Iterable[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}

    def at(fraction: float) -> float:
        return round(percentile(ordered, fraction), 1)

    return {
        "n": len(ordered),
        "p50": at(0.5),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1], 1),
        "mean": round(sum(ordered) / len(ordered), 1),
    }


def lookup(report: dict[str, Any], path: str) -> Any:
    value: Any = report
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def passes(value: Any, comparison: str, bound: float | None) -> bool | None:
    if value is None or bound is None:
        return None
    return {"<=": value <= bound, ">=": value >= bound}[comparison]


# A saga does the bare chain's work and more: where the bare chain misses a
# target too, the target is out of reach for any saga engine on this machine.
BARE_BOUNDS = {
    "sagas_per_s": "bare_chains_per_s",
    "lone_latency_ms.p50": "bare_lone_latency_ms.p50",
    "lone_latency_ms.p99": "bare_lone_latency_ms.p99",
}


def _bound(target: Target, report: dict[str, Any]) -> tuple[float | None, str]:
    """The bound in the run's own terms, and how the issue writes it."""
    symbol = SYMBOLS[target.comparison]
    if target.scale is None:
        return target.bound, f"{symbol} {target.bound:g}"
    base = lookup(report, target.scale)
    if base is None:
        return None, f"{symbol} {target.bound:g} \u00d7 {target.scale} (-)"
    bound = round(target.bound * base, 2)
    return bound, f"{symbol} {target.bound:g} \u00d7 {base:g} = {bound:g}"


def targets_apply(report: dict[str, Any]) -> bool:
    """Whether the run was on the database the targets are for."""
    return str(report.get("machine", {}).get("database", "")).lower().startswith(TARGETS_DATABASE)


def met(target: Target, report: dict[str, Any]) -> bool | None:
    """Whether ``report`` meets ``target`` (None: the figure or its scale is missing)."""
    return passes(lookup(report, target.path), target.comparison, _bound(target, report)[0])


def judge(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    verdicts = {}
    for target in TARGETS:
        value = lookup(report, target.path)
        bound, written = _bound(target, report)
        verdict = {
            "what": target.what,
            "target": written,
            "bound": bound,
            "value": value,
            "pass": met(target, report),
        }
        if target.path in BARE_BOUNDS:
            bare = lookup(report, BARE_BOUNDS[target.path])
            verdict["bare_chain"] = bare
            verdict["bare_chain_passes"] = passes(bare, target.comparison, bound)
        verdicts[target.key] = verdict
    return verdicts


# --- the machine ------------------------------------------------------------------


def _meminfo_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def database_version() -> str:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            return f"PostgreSQL {cursor.fetchone()[0]}"
    if connection.vendor == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    return connection.vendor


def redis_version(url: str) -> str:
    try:
        return "Redis " + str(redis.Redis.from_url(url).info("server")["redis_version"])
    except Exception as exc:  # the report says what went wrong instead
        return f"unknown ({type(exc).__name__})"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine(broker_url: str) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_mb": _meminfo_mb(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "database": database_version(),
        "redis": redis_version(broker_url) if broker_url else None,
        "load_average_at_start": load_average(),
    }


# --- the table ----------------------------------------------------------------------


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ms(stats: dict[str, Any] | None, *keys: str) -> str:
    if not stats:
        return "-"
    return " / ".join("-" if stats.get(k) is None else f"{stats[k]:.1f}" for k in keys)


def table(report: dict[str, Any]) -> str:
    """The run as text: one line per figure, then the targets."""
    m = report["machine"]
    sql = report["sql_per_step"]
    steps = report.get("steps", 5)
    lines = [
        f"saga type: {report.get('saga_type', '-')}",
        f"machine: {m['cores']} cores, {m['memory_mb']} MB, {m['cpu']}; Python {m['python']}, "
        f"{m['database']}, {m['redis']}; load {m['load_average_at_start']} -> "
        f"{m.get('load_average_at_end')}",
        "",
        f"{'figure':<44}{'value':>26}",
        f"{'sagas/s (burst)':<44}{report['sagas_per_s']:>26.1f}",
        f"{'bare chains/s (burst)':<44}{_num(report['bare_chains_per_s'], '.1f'):>26}",
        f"{'  each burst, sagas | bare chains':<44}{_bursts(report.get('bursts_per_s')):>26}",
        f"{f'no-op {steps}-task chains/s (Celery floor)':<44}{report['noop_chains_per_s']:>26.1f}",
        f"{'overhead ratio saga/bare':<44}{_num(report['overhead_ratio'], '.3f'):>26}",
        f"{'burst latency p50/p95/p99 ms':<44}{_ms(report['latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'bare burst latency p50/p95/p99 ms':<44}"
        f"{_ms(report['bare_latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'half-load latency p50/p95/p99 ms':<44}"
        f"{_ms(report['half_load_latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'  at arrivals/s (submit lag p99 ms)':<44}{_rate(report['half_load_latency_ms']):>26}",
        f"{'lone saga latency p50/p95/p99 ms':<44}"
        f"{_ms(report['lone_latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'lone bare chain latency p50/p95/p99 ms':<44}"
        f"{_ms(report['bare_lone_latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'lone no-op chain latency p50/p95/p99 ms':<44}"
        f"{_ms(report['noop_lone_latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'compensation latency p50/p95/p99 ms':<44}"
        f"{_ms(report['compensation_latency_ms'], 'p50', 'p95', 'p99'):>26}",
        f"{'  at arrivals/s (submit lag p99 ms)':<44}"
        f"{_rate(report['compensation_latency_ms']):>26}",
        f"{'SQL per action step: total/bookkeeping/domain':<44}{_sql(sql['action']):>26}",
        f"{'SQL per compensation: total/bookkeeping/dom.':<44}{_sql(sql['compensation']):>26}",
        f"{'SQL per bare step: total/bookkeeping/domain':<44}{_sql(sql['bare_action']):>26}",
        f"{'bookkeeping per step: mean / max / ext. max':<44}{_bookkeeping(sql):>26}",
        f"{'result backend statements per task':<44}{sql['result_backend_per_task']:>26}",
        f"{'step bodies in-process ms/saga: saga/bare':<44}"
        f"{_steps(report.get('in_process_step_ms')):>26}",
        f"{'worker RSS MB (main + children)':<44}{report['worker_rss_mb']:>26.1f}",
    ]
    lines += cpu_lines(report.get("burst_cpu"))
    if report.get("profile"):
        lines += ["", *profile_lines(report["profile"])]
    if report.get("tracing"):
        lines += ["", *tracing_lines(report)]
    lines += ["", *target_lines(report)]
    return "\n".join(lines)


CPU_KINDS = {"sagas": "sagas", "bare_chains": "bare chains", "noop_chains": "no-op chains"}


def cpu_lines(burst_cpu: dict[str, Any] | None) -> list[str]:
    """Cores in use during each kind of burst, split by process, and the idle share."""
    measured = {kind: cpu for kind, cpu in (burst_cpu or {}).items() if cpu}
    if not measured:
        return []
    cores = next(iter(measured.values()))["cores"]
    lines = [
        "",
        f"CPU during the bursts, cores busy of {cores} = worker main + pool processes + the rest "
        "(database, broker, this process):",
    ]
    for kind, cpu in measured.items():
        lines.append(
            f"  {CPU_KINDS.get(kind, kind):<14}{cpu['busy_cores']:>5.2f} = "
            f"{cpu['worker_main_cores']:.2f} + {cpu['worker_pool_cores']:.2f} + "
            f"{cpu['rest_cores']:.2f}; idle {cpu['idle_share']:.0%}"
        )
    return lines


def tracing_lines(report: dict[str, Any]) -> list[str]:
    """``--tracing drop``: the workers' figures with tracing off and on, and SQL per step traced."""
    cost, sql = report["tracing"], report["tracing"]["sql_per_step"]
    off, drop = cost["off"], cost["drop"]
    ratio = cost["ratio_drop_to_off"]

    def lone(figures: dict[str, Any]) -> str:
        return _ms(figures["lone_latency_ms"], "p50", "p99")

    return [
        f"tracing: off vs drop (spans made, exported to nowhere); {cost['measured']}",
        f"{'':<40}{'off':>14}{'drop':>14}{'drop/off':>10}",
        f"{'  sagas/s (burst)':<40}{off['sagas_per_s']:>14.1f}{drop['sagas_per_s']:>14.1f}"
        f"{_num(ratio['sagas_per_s'], '.3f'):>10}",
        f"{'  worker CPU ms per saga':<40}{off['cpu_ms_per_saga']:>14.2f}"
        f"{drop['cpu_ms_per_saga']:>14.2f}{_num(ratio['cpu_ms_per_saga'], '.3f'):>10}",
        f"{'  lone saga latency p50 / p99 ms':<40}{lone(off):>14}{lone(drop):>14}"
        f"{_num(ratio['lone_p50_ms'], '.3f'):>10}",
        f"{'  bookkeeping statements per step, mean':<40}"
        f"{_num(report['sql_per_step']['bookkeeping_per_step_mean'], 'g'):>14}"
        f"{_num(sql['bookkeeping_per_step_mean'], 'g'):>14}",
        f"{'  SQL per action step: total/bk/domain':<40}"
        f"{_sql(report['sql_per_step']['action']):>14}{_sql(sql['action']):>16}",
        f"{'  SQL per compensation: total/bk/domain':<40}"
        f"{_sql(report['sql_per_step']['compensation']):>14}{_sql(sql['compensation']):>16}",
    ]


def target_lines(report: dict[str, Any]) -> list[str]:
    """The targets with the run's figures; judged only on the database they are for."""
    judged = targets_apply(report)
    database = report.get("machine", {}).get("database", "-")
    if judged:
        lines = ["targets (issue 11; PostgreSQL, 2-core machine, one run):"]
        marks = {True: "PASS", False: "FAIL", None: "n/a"}
    else:
        lines = [
            f"targets: PostgreSQL targets, shown for comparison (this run: {database}; not judged)"
        ]
        marks = {True: "met", False: "missed", None: "n/a"}
    for verdict in report["targets"].values():
        mark = marks[verdict["pass"]]
        value = verdict["value"]
        shown = "-" if value is None else f"{value:g}"
        line = f"  {mark:<7}{verdict['what']:<56}{shown:>10}  {verdict['target']}"
        if verdict.get("bare_chain_passes") is False:
            line += f"  (bare chain: {verdict['bare_chain']:g}, misses it too)"
        lines.append(line)
    return lines


def _rate(stats: dict[str, Any] | None) -> str:
    if not stats or stats.get("arrival_per_s") is None:
        return "-"
    lag = stats.get("submit_lag_ms_p99")
    return f"{stats['arrival_per_s']:.1f} ({'-' if lag is None else f'{lag:.1f}'})"


def _sql(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{stats['total']:g} / {stats['bookkeeping']:g} / {stats['domain']:g}"


def _bookkeeping(sql: dict[str, Any]) -> str:
    """The mean over every counted step, the most of a step in our database, of an external one."""
    return " / ".join(
        _num(sql.get(key), "g")
        for key in (
            "bookkeeping_per_step_mean",
            "bookkeeping_per_step_max",
            "bookkeeping_external_action_max",
        )
    )


def _steps(timing: dict[str, Any] | None) -> str:
    if not timing:
        return "-"
    bare = timing.get("bare")
    return f"{timing['saga']['per_saga']:.1f} / {bare['per_saga'] if bare else '-'}"


def _bursts(rates: dict[str, list[float]] | None) -> str:
    if not rates:
        return "-"
    return (
        " ".join(f"{r:.1f}" for r in rates["sagas"])
        + " | "
        + (" ".join(f"{r:.1f}" for r in rates["bare_chains"]) or "-")
    )
