"""`make run` (config/devstack.py): the banner once everything answers, and Ctrl-C exits 0."""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings

from bookings import demo
from config import devstack

BASE_DIR = Path(settings.BASE_DIR)


# --- The banner ---------------------------------------------------------------


def test_the_banner_lists_every_page_with_its_login():
    stack = devstack.Stack(web_port=8123, flower_port=5678, flower_auth="ops:s3cret")

    text = devstack.banner_text(stack, token="abc123")

    for url in (
        "http://127.0.0.1:8123/api/ ",
        "http://127.0.0.1:8123/api/docs/",
        "http://127.0.0.1:8123/healthz",
        "http://127.0.0.1:8123/admin/ ",
        "http://127.0.0.1:8123/admin/sagas/saga/live/",
        "http://127.0.0.1:5678/ ",
    ):
        assert url in text
    assert "demo / demo-password" in text
    assert "admin / admin-password" in text
    assert "ops / s3cret  (from FLOWER_BASIC_AUTH)" in text
    assert '-H "Authorization: Token abc123"' in text
    assert "Ctrl-C stops everything; this text is in .run/banner.txt" in text


def test_the_banner_says_when_flower_uses_the_dev_password():
    text = devstack.banner_text(devstack.Stack.from_env({}))

    assert "flower / flower-dev  (dev default; FLOWER_BASIC_AUTH=user:pass)" in text


def test_without_the_token_the_command_fetches_it_first():
    command = devstack.book_trip_command(devstack.Stack(), None)

    assert command.startswith("TOKEN=$(curl -s -X POST http://127.0.0.1:8000/api/auth/token/")
    assert '-H "Authorization: Token $TOKEN"' in command


def test_the_banners_demo_data_is_what_seed_demo_creates():
    assert devstack.DEMO_USER == demo.DEMO_USER
    assert devstack.DEMO_ADMIN == demo.DEMO_ADMIN
    prices = {sku: Decimal(price) for sku, _kind, _name, _capacity, price in demo.ITEMS}
    lines = devstack.DEMO_TRIP["lines"]
    total = sum(prices[line["sku"]] * line["quantity"] for line in lines)
    assert Decimal(devstack.DEMO_TRIP["payment"]["amount"]) == total


@pytest.mark.parametrize("raw", ["http", "0", "70000", "-1"])
def test_a_bad_port_is_refused_by_name(raw):
    with pytest.raises(devstack.DevstackError, match=f"WEB_PORT='{raw}' is not a TCP port"):
        devstack.Stack.from_env({"WEB_PORT": raw})


def test_run_refuses_a_port_already_taken(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "WEB_PORT": str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "config.devstack", "run"],
            cwd=BASE_DIR,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in result.stderr
    assert "WEB_PORT=..." in result.stderr


# --- make run under a real terminal ---------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def descendants(root: int) -> dict[int, str]:
    """Every live process below ``root``, with its command line."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents[int(entry)] = int(fields[1])
        commands[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    found: dict[int, str] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = commands[pid]
                frontier.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Terminal:
    """`make run` in a copy of the tree, on a pseudo-terminal of its own."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: a new session whose terminal is the pty
            os.chdir(root)
            # -o: never reinstall the shared .venv from the copy's requirements.lock.
            os.execvpe("make", ["make", "-o", ".venv/.install-stamp", "run"], env)  # noqa: S606, S607
        self.output = bytearray()
        self.status: int | None = None

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every process on the terminal has gone
            return False
        self.output.extend(data)
        return bool(data)

    def text(self) -> str:
        return self.output.decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline or not self.read(0.5):
                raise AssertionError(f"no {needle!r} after {timeout}s:\n{self.text()[-6000:]}")

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                while self.read(0.1):
                    pass
                self.status = status
                return os.waitstatus_to_exitcode(status)
            self.read(0.2)
        raise AssertionError(f"make run still running after {timeout}s:\n{self.text()[-6000:]}")

    def close(self) -> None:
        """Whatever happened, leave nothing running: processes in this copy only."""
        if self.status is None:
            stack = descendants(self.pid)
            for pid in [self.pid, *stack]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(self.pid, 0)
        os.close(self.fd)


def status_of(url: str, *, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)  # noqa: S310 - http://127.0.0.1 only
    if auth is not None:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def admin_page(web: str, path: str) -> tuple[int, str]:
    """(status, final URL) of an admin page, logged in as the demo's admin."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{web}/admin/login/", timeout=10).read()
    csrf = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
    form = {
        "username": devstack.DEMO_ADMIN[0],
        "password": devstack.DEMO_ADMIN[1],
        "csrfmiddlewaretoken": csrf,
        "next": path,
    }
    request = urllib.request.Request(  # noqa: S310 - http://127.0.0.1 only
        f"{web}/admin/login/?next={path}",
        data=urllib.parse.urlencode(form).encode(),
        headers={"Referer": f"{web}/admin/login/"},
    )
    with opener.open(request, timeout=10) as response:
        return response.status, response.geturl()


def run_shell(command: str) -> dict:
    result = subprocess.run(  # noqa: S603 - the banner's command, which the test checks
        ["bash", "-c", command],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def get_json(url: str, token: str) -> dict:
    result = subprocess.run(  # noqa: S603
        ["curl", "-s", url, "-H", f"Authorization: Token {token}"],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return json.loads(result.stdout)


@pytest.fixture
def tree_copy(tmp_path):
    """The repository without its databases, .run or caches, sharing this .venv."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the project's virtualenv (make run runs .venv/bin)")
    for tool in ("make", "curl", "bash"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    root = tmp_path / "backtrack"
    shutil.copytree(
        BASE_DIR,
        root,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            ".run",
            "*.sqlite3*",
            "__pycache__",
            ".pytest_cache",
            ".ruff_cache",
            ".import_linter_cache",
            "staticfiles",
        ),
    )
    (root / ".venv").symlink_to(sys.prefix)
    return root


@pytest.mark.devstack
@pytest.mark.timeout(300)
def test_make_run_prints_the_banner_once_up_and_ctrl_c_stops_everything_with_exit_0(tree_copy):
    web_port, flower_port = free_port(), free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DATABASE_URL", "REDIS_URL", "DJANGO_SETTINGS_MODULE"}
        and not key.startswith(("FLOWER_", "MAKE", "MFLAGS"))
    }
    env.update(WEB_PORT=str(web_port), FLOWER_PORT=str(flower_port), TERM="dumb")
    terminal = Terminal(tree_copy, env)
    try:
        terminal.wait_for("Backtrack is up", timeout=180)
        terminal.wait_for("Flower ", timeout=10)
        terminal.wait_for('"tok_ok"}}\'', timeout=10)
        up = terminal.text()
        banner = up[up.index("Backtrack is up") :]

        # Printed after everything answered, and kept in .run/banner.txt.
        assert "celery@" in up or "worker@" in up
        saved = (tree_copy / ".run" / "banner.txt").read_text()
        assert saved.strip() in up
        web = f"http://127.0.0.1:{web_port}"
        for path in ("/api/", "/api/docs/", "/healthz", "/admin/", "/admin/sagas/saga/live/"):
            assert f"{web}{path}" in banner
        assert f"http://127.0.0.1:{flower_port}/" in banner
        # Every page it lists answers.
        for path in ("/api/", "/api/docs/", "/healthz"):
            assert status_of(f"{web}{path}") == 200, path
        for path in ("/admin/", "/admin/sagas/saga/live/"):
            assert admin_page(web, path) == (200, f"{web}{path}")
        flower = f"http://127.0.0.1:{flower_port}/"
        assert status_of(flower, auth=("flower", "flower-dev")) == 200
        assert status_of(flower) == 401

        # The banner's command books a trip, and the saga completes.
        command = saved[saved.index("curl -s -X POST") :].strip()
        booking = run_shell(command.replace("\\\n", " "))
        assert booking["status"] == "PENDING", booking
        token = re.search(r"Token ([0-9a-f]{20,})", command).group(1)
        status = None
        for _ in range(60):
            status = get_json(f"{web}{booking['saga_url']}", token)["status"]
            if status not in {"PENDING", "RUNNING"}:
                break
            time.sleep(0.5)
        assert status == "COMPLETED"

        stack = descendants(terminal.pid)
        started = " ".join(stack.values())
        for process in ("config.devstack run", "redis-server", "gunicorn", "config.worker"):
            assert process in started
        assert "celery -A config beat" in started
        assert "celery -A config flower" in started
        # The admin's links to Flower (sagas.admin task_link) point at this Flower.
        web_pids = [pid for pid, command in stack.items() if "gunicorn" in command]
        environ = Path(f"/proc/{web_pids[0]}/environ").read_bytes().split(b"\0")
        assert f"FLOWER_URL=http://127.0.0.1:{flower_port}".encode() in environ

        mark = len(terminal.output)
        os.write(terminal.fd, b"\x03")  # the terminal's interrupt character, as Ctrl-C
        code = terminal.wait_exit(timeout=60)
        after = terminal.output[mark:].decode(errors="replace")

        assert code == 0, after[-4000:]
        assert "make: ***" not in after
        assert "SIGINT received" in after
        assert "Backtrack has stopped" in after  # the banner, again
        assert f"{web}/admin/sagas/saga/live/" in after
        assert [pid for pid in stack if alive(pid)] == []
        assert not (tree_copy / ".run" / "redis.url").exists()
    finally:
        terminal.close()


# --- docker-compose.yml runs what config/Procfile runs ------------------------------


def test_compose_runs_the_procfiles_worker_and_beat_with_the_same_options():
    import yaml

    procfile = {}
    for line in (BASE_DIR / "config" / "Procfile").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, command = line.partition(":")
            procfile[name] = command.strip().removeprefix("exec ")
    services = yaml.safe_load((BASE_DIR / "docker-compose.yml").read_text())["services"]

    assert set(procfile) == {"web", "worker", "beat", "flower"}
    assert set(procfile) <= set(services)
    for name in ("worker", "beat"):
        assert services[name]["command"].split() == procfile[name].split()
    assert services["web"]["environment"]["FLOWER_URL"] == "${FLOWER_URL:-http://localhost:5555}"
