"""The Celery workers a bench run starts itself, measures and stops.

``python -m config.worker -P prefork -c 2`` (the Procfile's worker) on the saga
type's queues and the bench's own, as a subprocess in its own session, with the
bench's own settings module, database and broker, and ``--include`` of the
bench's own tasks (the no-op chain, the plug-in's bare chain), which production
workers never register. It is stopped with a warm shutdown, and its whole
process group is killed if that does not end it, so no worker outlives the
bench; on Linux the kernel also stops it if the bench itself is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from celery import current_app
from celery.utils.nodenames import host_format
from django.conf import settings

from sagas.harness.processes import child_pids, die_with_parent, worker_argv, worker_environment

BENCH_TASKS = "sagas.bench.tasks"
NODE_NAME = "bench@%h"
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class BenchError(Exception):
    """A run that cannot go on, explained in one line."""


def check_flags(checks: list[tuple[bool, str]]) -> None:
    """Refuse the first flag whose check fails, with its message (``ValueError``)."""
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def worker_flag_checks(
    *, submitters: int, concurrency: int, timeout: float
) -> list[tuple[bool, str]]:
    """The checks of the flags every throughput mode takes: submitters, workers, timeout."""
    return [
        (1 <= submitters <= 64, "--submitters must be between 1 and 64"),
        (1 <= concurrency <= 32, "--concurrency must be between 1 and 32"),
        (timeout > 0, "--timeout must be a positive number of seconds"),
    ]


def broker_url() -> str:
    url = current_app.conf.broker_url or ""
    if not url.startswith(("redis://", "rediss://")):
        raise BenchError(
            "no Redis broker configured: set REDIS_URL, or run `make bench`, which starts one"
        )
    return url


def celery_command(
    concurrency: int,
    *,
    queues: tuple[str, ...],
    includes: tuple[str, ...] = (),
    options: dict[str, Any] | None = None,
) -> list[str]:
    """The bench's worker; ``options`` are ``worker_argv``'s (events, loglevel, gossip)."""
    return worker_argv(
        name=NODE_NAME,
        queues=queues,
        concurrency=concurrency,
        includes=(BENCH_TASKS, *includes),
        **(options or {}),
    )


def rss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _process_group(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after it.
    return int(stat.rsplit(")", 1)[1].split()[2])


class WorkerPool:
    """One ``celery worker`` process (prefork: a main process and ``concurrency`` children)."""

    def __init__(
        self,
        *,
        concurrency: int = 2,
        queues: tuple[str, ...],
        includes: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.queues = queues
        self.includes = includes
        self.env = env or {}
        self.options = options
        self.nodename = host_format(NODE_NAME)
        self.process: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the pool
            prefix="bench-worker-", suffix=".log", delete=False
        )

    @property
    def logfile(self) -> str:
        return self._log.name

    def environment(self) -> dict[str, str]:
        return {**worker_environment(broker_url=broker_url()), **self.env}

    def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
            celery_command(
                self.concurrency, queues=self.queues, includes=self.includes, options=self.options
            ),
            cwd=settings.BASE_DIR,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise BenchError(f"the worker exited at startup:\n{self.log_tail()}")
            if current_app.control.ping(destination=[self.nodename], timeout=0.5):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the worker did not answer within {READY_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
                )

    def rss(self) -> dict[str, float]:
        """Resident memory of the main process and its children, in MiB."""
        if self.process is None or self.process.poll() is not None:
            return {"total": 0.0, "main": 0.0, "children": 0.0, "processes": 0}
        main = rss_kb(self.process.pid)
        children = [rss_kb(pid) for pid in child_pids(self.process.pid)]
        return {
            "total": round((main + sum(children)) / 1024, 1),
            "main": round(main / 1024, 1),
            "children": round(sum(children) / 1024, 1),
            "processes": 1 + len(children),
        }

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the main process and its children have used so far."""
        if self.process is None:
            return 0.0
        return sum(cpu_seconds(pid) for pid in (self.process.pid, *child_pids(self.process.pid)))

    def stop(self) -> None:
        if self.process is None:
            return
        group = self.process.pid
        children = child_pids(group)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                # Still running, so the group id is still the worker's own.
                os.killpg(group, signal.SIGKILL)
                self.process.wait()
        for pid in children:  # a pool child that outlived its main process
            if _process_group(pid) == group:
                os.kill(pid, signal.SIGKILL)
        self._log.close()

    def log_tail(self, lines: int = 30) -> str:
        if not self._log.closed:
            self._log.flush()
        text = Path(self.logfile).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:]) or "(empty worker log)"

    def discard_log(self) -> None:
        Path(self.logfile).unlink(missing_ok=True)


def refuse_foreign_workers(nodename: str, *, allow: bool) -> None:
    """Other workers on this broker would take the bench's tasks: refuse, unless ``allow``."""
    others = foreign_workers(nodename)
    if others and not allow:
        raise BenchError(
            f"other workers consume this broker ({', '.join(others)}) and would take the "
            "bench's tasks: stop them, use another REDIS_URL, or pass --allow-foreign-workers"
        )


def foreign_workers(nodename: str) -> list[str]:
    """Other workers listening on this broker: they would take the bench's tasks."""
    replies = current_app.control.ping(timeout=1.0) or []
    return sorted(name for reply in replies for name in reply if name != nodename)


def queued_messages(queues: tuple[str, ...]) -> dict[str, int]:
    """Messages waiting in the bench's queues, including unacknowledged ones."""
    client = redis.Redis.from_url(broker_url())
    counts = {queue: int(client.llen(queue)) for queue in queues}
    counts["unacked"] = int(client.zcard("unacked_index"))
    return {name: n for name, n in counts.items() if n}


def clear_queues(queues: tuple[str, ...], *, purge: bool) -> None:
    """Refuse to run over messages already waiting in ``queues`` (they would run
    during the measurement), or drop them if ``purge``."""
    waiting = queued_messages(queues)
    if waiting and not purge:
        raise BenchError(
            f"the bench's queues hold messages from elsewhere ({waiting}); they would run "
            "during the bench: pass --purge to drop them, or use another REDIS_URL"
        )
    if purge:
        purge_queues(queues)


def purge_queues(queues: tuple[str, ...]) -> None:
    client = redis.Redis.from_url(broker_url())
    client.delete(*queues, "unacked", "unacked_index", "unacked_mutex")
