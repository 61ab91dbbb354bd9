"""Developer tooling used by the Makefile: the standard library, sagas.harness.redis_server
and, to ping the workers, Celery.

python -m config.devstack run
    `make run`: migrate, seed the demo data and run config/Procfile with honcho
    (Redis as for redis-exec). Once the web server, a worker and Flower answer,
    print the banner (the URLs, logins and a command that books a trip) and
    write it to .run/banner.txt; print it again when Ctrl-C has stopped
    everything. Holds the terminal meanwhile, so that Ctrl-C reaches the stack
    and not make: a stop asked for exits 0.
python -m config.devstack redis-exec -- CMD [ARG...]
    Run CMD with REDIS_URL set. When REDIS_URL is not set already, start a
    throwaway Redis on a free local port for the lifetime of CMD, then stop it.
python -m config.devstack banner
    Print the banner of the running `make run` (.run/banner.txt), or the
    local URLs and logins when none runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sagas.harness.redis_server import Interrupted, LocalRedis, RedisServerError, redis_executable

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FLOWER_DEV_AUTH = "flower:flower-dev"
RUN_DIR = Path(".run")
BANNER_FILE = RUN_DIR / "banner.txt"
REDIS_URL_FILE = RUN_DIR / "redis.url"
PROCFILE = Path("config/Procfile")
# How long `run` waits for the web server, a worker and Flower before it says
# which of them did not come up (it keeps waiting and prints the banner late).
READY_TIMEOUT_S = 90.0
# As bookings/demo.py seeds them (tests/config/test_devstack.py keeps them in step).
DEMO_USER = ("demo", "demo-password")
DEMO_ADMIN = ("admin", "admin-password")
DEMO_TRIP = {
    "customer": {"name": "Demo", "email": "demo@example.com"},
    "lines": [
        {"sku": "FL-LIS-BER-0900", "quantity": 1},
        {"sku": "HT-BER-MITTE", "quantity": 1},
        {"sku": "CR-BER-COMPACT", "quantity": 1},
    ],
    "payment": {"amount": "380.00", "currency": "EUR", "card_token": "tok_ok"},
}


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


@dataclass(frozen=True)
class Stack:
    """Where `make run`'s processes listen, from the environment (WEB_PORT, FLOWER_PORT)."""

    web_port: int = 8000
    flower_port: int = 5555
    flower_auth: str = FLOWER_DEV_AUTH

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Stack:
        return cls(
            web_port=port_from_env(env, "WEB_PORT", cls.web_port),
            flower_port=port_from_env(env, "FLOWER_PORT", cls.flower_port),
            flower_auth=env.get("FLOWER_BASIC_AUTH") or FLOWER_DEV_AUTH,
        )

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def flower(self) -> str:
        return f"http://127.0.0.1:{self.flower_port}"


def port_from_env(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise DevstackError(f"{name}={raw!r} is not a TCP port number")
    return int(raw)


def book_trip_command(stack: Stack, token: str | None) -> str:
    """One shell command that books the demo trip as the demo user.

    With the demo user's token known it is a single curl; without, the token
    is fetched first, in the same command.
    """
    body = json.dumps(DEMO_TRIP)
    book = (
        f"curl -s -X POST {stack.web}/api/bookings/ \\\n"
        f'  -H "Authorization: Token {token or "$TOKEN"}" '
        "-H 'Content-Type: application/json' \\\n"
        f"  -d {shlex.quote(body)}"
    )
    if token:
        return book
    login = json.dumps({"username": DEMO_USER[0], "password": DEMO_USER[1]})
    fetch = (
        f"TOKEN=$(curl -s -X POST {stack.web}/api/auth/token/ "
        f"-H 'Content-Type: application/json' -d {shlex.quote(login)} \\\n"
        "  | python3 -c 'import json, sys; print(json.load(sys.stdin)[\"token\"])') && \\\n"
    )
    return fetch + book


UP = f"Backtrack is up. Ctrl-C stops everything; this text is in {BANNER_FILE}"
STOPPED = "Backtrack has stopped (`make run` starts it again). It served:"
NOT_RUNNING = "Backtrack is not running here; `make run` serves:"


def banner_text(stack: Stack, *, token: str | None = None, headline: str = UP) -> str:
    flower_user, _, flower_password = stack.flower_auth.partition(":")
    flower_note = (
        "(dev default; FLOWER_BASIC_AUTH=user:pass)"
        if stack.flower_auth == FLOWER_DEV_AUTH
        else "(from FLOWER_BASIC_AUTH)"
    )
    web = stack.web
    rows = [
        ("API", f"{web}/api/", f"{DEMO_USER[0]} / {DEMO_USER[1]}  (Token or session)"),
        ("API docs", f"{web}/api/docs/", "Swagger UI"),
        ("Health", f"{web}/healthz", ""),
        ("Admin", f"{web}/admin/", f"{DEMO_ADMIN[0]} / {DEMO_ADMIN[1]}"),
        ("Live ops", f"{web}/admin/sagas/saga/live/", "sagas as they run (admin login)"),
        ("Flower", f"{stack.flower}/", f"{flower_user} / {flower_password}  {flower_note}"),
    ]
    width = max(len(url) for _, url, _ in rows)
    lines = [f"    {name:<9} {url:<{width}}  {note}".rstrip() for name, url, note in rows]
    command = "\n".join(f"    {line}" for line in book_trip_command(stack, token).splitlines())
    return (
        f"\n  {headline}\n\n"
        + "\n".join(lines)
        + "\n\n  Book a trip as the demo user. The answer's saga_url, fetched with the same"
        + "\n  Authorization header, follows its saga (so does Flower); bookings/?chaos=car"
        + "\n  makes the car step fail, to watch it compensate:\n\n"
        + command
        + "\n"
    )


def banner() -> None:
    """The running stack's banner, else the URLs and logins `make run` would serve."""
    try:
        text = BANNER_FILE.read_text()
    except OSError:
        text = banner_text(Stack.from_env(dict(os.environ)), headline=NOT_RUNNING)
    print(text, flush=True)


# --- make run: the whole local stack ------------------------------------------


@contextlib.contextmanager
def ignoring(signum: int) -> Iterator[None]:
    previous = signal.signal(signum, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signum, previous)


class Terminal:
    """While the stack runs, its process group is the terminal's foreground group.

    The terminal sends Ctrl-C's SIGINT to every process of its foreground
    group. GNU make, left there, dies of it whatever its recipe's exit status
    (`make: *** [run] Interrupt`, 130). Taken out of it, make only waits for
    this process, which stops the stack and exits 0. The shell's job control
    does the same for each job; the group is handed back before exiting (and
    should this process be killed instead, the shell takes the terminal back
    when make ends). Ctrl-Z is ignored meanwhile: a stopped stack would hold
    the terminal from a shell still waiting for make.
    """

    def __init__(self) -> None:
        self.fd: int | None = None
        self.previous_group = 0
        self.previous_tstp: signal.Handlers | None = None

    def take(self) -> bool:
        """Become the foreground group, if started in the foreground of a terminal."""
        try:
            fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return False  # no controlling terminal (CI, a pipe, a service)
        try:
            previous = os.tcgetpgrp(fd)
            if previous != os.getpgrp():
                os.close(fd)
                return False  # started in the background: Ctrl-C is not ours to take
            os.setpgid(0, 0)
            with ignoring(signal.SIGTTOU):  # a background group may not set it otherwise
                os.tcsetpgrp(fd, os.getpgrp())
        except OSError:
            os.close(fd)
            return False
        self.fd, self.previous_group = fd, previous
        self.previous_tstp = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
        threading.Thread(target=self._watch_hangup, args=(fd,), daemon=True).start()
        return True

    def _watch_hangup(self, fd: int) -> None:
        """A closed terminal window stops the stack as SIGHUP would.

        The kernel sends a hangup's SIGHUP to the session leader; make (where
        it leads the session) passes it on to nobody and waits for us.
        """
        poller = select.poll()
        poller.register(fd, 0)  # POLLHUP and POLLERR are reported whatever the mask
        while self.fd == fd:
            events = poller.poll(1000)
            if self.fd == fd and any(
                mask & (select.POLLHUP | select.POLLERR) for _, mask in events
            ):
                os.kill(os.getpid(), signal.SIGHUP)
                return

    def give_back(self) -> None:
        if self.fd is None:
            return
        try:
            with ignoring(signal.SIGTTOU):
                os.tcsetpgrp(self.fd, self.previous_group)
        except OSError:
            pass  # that group is gone (make was killed): the shell takes the terminal back
        finally:
            os.close(self.fd)
            self.fd = None
            signal.signal(signal.SIGTSTP, self.previous_tstp or signal.SIG_DFL)


class StackSupervisor:
    """Runs one child at a time in a process group of its own and stops it when asked.

    Only this process receives the terminal's signals; it passes a stop on to
    the child as SIGINT (Ctrl-C) or SIGTERM (SIGTERM, and SIGHUP, which
    honcho does not handle: it would die and leave the stack running).
    """

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None

    def install(self) -> None:
        for signum in FORWARDED_SIGNALS:
            signal.signal(signum, self._on_signal)

    @property
    def stopping(self) -> bool:
        return self.stop_signal is not None

    def _on_signal(self, signum: int, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        self._forward()

    def _forward(self) -> None:
        if self.child is not None and self.child.poll() is None and self.stop_signal is not None:
            relayed = signal.SIGINT if self.stop_signal == signal.SIGINT else signal.SIGTERM
            with contextlib.suppress(ProcessLookupError):
                self.child.send_signal(relayed)

    def start(
        self, cmd: list[str], env: dict[str, str], *, output: int | None = None
    ) -> subprocess.Popen:
        self.child = subprocess.Popen(  # noqa: S603 - our own commands
            cmd, env=env, process_group=0, stdout=output, stderr=output
        )
        self._forward()  # a stop that came while it started
        return self.child

    def run(self, cmd: list[str], env: dict[str, str]) -> int:
        child = self.start(cmd, env)
        return child.wait()


class Output:
    """The stack's output, relayed by this process: honcho's lines, then the banner.

    honcho writes to a pseudo-terminal of its own (so that it still colours
    its prefixes) or a pipe, never to the user's terminal: once that is gone
    (a closed window) honcho would die of the first line it cannot write, and
    leave web, workers, beat and Flower running. Here a line that cannot be
    written is dropped. The banner is written between two of honcho's lines.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reader: int | None = None
        self.writer: int | None = None
        self.thread: threading.Thread | None = None

    def open(self) -> int:
        """The descriptor honcho should write to."""
        if sys.stdout.isatty():
            self.reader, self.writer = pty.openpty()
            attrs = termios.tcgetattr(self.writer)
            attrs[1] &= ~termios.OPOST  # "\n" stays "\n": the real terminal adds the "\r"
            termios.tcsetattr(self.writer, termios.TCSANOW, attrs)
        else:
            self.reader, self.writer = os.pipe()
        self.thread = threading.Thread(target=self._relay, name="devstack-output", daemon=True)
        self.thread.start()
        return self.writer

    def child_started(self) -> None:
        os.close(self.writer)  # the child holds it now: end of output once it exits

    def _relay(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self.reader, 65536)
            except OSError:  # EIO: the pseudo-terminal's last writer is gone
                chunk = b""
            if not chunk:
                break
            lines, _, pending = (pending + chunk).rpartition(b"\n")
            if lines:
                self.write(lines + b"\n")
        if pending:
            self.write(pending)
        os.close(self.reader)

    def write(self, data: bytes) -> None:
        with self.lock:
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            except (OSError, ValueError):
                pass  # the terminal is gone; keep draining so honcho never blocks

    def print(self, text: str) -> None:
        self.write(text.encode() + b"\n")

    def close(self, timeout: float = 5.0) -> None:
        if self.thread is not None:
            self.thread.join(timeout)


class Readiness:
    """Polls the web server, the workers and Flower until all answer, then prints the banner."""

    def __init__(self, stack: Stack, broker_url: str, output: Output, *, timeout: float) -> None:
        self.stack = stack
        self.output = output
        self.broker_url = broker_url
        self.timeout = timeout
        self.done = threading.Event()
        self.text: str | None = None
        self.token: str | None = None
        self._celery = None

    def problems(self) -> list[str]:
        """What does not answer yet, one clause each; empty once everything does."""
        found = []
        health = self._get(f"{self.stack.web}/healthz")
        if health != 200:
            found.append(f"the web server ({self.stack.web}/healthz: {health})")
        workers = self._ping_workers()
        if not workers:
            found.append(f"a Celery worker (no answer to a ping on {self.broker_url})")
        flower = self._get(f"{self.stack.flower}/healthcheck")
        if flower != 200:
            found.append(f"Flower ({self.stack.flower}/healthcheck: {flower})")
        return found

    def _get(self, url: str) -> int | str:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - 127.0.0.1
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None)  # URLError: "Connection refused"
            return str(reason or getattr(exc, "strerror", None) or type(exc).__name__)

    def _ping_workers(self) -> list[str]:
        try:
            if self._celery is None:
                from celery import Celery

                self._celery = Celery("devstack", broker=self.broker_url, set_as_current=False)
                self._celery.conf.broker_connection_timeout = 2
                self._celery.conf.broker_connection_retry_on_startup = False
            replies = self._celery.control.ping(timeout=1.0)
        except Exception:  # a broker not answering yet means no worker answered either
            return []
        return sorted(name for reply in replies for name in reply)

    def demo_token(self) -> str | None:
        """The demo user's API token (its one and only, so it stays valid), if it logs in."""
        request = urllib.request.Request(  # noqa: S310 - 127.0.0.1
            f"{self.stack.web}/api/auth/token/",
            data=json.dumps({"username": DEMO_USER[0], "password": DEMO_USER[1]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                return json.load(response)["token"]
        except (OSError, ValueError, KeyError):
            return None

    def wait(self) -> None:
        """Runs in a thread until everything answers (then prints) or ``done`` is set."""
        deadline = time.monotonic() + self.timeout
        while not self.done.is_set():
            problems = self.problems()
            if not problems:
                break
            if deadline is not None and time.monotonic() > deadline:
                log(
                    f"not up after {self.timeout:.0f}s: "
                    + "; ".join(problems)
                    + " did not answer. Their lines above say why; still waiting."
                )
                deadline = None
            self.done.wait(1.0)
        if self.done.is_set():
            return
        self.token = self.demo_token()
        self.text = banner_text(self.stack, token=self.token)
        RUN_DIR.mkdir(exist_ok=True)
        BANNER_FILE.write_text(self.text)
        self.output.print(self.text)


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def run_stack(*, procfile: Path = PROCFILE, ready_timeout: float = READY_TIMEOUT_S) -> int:
    """`make run`. Exit status: 0 when stopped by Ctrl-C (or SIGTERM/SIGHUP), else
    the status of what failed (migrate, seed_demo, or the first process to exit)."""
    env = inherited_environment()
    stack = Stack.from_env(env)
    env.update(
        WEB_PORT=str(stack.web_port),
        FLOWER_PORT=str(stack.flower_port),
        FLOWER_BASIC_AUTH=stack.flower_auth,
    )
    env.setdefault("FLOWER_URL", stack.flower)
    # The Procfile's gunicorn, celery and python are this interpreter's, as in .venv/bin.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for name, port in (("WEB_PORT", stack.web_port), ("FLOWER_PORT", stack.flower_port)):
        if port_in_use(port):
            raise DevstackError(
                f"port {port} on 127.0.0.1 is taken (another `make run`?): stop what "
                f"listens there (`ss -ltnp 'sport = :{port}'`) or choose another, {name}=..."
            )
    supervisor = StackSupervisor()
    supervisor.install()
    terminal = Terminal()
    terminal.take()
    redis: LocalRedis | None = None
    readiness: Readiness | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="devstack-redis-") as workdir:
            if env.get("REDIS_URL"):
                log(f"using REDIS_URL {env['REDIS_URL']}")
            else:
                redis = LocalRedis(redis_executable(), Path(workdir))
                redis.start(should_stop=lambda: supervisor.stopping)
                log(f"started Redis {redis.version()} ({redis.executable}) at {redis.url}")
                env["REDIS_URL"] = redis.url
                RUN_DIR.mkdir(exist_ok=True)
                REDIS_URL_FILE.write_text(redis.url + "\n")
            manage = [sys.executable, "manage.py"]
            for step in (["migrate", "--no-input"], ["seed_demo"]):
                returncode = supervisor.run([*manage, *step], env)
                if supervisor.stopping:
                    return 0
                if returncode != 0:
                    log(f"error: `manage.py {' '.join(step)}` failed (exit {returncode})")
                    return returncode
            output = Output()
            readiness = Readiness(stack, env["REDIS_URL"], output, timeout=ready_timeout)
            honcho = supervisor.start(
                [sys.executable, "-m", "honcho", "-f", str(procfile), "-d", ".", "start"],
                env,
                output=output.open(),
            )
            output.child_started()
            threading.Thread(target=readiness.wait, name="devstack-ready", daemon=True).start()
            returncode = honcho.wait()
            readiness.done.set()
            output.close()
            if supervisor.stopping:
                output.print(banner_text(stack, token=readiness.token, headline=STOPPED))
                log("stopped: web, worker, beat and Flower have exited; stopping Redis")
                return 0
            log(f"error: a process of the stack exited (honcho: {returncode}); all stopped")
            return returncode or 1
    except Interrupted:
        return 0
    except OSError as exc:
        log(f"error: cannot run {exc.filename or ''}: {exc.strerror}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    finally:
        if readiness is not None:
            readiness.done.set()
        BANNER_FILE.unlink(missing_ok=True)
        if redis is not None:
            REDIS_URL_FILE.unlink(missing_ok=True)
            redis.stop()
        terminal.give_back()


# --- Command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.devstack", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("run", help="make run: the whole local stack, then the banner")
    stack.add_argument("--procfile", type=Path, default=PROCFILE, help="(config/Procfile)")
    stack.add_argument(
        "--ready-timeout",
        type=float,
        default=float(os.environ.get("DEVSTACK_READY_TIMEOUT_S") or READY_TIMEOUT_S),
        metavar="SECONDS",
        help="say what did not come up after this long (DEVSTACK_READY_TIMEOUT_S, 90)",
    )
    run = commands.add_parser("redis-exec", help="run a command with REDIS_URL set")
    run.add_argument(
        "--publish",
        type=Path,
        metavar="FILE",
        help="write the started Redis's URL to FILE while CMD runs (local settings read it)",
    )
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    commands.add_parser("banner", help="print the running stack's URLs, logins and commands")
    args = parser.parse_args(argv)

    try:
        if args.command == "banner":
            banner()
            return 0
        if args.command == "run":
            return run_stack(procfile=args.procfile, ready_timeout=args.ready_timeout)
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            parser.error("redis-exec needs a command: redis-exec -- CMD [ARG...]")
        return redis_exec(cmd, publish=args.publish)
    except DevstackError as exc:
        log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
