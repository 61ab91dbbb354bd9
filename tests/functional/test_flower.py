"""Flower, started as `make run` starts it, sees the worker and a saga's tasks behind basic auth."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from config.celery_app import app
from sagas.models import Saga
from tests.conftest import QUEUES, wait_for
from tests.functional.support import TRIP_STEPS, book_trip, wait_terminal

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

USER, PASSWORD = "tester", "secret-pass"


class Flower:
    def __init__(self, port: int, process: subprocess.Popen, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = process
        self.log = log

    def get(self, path: str, *, auth: tuple[str, str] | None = (USER, PASSWORD)):
        """(status, parsed JSON or text) of a GET, with basic auth unless ``auth`` is None."""
        request = urllib.request.Request(self.url + path)  # noqa: S310 (http://127.0.0.1 only)
        if auth is not None:
            token = base64.b64encode(":".join(auth).encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                body = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def flower(celery_worker, tmp_path_factory):
    """Flower on a free port against the test broker, stopped after the module's tests.

    Its persistent state file goes to a temporary directory; stopping it must
    write that file (the Procfile relies on it to keep history across restarts).
    """
    tmp_path = tmp_path_factory.mktemp("flower")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("FLOWER_")}
    env.update(DJANGO_SETTINGS_MODULE="config.settings.test", REDIS_URL=app.conf.broker_url)
    log = tmp_path / "flower.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: S603
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "config",
                "flower",
                f"--port={port}",
                "--address=127.0.0.1",
                f"--basic-auth={USER}:{PASSWORD}",
                # The Procfile's persistence, kept out of the repository.
                "--persistent=True",
                f"--db={tmp_path / 'flower.db'}",
                "--state_save_interval=10000",
            ],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = Flower(port, process, log)
    try:
        wait_for(
            lambda: process.poll() is not None or _answers(running),
            timeout=15,
            interval=0.1,
            message="Flower to answer /healthcheck",
        )
        assert process.poll() is None, f"Flower exited:\n{running.output()}"
        yield running
    finally:
        process.terminate()  # SIGTERM: Flower saves its state and exits
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    assert process.returncode == 0, f"Flower did not stop cleanly:\n{running.output()}"
    assert list(tmp_path.glob("flower.db*")), f"Flower saved no state:\n{running.output()}"


def _answers(flower: Flower) -> bool:
    try:
        return flower.get("/healthcheck", auth=None)[0] == 200
    except OSError:
        return False


def wait_until_flower_receives_events(flower: Flower) -> None:
    """Flower's event receiver subscribes after its HTTP server is up; events sent
    before that are lost (Redis pub/sub). Send a no-op task until one is seen."""
    accumulate = app.tasks["celery.accumulate"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = accumulate.apply_async(args=("flower-probe",), queue="sagas")
        try:
            wait_for(
                lambda probe=probe: probe.id in flower.get("/api/tasks")[1],
                timeout=1,
                interval=0.1,
            )
        except AssertionError:
            continue
        return
    raise AssertionError(f"Flower received no task events:\n{flower.output()}")


def test_flower_shows_the_worker_and_the_tasks_of_a_saga(
    flower, celery_worker, customer, trip_items
):
    wait_until_flower_receives_events(flower)

    booking = book_trip(customer, trip_items)
    saga = wait_terminal(booking.saga_id)
    assert saga.status == Saga.Status.COMPLETED

    def saga_tasks():
        status, tasks = flower.get("/api/tasks")
        assert status == 200, tasks
        mine = {
            task["name"]: task for task in tasks.values() if str(saga.id) in str(task.get("kwargs"))
        }
        # The saga ends when the last step commits; that task's "succeeded"
        # event reaches Flower a moment later.
        done = {task.get("state") for task in mine.values()} == {"SUCCESS"}
        return mine if len(mine) == len(TRIP_STEPS) and done else None

    tasks = wait_for(saga_tasks, timeout=30, interval=0.2, message="Flower to see the saga")
    assert sorted(tasks) == sorted(f"trip_booking.{step}" for step in TRIP_STEPS)
    assert {task["state"] for task in tasks.values()} == {"SUCCESS"}
    assert {task["worker"] for task in tasks.values()} == {celery_worker.hostname}

    def workers():
        status, found = flower.get("/api/workers?refresh=1")
        return found if status == 200 and celery_worker.hostname in found else None

    found = wait_for(workers, timeout=30, interval=0.5, message="Flower to inspect the worker")
    worker = found[celery_worker.hostname]
    queues = {queue["name"] for queue in worker["active_queues"]}
    assert queues == set(QUEUES)
    assert "trip_booking.reserve_flight" in worker["registered"]


def test_flower_does_not_list_the_maintenance_jobs_beat_runs(flower, celery_worker):
    wait_until_flower_receives_events(flower)
    # Published as beat publishes them: to the maintenance queue, the worker's events on.
    jobs = [
        app.tasks[name].apply_async(queue=settings.MAINTENANCE_QUEUE)
        for name in ("sagas.reconcile_pending", "sagas.recover_stalled")
    ]
    for job in jobs:
        job.get(timeout=30)
    assert celery_worker.app.conf.worker_send_task_events is True

    # The worker sends its events in order: once Flower has a task sent after
    # the jobs ended, it would have had theirs too.
    wait_until_flower_receives_events(flower)
    status, tasks = flower.get("/api/tasks")

    assert status == 200
    assert not {job.id for job in jobs} & set(tasks)
    names = {task.get("name") for task in tasks.values()}
    assert "celery.accumulate" in names
    assert not names & {"sagas.reconcile_pending", "sagas.recover_stalled"}


@pytest.mark.parametrize("path", ["/", "/api/workers", "/api/tasks"])
@pytest.mark.parametrize("auth", [None, (USER, "wrong-pass"), ("intruder", PASSWORD)])
def test_flower_refuses_requests_without_the_right_credentials(flower, path, auth):
    status, _ = flower.get(path, auth=auth)

    assert status == 401
