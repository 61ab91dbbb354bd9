"""Processes a chaos run owns: Celery workers, and a Redis broker it can restart.

Workers are ``python -m config.worker`` subprocesses (``celery -A config
worker``'s options, fewer imports; prefork, one pool child each) with an
environment built from the running settings, so that under pytest they reach
the test database. Killing a worker's pool child is what a crash mid-task looks
like: prefork replaces the child and, with ``task_reject_on_worker_lost``, the
broker hands its message out again at once."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.signals import setting_changed
from kombu import pools
from kombu.utils.collections import eqhash

from sagas.harness import processes
from sagas.harness.processes import child_pids, die_with_parent, worker_argv
from sagas.harness.redis_server import (
    HOST,
    LocalRedis,
    RedisServerError,
    free_port,
    redis_executable,
)

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0


class WorkerError(Exception):
    """A worker or the run's broker could not be started."""


def worker_environment(*, broker_url: str) -> dict[str, str]:
    try:
        return processes.worker_environment(broker_url=broker_url)
    except ValueError as exc:
        raise WorkerError(str(exc)) from None


@dataclass
class Worker:
    name: str
    queues: tuple[str, ...]
    process: subprocess.Popen
    logfile: Path

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def last_error(self) -> str:
        """Its last CRITICAL log line, else its last ERROR line of the main process."""
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for marker in ("CRITICAL/", "ERROR/Main"):
            found = [line for line in lines if marker in line]
            if found:
                return found[-1][:300]
        return ""

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


@dataclass(frozen=True)
class Restart:
    worker: str
    exit_status: int | None
    at_s: float
    reason: str


@dataclass(frozen=True)
class Kill:
    worker: str
    pid: int
    at_s: float


@dataclass
class HostKill:
    """A whole worker (main process and pool) SIGKILLed, and when it was started again."""

    worker: str
    pids: list[int]
    at_s: float
    restarted_at_s: float | None = None


@dataclass
class Freeze:
    """A whole worker SIGSTOPped, and when it was continued (or killed, at the end)."""

    worker: str
    pids: list[int]
    at_s: float
    thawed_at_s: float | None = None
    killed_at_end: bool = False


class WorkerPool:
    """K workers on every queue (``shared``), or K per queue (``split``).

    ``queues`` are the saga type's: the saga queue and each step's (see ``queues_of``).
    """

    def __init__(
        self,
        *,
        app,
        count: int,
        topology: str,
        run_id: str,
        workdir: Path,
        queues: tuple[str, ...],
    ) -> None:
        self.app = app
        self.workdir = workdir
        host = socket.gethostname()
        if topology == "split":
            layout = [(queue,) for queue in queues for _ in range(count)]
        else:
            layout = [queues] * count
        self.layout: list[tuple[str, tuple[str, ...]]] = []
        for i, queues in enumerate(layout, 1):
            label = f"{queues[0]}-{i}" if len(queues) == 1 else str(i)
            self.layout.append((f"chaos-{run_id}-{label}@{host}", queues))
        self.run_id = run_id
        self.workers: list[Worker] = []
        self.kills: list[Kill] = []
        self.host_kills: list[HostKill] = []
        self.freezes: list[Freeze] = []
        self.restarts: list[Restart] = []
        self.env: dict[str, str] = {}
        # Worker name -> when (monotonic) a supervisor would start it again after a host kill.
        self.down_until: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.layout]

    def start(self, *, broker_url: str) -> None:
        self.env = worker_environment(broker_url=broker_url)
        for name, queues in self.layout:
            logfile = self.workdir / f"{name.split('@')[0]}.log"
            self.workers.append(Worker(name, queues, self._spawn(name, queues, logfile), logfile))
        self._wait_ready()

    def _spawn(self, name: str, queues: tuple[str, ...], logfile: Path) -> subprocess.Popen:
        argv = worker_argv(name=name, queues=queues, concurrency=1, events=True)
        # Its database sessions say whose they are: --drop-db-connections ends them by name.
        env = {**self.env, "DATABASE_APPLICATION_NAME": session_name(name)}
        with logfile.open("ab") as log:
            return subprocess.Popen(  # noqa: S603 - our own fixed argv
                argv,
                cwd=settings.BASE_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C meant for the run reaches it only via stop().
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def revive(self, *, at_s: float) -> list[Restart]:
        """Start again every worker that exited, as a process supervisor would.

        A worker can die on its own: Celery 5.7 on Redis may end the main
        process with "Unrecoverable error" when the broker connection drops.
        """
        revived = []
        now = time.monotonic()
        for worker in self.workers:
            if worker.alive:
                continue
            if worker.name in self.down_until:
                # Killed by the run: started again by the supervisor's delay, as a restart
                # of that kill rather than an exit of its own.
                if now < self.down_until[worker.name]:
                    continue
                del self.down_until[worker.name]
                worker.process = self._spawn(worker.name, worker.queues, worker.logfile)
                for kill in self.host_kills:
                    if kill.worker == worker.name and kill.restarted_at_s is None:
                        kill.restarted_at_s = round(at_s, 2)
                continue
            restart = Restart(
                worker=worker.name,
                exit_status=worker.process.returncode,
                at_s=round(at_s, 2),
                reason=worker.last_error(),
            )
            worker.process = self._spawn(worker.name, worker.queues, worker.logfile)
            self.restarts.append(restart)
            revived.append(restart)
        return revived

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        waiting = set(self.names)
        while waiting:
            for worker in self.workers:
                if not worker.alive:
                    raise WorkerError(
                        f"worker {worker.name} exited with status {worker.process.returncode} "
                        f"while starting:\n{worker.log_tail()}"
                    )
            replies = self.app.control.ping(destination=sorted(waiting), timeout=1.0)
            for reply in replies:
                waiting -= set(reply)
            if waiting and time.monotonic() > deadline:
                raise WorkerError(
                    f"workers {', '.join(sorted(waiting))} did not answer a ping within "
                    f"{READY_TIMEOUT_S:.0f}s"
                )
        # A pool child is what a kill targets: wait until every worker has forked one.
        while not all(child_pids(w.process.pid) for w in self.workers):
            if time.monotonic() > deadline:
                raise WorkerError("a worker started no pool process")
            time.sleep(0.1)

    def kill_child(self, index: int, *, at_s: float) -> Kill | None:
        """SIGKILL the pool child of worker ``index`` (mod K); None if it has none right now."""
        worker = self.workers[index % len(self.workers)]
        children = child_pids(worker.process.pid)
        if not children:
            return None
        pid = children[0]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return None
        kill = Kill(worker=worker.name, pid=pid, at_s=round(at_s, 2))
        self.kills.append(kill)
        return kill

    def kill_host(self, index: int, *, at_s: float, restart_after_s: float) -> HostKill | None:
        """SIGKILL worker ``index`` (mod K) as a whole: its main process and its pool.

        ``revive`` starts it again ``restart_after_s`` later, as a supervisor
        would. None if that worker is not running right now.
        """
        worker = self.workers[index % len(self.workers)]
        if not worker.alive or worker.name in self.down_until:
            return None
        pids = [worker.process.pid, *child_pids(worker.process.pid)]
        # Its own session and process group (start_new_session): the group is all of it.
        if not _signal_group(worker.process.pid, signal.SIGKILL):
            return None
        worker.process.wait()
        self.down_until[worker.name] = time.monotonic() + restart_after_s
        kill = HostKill(worker=worker.name, pids=pids, at_s=round(at_s, 2))
        self.host_kills.append(kill)
        return kill

    def freeze(self, index: int, *, at_s: float) -> Freeze | None:
        """SIGSTOP worker ``index`` (mod K) as a whole; its sockets stay open."""
        worker = self.workers[index % len(self.workers)]
        if not worker.alive:
            return None
        pids = [worker.process.pid, *child_pids(worker.process.pid)]
        if not _signal_group(worker.process.pid, signal.SIGSTOP):
            return None
        freeze = Freeze(worker=worker.name, pids=pids, at_s=round(at_s, 2))
        self.freezes.append(freeze)
        return freeze

    def thaw(self, freeze: Freeze, *, at_s: float) -> None:
        worker = self._worker(freeze.worker)
        if worker is not None and worker.alive:
            _signal_group(worker.process.pid, signal.SIGCONT)
        freeze.thawed_at_s = round(at_s, 2)

    def kill_frozen(self, *, at_s: float) -> list[Freeze]:
        """SIGKILL every worker still frozen: a stopped process ignores SIGTERM until continued.

        ``revive`` is not called again, so they stay down; returns those killed.
        """
        killed = []
        for freeze in self.freezes:
            if freeze.thawed_at_s is not None or freeze.killed_at_end:
                continue
            worker = self._worker(freeze.worker)
            if worker is not None and worker.alive:
                _signal_group(worker.process.pid, signal.SIGKILL)
                worker.process.wait()
            freeze.killed_at_end = True
            killed.append(freeze)
        return killed

    def _worker(self, name: str) -> Worker | None:
        return next((w for w in self.workers if w.name == name), None)

    def tasks_lost_to_kills(self) -> int:
        """Tasks that were running in a killed child (prefork logs a WorkerLostError each)."""
        lost = 0
        for worker in self.workers:
            with contextlib.suppress(OSError):
                lost += worker.logfile.read_text(errors="replace").count(
                    "Task handler raised error: WorkerLostError"
                )
        return lost

    def stop(self) -> None:
        """Warm shutdown (SIGTERM): running tasks finish; SIGKILL whoever outlasts the wait."""
        self.kill_frozen(at_s=0.0)  # they could never hear the SIGTERM
        for worker in self.workers:
            if worker.alive:
                worker.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for worker in self.workers:
            try:
                worker.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(worker.process.pid, signal.SIGKILL)
                worker.process.wait()


def session_name(worker_name: str) -> str:
    """A worker's PostgreSQL application_name: its name without the host (63 bytes at most)."""
    return worker_name.split("@")[0][:63]


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


class DurableRedis(LocalRedis):
    """A run's own broker: an append-only file fsynced on every write, restartable on its port.

    Like a production broker, it keeps queued messages across a restart.
    """

    def start(self, should_stop=lambda: False) -> None:
        port = self.port or free_port()
        argv = [self.executable]
        for option, value in {
            "port": str(port),
            "bind": HOST,
            "save": "",
            "appendonly": "yes",
            "appendfsync": "always",
            "daemonize": "no",
            "dir": str(self.workdir),
            "logfile": str(self.logfile),
            "loglevel": "warning",
        }.items():
            argv += [f"--{option}", value]
        self.port = port
        self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        if not self._wait_until_ready(should_stop):
            raise WorkerError(f"Redis exited at startup on port {port}:\n{self._log_tail()}")


def start_broker(workdir: Path) -> DurableRedis:
    try:
        redis = DurableRedis(redis_executable(), workdir)
        redis.start()
    except RedisServerError as exc:
        raise WorkerError(str(exc)) from None
    return redis


def has_redis_server() -> bool:
    try:
        redis_executable()
    except RedisServerError:
        return False
    return True


class BrokerSwitch:
    """Points this process's Celery app (and the settings that follow it) at another Redis.

    Publishing (bookings, the reconciler, second deliveries) then goes to that
    broker. Kombu keeps one connection pool per broker URL for the whole
    process; the app is made to look its pool up again, and after a broker
    restart that broker's pools are dropped, so no dead connection is reused.
    """

    def __init__(self, app, *, follows: tuple[str, ...] = ()) -> None:
        self.app = app
        # Settings holding the broker's URL: REDIS_URL and those a saga type
        # names (e.g. a fake gateway kept in the same Redis).
        self.setting_names = ("REDIS_URL", *follows)
        self.url = ""
        self._saved: tuple | None = None

    def point_at(self, url: str) -> None:
        if self._saved is None:
            self._saved = (
                self.app.conf.broker_url,
                {name: getattr(settings, name, None) for name in self.setting_names},
            )
        self.url = url
        self.app.conf.broker_url = url
        for name in self.setting_names:
            self._set(name, url)
        self._forget_app_pools()

    def restore(self) -> None:
        if self._saved is None:
            return
        broker_url, values = self._saved
        self.reset_pools()  # the run's broker is gone: close what was opened to it
        self.app.conf.broker_url = broker_url
        for name, value in values.items():
            self._set(name, value)
        self._saved = None
        self._forget_app_pools()

    def reset_pools(self) -> None:
        """Close and drop the pools of the run's broker; the next publish connects afresh."""
        connection = self.app.connection_for_write(self.url)
        try:
            key = eqhash(connection)
            for group in (pools.producers, pools.connections):
                pool = dict.pop(group, key, None)
                if pool is not None:
                    # Connections to a broker that went away may fail to close.
                    with contextlib.suppress(Exception):
                        pool.force_close_all()
        finally:
            connection.release()
        self._forget_app_pools()

    def requeue_unacked(self, *, delivered_before: float) -> int:
        """Put messages delivered before the broker restart back on their queues.

        Every connection to the broker died with it, so no consumer can ever
        acknowledge those deliveries; kombu would hand them back when a
        channel closes, but the broker was gone then, and otherwise only after
        the visibility timeout. This uses the transport's own restore routine,
        limited to deliveries older than ``delivered_before`` (a ``time()``).
        """
        age = max(0.0, time.time() - delivered_before)
        with self.app.connection_for_write(
            self.url, transport_options={"visibility_timeout": age}
        ) as connection:
            channel = connection.default_channel
            orphaned = channel.client.zcount(channel.unacked_index_key, 0, delivered_before)
            channel.qos.restore_visible(start=0, num=None, interval=1)
        return int(orphaned)

    def _forget_app_pools(self) -> None:
        # What Celery itself does after a fork (Celery._after_fork).
        self.app._pool = None
        self.app.amqp._producer_pool = None
        # The remote-control client too: once used, its mailbox keeps state of
        # the old broker (the reply queue it declared there), and pings sent to
        # the new one would never hear back.
        self.app.__dict__.pop("control", None)

    @staticmethod
    def _set(name: str, value) -> None:
        if value is None:
            if hasattr(settings, name):
                delattr(settings, name)
        else:
            setattr(settings, name, value)
        # Clients cached from these settings (the fake gateway's) listen for this signal.
        setting_changed.send(sender=BrokerSwitch, setting=name, value=value, enter=True)


def workdir_for(run_id: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"chaos-{run_id}-"))


def remove_workdir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
