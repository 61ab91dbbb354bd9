"""Developer tooling used by the Makefile: the standard library and sagas.harness.redis_server.

python -m config.devstack redis-exec -- CMD [ARG...]
    Run CMD with REDIS_URL set. When REDIS_URL is not set already, start a
    throwaway Redis on a free local port for the lifetime of CMD, then stop it.
python -m config.devstack banner
    Print the local URLs and the demo credentials.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from sagas.harness.redis_server import Interrupted, LocalRedis, RedisServerError, redis_executable

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FLOWER_DEV_AUTH = "flower:flower-dev"


# A failure worth one clear line, not a traceback.
DevstackError = RedisServerError


def log(message: str) -> None:
    print(f"devstack: {message}", file=sys.stderr, flush=True)


# --- Running the command ----------------------------------------------------


def inherited_environment() -> dict[str, str]:
    """The environment this process was started with.

    `python -m config.devstack` imports the `config` package, whose Celery app
    sets DJANGO_SETTINGS_MODULE as a side effect. Passing that on would make
    pytest prefer it over the test settings named in pyproject.toml. Linux keeps
    the original environment in /proc; elsewhere fall back to os.environ.
    """
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)
    return {os.fsdecode(key): os.fsdecode(value) for key, value in pairs}


def terminal_sent_it_to(child: subprocess.Popen) -> bool:
    """Ctrl-C reaches the whole foreground process group, so a child sharing
    our group already has the SIGINT; forwarding it would deliver it twice."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False  # no terminal: someone sent the signal to us alone
    try:
        return os.tcgetpgrp(fd) == os.getpgrp() == os.getpgid(child.pid)
    except OSError:
        return False
    finally:
        os.close(fd)


class Supervisor:
    """Relays SIGINT/SIGTERM/SIGHUP to the child; remembers one that came earlier."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []

    def install(self) -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame) -> None:
        if self.child is None:
            self.received.append(signum)
        elif not (signum == signal.SIGINT and terminal_sent_it_to(self.child)):
            self.child.send_signal(signum)

    def run(self, cmd: list[str], env: dict[str, str]) -> int:
        if self.received:
            raise Interrupted
        try:
            self.child = subprocess.Popen(cmd, env=env)  # noqa: S603 - the user's command
        except OSError as exc:
            log(f"error: cannot run {cmd[0]!r}: {exc.strerror}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        for signum in self.received:
            self.child.send_signal(signum)
        returncode = self.child.wait()
        return 128 - returncode if returncode < 0 else returncode


def redis_exec(cmd: list[str], *, publish: Path | None = None) -> int:
    """Run CMD with REDIS_URL set; ``publish`` names a file that holds the URL meanwhile.

    The file lets a second shell (``manage.py shell``) find the Redis that
    ``make run`` started on a free port; it is removed when CMD ends.
    """
    env = inherited_environment()
    if os.environ.get("REDIS_URL"):
        env["REDIS_URL"] = os.environ["REDIS_URL"]
        try:
            os.execvpe(cmd[0], cmd, env)  # noqa: S606 - replaces this process by design
        except OSError as exc:
            log(f"error: cannot run {cmd[0]!r}: {exc.strerror}")
            return 127 if isinstance(exc, FileNotFoundError) else 126

    supervisor = Supervisor()
    supervisor.install()
    with tempfile.TemporaryDirectory(prefix="devstack-redis-") as workdir:
        redis = LocalRedis(redis_executable(), Path(workdir))
        try:
            redis.start(should_stop=lambda: bool(supervisor.received))
            log(f"started Redis {redis.version()} ({redis.executable}) at {redis.url}")
            env["REDIS_URL"] = redis.url
            if publish is not None:
                publish.parent.mkdir(parents=True, exist_ok=True)
                publish.write_text(redis.url + "\n")
            return supervisor.run(cmd, env)
        except Interrupted:
            return 128 + supervisor.received[0]
        finally:
            if publish is not None:
                publish.unlink(missing_ok=True)
            redis.stop()


# --- Banner -----------------------------------------------------------------


def banner() -> None:
    flower_auth = os.environ.get("FLOWER_BASIC_AUTH") or FLOWER_DEV_AUTH
    flower_note = (
        "dev default, set FLOWER_BASIC_AUTH to change"
        if flower_auth == FLOWER_DEV_AUTH
        else "from FLOWER_BASIC_AUTH"
    )
    print(
        f"""
  Backtrack is starting (Ctrl-C stops everything)

    API      http://127.0.0.1:8000/api/     demo user  demo / demo-password
    Admin    http://127.0.0.1:8000/admin/   admin      admin / admin-password
    Flower   http://127.0.0.1:5555/         basic auth {flower_auth}  ({flower_note})
""",
        flush=True,
    )


# --- Command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.devstack", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("redis-exec", help="run a command with REDIS_URL set")
    run.add_argument(
        "--publish",
        type=Path,
        metavar="FILE",
        help="write the started Redis's URL to FILE while CMD runs (local settings read it)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    commands.add_parser("banner", help="print the local URLs and demo credentials")
    args = parser.parse_args(argv)

    try:
        if args.command == "banner":
            banner()
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("redis-exec needs a command: redis-exec -- CMD [ARG...]")
        return redis_exec(cmd, publish=args.publish)
    except DevstackError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
