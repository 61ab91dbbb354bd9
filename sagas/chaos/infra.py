"""Infrastructure faults a run injects from outside the workers.

- ``flush_broker``: the broker's Redis database loses every message (FLUSHDB);
- ``terminate_sessions``: the workers' PostgreSQL sessions are ended
  (``pg_terminate_backend``), picked by the application name each worker
  was started with;
- ``restart_command``: how to restart the PostgreSQL server the run uses, if
  this machine can (a local cluster and its control command), else a
  ChaosConfigError saying why.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from django.conf import settings
from django.db import connection

from sagas.chaos.plan import LOCAL_DATABASE_HOSTS, ChaosConfigError

RESTART_COMMAND_SETTING = "CHAOS_DB_RESTART_COMMAND"
RESTART_TIMEOUT_S = 120.0
PG_LSCLUSTERS_TIMEOUT_S = 10.0
NO_RESTART_HINT = "use --drop-db-connections to end the workers' sessions instead"


# --- the broker ------------------------------------------------------------------


def redis_url_of_broker(broker_url: str) -> str:
    """A redis-py URL for a kombu Redis broker URL (``redis+socket://`` is a socket path)."""
    if broker_url.startswith("redis+socket://"):
        return "unix://" + broker_url.removeprefix("redis+socket://")
    return broker_url


@dataclass(frozen=True)
class Flush:
    keys: int
    queued: int
    unacked: int


def flush_broker(broker_url: str, *, queues: tuple[str, ...]) -> Flush:
    """FLUSHDB the broker's database only: other databases of that Redis are left alone.

    Returns what was lost: keys, messages waiting on ``queues``, and messages
    delivered but not acknowledged.
    """
    client = redis.Redis.from_url(redis_url_of_broker(broker_url))
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.dbsize()
            for queue in queues:
                pipe.llen(queue)
            pipe.hlen("unacked")
            pipe.flushdb()
            keys, *lengths, unacked, _ = pipe.execute()
    finally:
        client.close()
    return Flush(keys=int(keys), queued=int(sum(lengths)), unacked=int(unacked))


# --- database sessions -----------------------------------------------------------


def terminate_sessions(run_id: str) -> int:
    """End every session of the run's workers; return how many were ended.

    Needs only database rights: superuser, the sessions' own role, or
    ``pg_signal_backend``.
    """
    # A run id is hex, so it holds no LIKE wildcard.
    pattern = f"chaos-{run_id}-%"
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name LIKE %s AND pid <> pg_backend_pid()",
            [pattern],
        )
        (ended,) = cursor.fetchone()
    return int(ended or 0)


# --- restarting PostgreSQL -------------------------------------------------------


@dataclass(frozen=True)
class RestartCommand:
    argv: list[str]
    how: str  # how it was found, for the run's announcement

    @property
    def shown(self) -> str:
        return shlex.join(self.argv)


def restart_command(
    database: dict[str, Any],
    *,
    configured: str | None = None,
    which=shutil.which,
    run=subprocess.run,
    show=None,
    uid: int | None = None,
) -> RestartCommand:
    """The command that restarts the PostgreSQL server ``database`` is on.

    ``configured`` (the CHAOS_DB_RESTART_COMMAND setting or environment
    variable) wins. Otherwise the server must be local, and one of: Debian's
    ``pg_lsclusters``/``pg_ctlcluster`` knowing a cluster on its port, or
    ``pg_ctl`` with a readable ``data_directory`` this user may control.
    ChaosConfigError says why not. The other arguments are seams for tests.
    """
    if configured is None:
        configured = configured_restart_command()
    if configured:
        argv = shlex.split(configured)
        if not argv:
            raise ChaosConfigError(f"--restart-database: {RESTART_COMMAND_SETTING} is empty")
        return RestartCommand(argv, f"from {RESTART_COMMAND_SETTING}")
    host = str(database.get("HOST") or "")
    if not (host in LOCAL_DATABASE_HOSTS or host.startswith("/")):
        raise ChaosConfigError(
            f"--restart-database can only restart a PostgreSQL on this machine; the database "
            f"is on {host}. Set {RESTART_COMMAND_SETTING} to a command that restarts it, or "
            f"{NO_RESTART_HINT}"
        )
    port = int(database.get("PORT") or 5432)
    uid = os.geteuid() if uid is None else uid
    reasons = []
    found = _debian_cluster(port, which=which, run=run, uid=uid, reasons=reasons)
    if found is None:
        found = _pg_ctl(database, which=which, show=show, uid=uid, reasons=reasons)
    if found is None:
        raise ChaosConfigError(
            "--restart-database cannot restart the database from here: "
            + "; ".join(reasons)
            + f". Set {RESTART_COMMAND_SETTING} to a command that does, or {NO_RESTART_HINT}"
        )
    return found


def configured_restart_command() -> str:
    return str(
        getattr(settings, RESTART_COMMAND_SETTING, "")
        or os.environ.get(RESTART_COMMAND_SETTING, "")
    ).strip()


def _debian_cluster(port, *, which, run, uid, reasons) -> RestartCommand | None:
    lsclusters, ctlcluster = which("pg_lsclusters"), which("pg_ctlcluster")
    if not (lsclusters and ctlcluster):
        reasons.append("no pg_lsclusters/pg_ctlcluster (Debian's postgresql-common)")
        return None
    try:
        listed = run(
            [lsclusters, "--no-header"],
            capture_output=True,
            text=True,
            timeout=PG_LSCLUSTERS_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        reasons.append(f"pg_lsclusters failed: {exc}")
        return None
    for line in listed.splitlines():
        # Ver Cluster Port Status Owner Data-directory Log-file
        fields = line.split()
        if len(fields) < 5 or not fields[2].isdigit() or int(fields[2]) != port:
            continue
        version, cluster, owner = fields[0], fields[1], fields[4]
        if uid != 0 and _uid_of(owner) != uid:
            reasons.append(
                f"cluster {version}/{cluster} on port {port} belongs to {owner}; "
                "only root or that user may restart it"
            )
            return None
        argv = [ctlcluster, "--skip-systemctl-redirect", version, cluster, "restart"]
        return RestartCommand(argv, f"cluster {version}/{cluster} on port {port}")
    reasons.append(f"pg_lsclusters lists no cluster on port {port}")
    return None


def _pg_ctl(database, *, which, show, uid, reasons) -> RestartCommand | None:
    try:
        data_directory = (show or _show)("data_directory")
    except Exception as exc:  # no rights (pg_read_all_settings), or no answer
        reasons.append(f"SHOW data_directory failed ({_first_line(exc)})")
        return None
    pg_ctl = which("pg_ctl") or _pg_ctl_beside_server(show or _show)
    if not pg_ctl:
        reasons.append("no pg_ctl on PATH")
        return None
    try:
        owner = Path(data_directory).stat().st_uid
    except OSError as exc:
        reasons.append(f"its data directory {data_directory} is not on this machine ({exc})")
        return None
    argv = [pg_ctl, "-D", data_directory, "restart", "-m", "fast", "-w"]
    if uid == owner:
        return RestartCommand(argv, f"pg_ctl on {data_directory}")
    runuser = which("runuser")
    if uid == 0 and runuser:
        user = _name_of(owner)
        return RestartCommand([runuser, "-u", user, "--", *argv], f"pg_ctl as {user}")
    reasons.append(f"data directory {data_directory} belongs to another user")
    return None


def _show(name: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SHOW {name}")
        return cursor.fetchone()[0]


def _pg_ctl_beside_server(show) -> str | None:
    try:
        major = re.match(r"\d+", show("server_version")).group(0)
    except Exception:
        return None
    candidate = Path(f"/usr/lib/postgresql/{major}/bin/pg_ctl")
    return str(candidate) if candidate.exists() else None


def _uid_of(user: str) -> int | None:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


class DatabaseRestart:
    """The restart command, run in the background so the monitor loop keeps ticking."""

    def __init__(self, command: RestartCommand, *, logfile: Path) -> None:
        self.command = command
        self.logfile = logfile
        self.process: subprocess.Popen | None = None
        self.exit_status: int | None = None
        self.started_at_s: float | None = None
        self.finished_at_s: float | None = None

    def start(self, *, at_s: float) -> None:
        with self.logfile.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - the configured or detected argv
                self.command.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started_at_s = at_s

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_status is None

    def poll(self, *, at_s: float) -> bool:
        """True once, when the command has just finished."""
        if not self.running:
            return False
        status = self.process.poll()
        if status is None:
            if at_s - self.started_at_s > RESTART_TIMEOUT_S:
                self.stop()
                status = self.process.returncode
            else:
                return False
        self.exit_status = status
        self.finished_at_s = at_s
        return True

    def stop(self) -> None:
        """End the command (only its own process group) if it is still running."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        try:
            return self.logfile.read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "command": self.command.shown,
            "how": self.command.how,
            "started_at_s": self.started_at_s,
            "finished_at_s": self.finished_at_s,
            "exit_status": self.exit_status,
        }
