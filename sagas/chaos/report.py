"""The run's report (text and JSON) and the progress line shown while it runs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, TextIO

SHOWN_OFFENDERS = 10
PROGRESS_EVERY_S = 5.0  # without a terminal, one line this often
BAR_WIDTH = 30


def percentile(values: list[int], p: float) -> int | None:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def durations(values: list[int]) -> dict[str, int | None]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


class Progress:
    """Dispatched / terminal sagas on stderr.

    One updating line on a terminal; otherwise a line every few seconds.
    """

    def __init__(self, stream: TextIO, *, total: int) -> None:
        self.stream = stream
        self.total = total
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.started = time.monotonic()
        self.last_line = 0.0
        self.shown = False

    def update(
        self, *, dispatched: int, terminal: int, note: str = "", force: bool = False
    ) -> None:
        now = time.monotonic()
        if not self.tty and not force and now - self.last_line < PROGRESS_EVERY_S:
            return
        self.last_line = now
        filled = int(BAR_WIDTH * terminal / self.total) if self.total else BAR_WIDTH
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        line = (
            f"chaos [{bar}] dispatched {dispatched}/{self.total}  terminal {terminal}/{self.total}"
            f"  open {dispatched - terminal}  {now - self.started:5.1f}s"
        )
        if note:
            line += f"  {note}"
        if self.tty:
            self.stream.write(f"\r\x1b[2K{line}")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


def write_json(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2, default=str) + "\n")


def render(report: dict[str, Any]) -> str:
    """The report as an operator reads it."""
    sagas = report["sagas"]
    lines = [
        f"Chaos run {report['run_id']}  seed {report['seed']}  "
        f"({sagas['total']} sagas, concurrency {report['options']['concurrency']}, "
        f"{report['workers']['description']})",
        "",
        "Outcomes",
    ]
    for status, count in sagas["by_status"].items():
        lines.append(f"  {status:<13} {count:>6}")
    if report["timed_out"]:
        lines.append(f"  gave up waiting after {report['options']['timeout']:g}s (--timeout)")
    if sagas.get("undispatched"):
        lines.append(f"  {'not started':<13} {sagas['undispatched']:>6}  (timed out first)")
    if sagas.get("unsubmitted"):
        lines.append(
            f"  {'not submitted':<13} {sagas['unsubmitted']:>6}  (their start failed: "
            f"the run has {sagas['total']} of {sagas['requested']})"
        )
    follow_ups = report.get("follow_ups") or {}
    if follow_ups.get("started"):
        lines += ["", f"Follow-ups ({follow_ups['saga_type']}, --cancel-rate)"]
        for status, count in follow_ups["by_status"].items():
            lines.append(f"  {status:<13} {count:>6}")
    retried = report.get("operator_retries") or {}
    if retried.get("retries"):
        lines.append(
            f"  operator retries (--operator-retry): {retried['retries']} "
            f"of {retried['sagas']} FAILED saga(s)"
        )
    if report["failed_at_step"]:
        lines += ["", "Compensated sagas by failing step"]
        lines += [f"  {step:<22} {n:>6}" for step, n in report["failed_at_step"].items()]
    lines += ["", "Compensations by step (succeeded / skipped)"]
    if report["compensations_by_step"]:
        for step, counts in report["compensations_by_step"].items():
            lines.append(f"  {step:<22} {counts['succeeded']:>6} / {counts['skipped']}")
    else:
        lines.append("  none")
    lines += ["", "Faults injected"]
    for kind, count in report["faults"].items():
        lines.append(f"  {kind:<22} {count:>6}")
    deliveries = report["duplicates"]
    if deliveries["published"]:
        lines.append(
            f"  second deliveries recorded: {deliveries['recorded']} of "
            f"{deliveries['published']} (rows by outcome: {deliveries['by_outcome']})"
        )
    for kill in report["kills"]:
        lines.append(f"  killed pool process {kill['pid']} of {kill['worker']} at {kill['at_s']}s")
    if report["kills"]:
        lines.append(f"  tasks interrupted by kills (redelivered): {report['tasks_lost_to_kills']}")
    for restart in report["worker_restarts"]:
        lines.append(
            f"  worker {restart['worker']} exited by itself (status {restart['exit_status']}) "
            f"at {restart['at_s']}s and was started again"
        )
    for restart in report["broker_restarts"]:
        lines.append(
            f"  broker stopped at {restart['stopped_at_s']}s, "
            f"back at {restart['restarted_at_s']}s; "
            f"{restart['booked_while_down']} saga(s) started while it was down, "
            f"{restart['requeued']} unacknowledged message(s) requeued"
        )
    for kill in report.get("host_kills", []):
        lines.append(
            f"  killed worker {kill['worker']} as a whole at {kill['at_s']}s, "
            f"started again at {kill['restarted_at_s']}s"
        )
    for freeze in report.get("freezes", []):
        until = (
            f"continued at {freeze['thawed_at_s']}s"
            if freeze["thawed_at_s"] is not None
            else "still frozen at the end: SIGKILLed"
        )
        lines.append(f"  froze worker {freeze['worker']} at {freeze['at_s']}s, {until}")
    for flush in report.get("broker_flushes", []):
        lines.append(
            f"  flushed the broker at {flush['at_s']}s: {flush['queued']} queued and "
            f"{flush['unacked']} unacknowledged message(s) lost"
        )
    restart = report.get("database_restart")
    if restart:
        lines.append(
            f"  database restarted at {restart['started_at_s']}s "
            f"(done at {restart['finished_at_s']}s, exit status {restart['exit_status']}): "
            f"{restart['command']}"
        )
    for drop in report.get("db_connection_drops", []):
        lines.append(
            f"  ended {drop['sessions_ended']} worker database session(s) at {drop['at_s']}s"
        )
    outage = report.get("database_outage") or {}
    if outage.get("total"):
        failed = ", ".join(f"{what} {n}" for what, n in outage["errors"].items())
        lines.append(f"  the run's own database work failed and was retried: {failed}")
    submits = report.get("submit_failures") or {}
    if submits.get("count"):
        reasons = "; ".join(f"{reason} ({n})" for reason, n in submits["by_reason"].items())
        lines.append(f"  could not submit {submits['count']} saga(s): {reasons}")
    recovery = report["recovery"]
    moved = ", ".join(f"{key} {n}" for key, n in recovery["stalled"].items()) or "none"
    lines.append(
        f"  reconciler + stall sweeper, every {recovery['every_s']:g}s as beat would "
        f"(they see every saga in the database): {recovery['calls']} calls, "
        f"re-published {recovery['republished']}, stalled sagas moved on: {moved}"
    )
    lines += render_recovery(report)
    lines += ["", "Invariants"]
    for invariant in report["invariants"]:
        mark = "PASS" if invariant["passed"] else "FAIL"
        lines.append(f"  {mark}  {invariant['description']}")
        if invariant["note"]:
            lines.append(f"        {invariant['note']}")
        if not invariant["passed"]:
            shown = invariant["offenders"][:SHOWN_OFFENDERS]
            more = invariant["offender_count"] - len(shown)
            for offender in shown:
                reason = invariant["details"].get(offender, "")
                lines.append(f"        {offender}  {reason}".rstrip())
            if more > 0:
                lines.append(f"        ... and {more} more ({invariant['offender_count']} in all)")
    duration = report["duration_ms"]
    lines += [
        "",
        f"Throughput {report['throughput_per_s']} sagas/s over {report['elapsed_s']}s;  "
        f"duration p50 {duration['p50']} ms, p95 {duration['p95']} ms, p99 {duration['p99']} ms, "
        f"max {duration['max']} ms",
    ]
    if report.get("logs"):
        lines.append(f"Worker logs kept in {report['logs']}")
    verdict = "every invariant holds" if report["passed"] else "INVARIANTS VIOLATED"
    lines += ["", f"Result: {verdict}"]
    return "\n".join(lines)


def render_recovery(report: dict[str, Any]) -> list[str]:
    """How long the sagas open at each fault took to move on."""
    recovery = report["recovery"]
    faults = recovery.get("faults") or []
    if not faults:
        return []
    lines = ["", "Recovery (sagas open at the fault; seconds until each next moved on)"]
    for fault in faults:
        recovered = (
            f"all moved on within {fault['recovered_s']}s"
            if fault["recovered_s"] is not None
            else f"{fault['never_moved_on']} never moved on"
        )
        lines.append(
            f"  {fault['kind']:<20} at {fault['at_s']:>7}s  affected {fault['affected']:>4}  "
            f"{recovered}; p50 {fault['moving_on_p50_s']}s, p99 {fault['moving_on_p99_s']}s"
        )
    extra = recovery["extra_latency_ms"]
    lines.append(
        f"  extra latency of the {recovery['affected_sagas']} affected saga(s) over the "
        f"unaffected median ({recovery['unaffected_median_ms']} ms): "
        f"p50 {extra['p50']} ms, p99 {extra['p99']} ms"
    )
    return lines
