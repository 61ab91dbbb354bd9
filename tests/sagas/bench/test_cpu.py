"""The bursts' CPU meter: the machine's busy and idle time, and the worker's share of it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sagas.bench.cpu import CpuMeter, machine_ticks
from sagas.bench.report import cpu_lines

pytestmark = pytest.mark.skipif(machine_ticks() is None, reason="reads Linux's /proc/stat")

# Spin for a while, say so, then wait for stdin to close (so the process is still there to read).
SPIN = (
    "import sys, time\n"
    "end = time.process_time() + {seconds}\n"
    "while time.process_time() < end: pass\n"
    "print('spun', flush=True)\n"
    "sys.stdin.read()\n"
)
# A parent that spins while its child spins: the worker's main process and its pool.
PARENT = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]])\n"
    "print('ready', flush=True)\n"
    "exec(sys.argv[2])\n"
    "child.wait()\n"
)


def test_a_spinning_worker_shows_as_its_main_process_and_its_pool():
    meter = None
    parent = subprocess.Popen(  # noqa: S603 - this interpreter, fixed code
        [sys.executable, "-c", PARENT, SPIN.format(seconds=0.6), SPIN.format(seconds=0.3)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        meter = CpuMeter(parent.pid)
        meter.start(time.monotonic())
        # Both have spun (the child inherits the pipe), and both are still alive.
        assert [parent.stdout.readline().strip() for _ in range(2)] == ["spun", "spun"]
        meter.stop(time.monotonic())
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
    figures = meter.as_dict()
    assert figures is not None
    assert figures["cores"] == os.cpu_count()
    # The spinning shows up as busy cores, in the main process and in its child.
    seconds = figures["seconds"]
    assert figures["worker_main_cores"] * seconds == pytest.approx(0.3, abs=0.15)
    assert figures["worker_pool_cores"] * seconds == pytest.approx(0.6, abs=0.15)
    assert (
        figures["busy_cores"] >= figures["worker_main_cores"] + figures["worker_pool_cores"] - 0.1
    )
    assert 0 <= figures["idle_share"] < 1


def test_bursts_of_one_kind_add_up_and_a_meter_never_started_reports_nothing():
    meter = CpuMeter(os.getpid())
    assert meter.as_dict() is None  # no burst measured
    for _ in range(2):
        meter.start(time.monotonic())
        end = time.process_time() + 0.1
        while time.process_time() < end:
            pass
        meter.stop(time.monotonic())
    figures = meter.as_dict()
    assert figures["seconds"] >= 0.2
    # This process is the "worker" here: its spinning is at least ~a core for the time.
    assert figures["worker_main_cores"] >= 0.5
    assert figures["worker_pool_cores"] == 0


def test_the_report_prints_a_line_per_measured_burst_kind():
    cpu = {
        "cores": 2,
        "seconds": 10.0,
        "busy_cores": 1.5,
        "worker_main_cores": 0.4,
        "worker_pool_cores": 0.7,
        "rest_cores": 0.4,
        "idle_share": 0.25,
    }
    lines = cpu_lines({"sagas": cpu, "bare_chains": None, "noop_chains": cpu})
    assert "cores busy of 2" in lines[1]
    assert lines[2].split() == [
        "sagas",
        "1.50",
        "=",
        "0.40",
        "+",
        "0.70",
        "+",
        "0.40;",
        "idle",
        "25%",
    ]
    assert lines[3].split()[:2] == ["no-op", "chains"]
    assert len(lines) == 4  # the unmeasured kind is left out
    assert cpu_lines(None) == []
