"""Where the machine's CPU went during the bursts: the worker, everything else, and idle.

A burst that leaves cores idle is bound by the latency of its pipeline (each
pool process waits on the database, the broker and its main process between
tasks), not by CPU: more of the same work per task then costs wall time, and
a cheaper statement gains less than its CPU. The meter reads the machine's
counters (``/proc/stat``) and the worker's processes' (``/proc/<pid>/stat``)
before and after each burst, and adds the bursts of one kind together.
Linux only; elsewhere it measures nothing and the report says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sagas.bench.workers import cpu_seconds
from sagas.harness.processes import child_pids

PROC_STAT = Path("/proc/stat")
# The bursts whose CPU a report breaks down.
BURST_KINDS = ("sagas", "bare_chains", "noop_chains")


def machine_ticks() -> tuple[int, int] | None:
    """All cores' clock ticks so far: (total, idle including I/O wait); None off Linux."""
    try:
        first = PROC_STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    ticks = [int(value) for value in first[1:9]]
    return sum(ticks), ticks[3] + ticks[4]


@dataclass
class _Snapshot:
    ticks: tuple[int, int]
    main_s: float
    children_s: float
    wall: float


@dataclass
class CpuMeter:
    """Adds up, over the bursts it is entered for, the CPU of the machine and of one worker."""

    main_pid: int
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    seconds: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    main_s: float = 0.0
    children_s: float = 0.0
    _start: _Snapshot | None = None
    measured: bool = True

    def _snapshot(self, clock: float) -> _Snapshot | None:
        ticks = machine_ticks()
        if ticks is None:
            return None
        children = child_pids(self.main_pid)
        return _Snapshot(
            ticks=ticks,
            main_s=cpu_seconds(self.main_pid),
            children_s=sum(cpu_seconds(pid) for pid in children),
            wall=clock,
        )

    def start(self, clock: float) -> None:
        self._start = self._snapshot(clock)
        if self._start is None:
            self.measured = False

    def stop(self, clock: float) -> None:
        start, self._start = self._start, None
        end = self._snapshot(clock)
        if start is None or end is None:
            self.measured = False
            return
        hertz = os.sysconf("SC_CLK_TCK")
        total = (end.ticks[0] - start.ticks[0]) / hertz
        idle = (end.ticks[1] - start.ticks[1]) / hertz
        self.seconds += end.wall - start.wall
        self.busy_s += total - idle
        self.idle_s += idle
        self.main_s += max(0.0, end.main_s - start.main_s)
        self.children_s += max(0.0, end.children_s - start.children_s)

    def as_dict(self) -> dict[str, Any] | None:
        """Cores in use on average (of ``cores``): busy, the worker's main process, its pool
        processes, everything else (database, broker, this process); and the idle share."""
        if not self.measured or self.seconds <= 0 or self.busy_s + self.idle_s <= 0:
            return None

        def cores(value: float) -> float:
            return round(value / self.seconds, 2)

        worker = self.main_s + self.children_s
        return {
            "cores": self.cores,
            "seconds": round(self.seconds, 2),
            "busy_cores": cores(self.busy_s),
            "worker_main_cores": cores(self.main_s),
            "worker_pool_cores": cores(self.children_s),
            "rest_cores": cores(max(0.0, self.busy_s - worker)),
            "idle_share": round(self.idle_s / (self.busy_s + self.idle_s), 3),
        }


_R = TypeVar("_R")


class BurstMeters:
    """One :class:`CpuMeter` per kind of burst (``BURST_KINDS``) of one worker."""

    def __init__(self, main_pid: int) -> None:
        self.meters = {kind: CpuMeter(main_pid) for kind in BURST_KINDS}

    def run(self, kind: str, burst: Callable[[], _R]) -> _R:
        """``burst()``, its CPU added to ``kind``'s."""
        meter = self.meters[kind]
        meter.start(time.monotonic())
        try:
            return burst()
        finally:
            meter.stop(time.monotonic())

    def as_dict(self) -> dict[str, dict[str, Any] | None]:
        return {kind: meter.as_dict() for kind, meter in self.meters.items()}
