"""What a worker process holds: `python -m config.worker` leaves the web's modules out.

A prefork child is a fork of the worker's main process: what the task below
finds imported there was imported before the fork, and is resident in the
main process and in every child.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import pytest
from celery import shared_task
from django.core.checks import Error, register
from django.db import connection
from django.test.utils import CaptureQueriesContext

from config.celery_app import _drop_debug_query_log
from config.worker import run_worker_checks
from tests.conftest import wait_for
from tests.probe_worker import probe_worker

PROBE_QUEUE = "probe_worker_memory"
WORKER_FLAG = "BACKTRACK_TEST_WORKER_MEMORY"
# The web's: the URLconf and its API views, the schema, /metrics; Flower and
# `celery amqp`'s shell, which the `celery` command line would import.
WEB_ONLY_MODULES = (
    "config.urls",
    "rest_framework.views",
    "drf_spectacular.views",
    "prometheus_client",
    "sagas.metrics",
    "flower",
    "tornado",
    "prompt_toolkit",
    "click_repl",
    "requests",
)


@shared_task(name="tests.worker_memory.report")
def report(*, path: str, **_kwargs) -> None:
    imported = [name for name in WEB_ONLY_MODULES if name in sys.modules]
    Path(path).write_text(json.dumps({"imported": imported, "frozen": gc.get_freeze_count()}))


@pytest.mark.saga
@pytest.mark.django_db(transaction=True)
def test_a_pool_process_imported_none_of_the_web_and_froze_what_it_inherited(tmp_path):
    from config.celery_app import app

    out = tmp_path / "report.json"
    with probe_worker(
        module=__name__,
        flag=WORKER_FLAG,
        queues=(PROBE_QUEUE,),
        logfile=tmp_path / "worker.log",
        name="memory",
    ):
        app.send_task(report.name, kwargs={"path": str(out)}, queue=PROBE_QUEUE)
        wait_for(out.exists, timeout=60, message="the worker to run the probe task")

    found = json.loads(out.read_text())
    assert found["imported"] == []
    # Everything imported before the fork sits in the permanent generation.
    assert found["frozen"] > 10_000


def test_a_worker_runs_the_checks_that_concern_it_and_logs_what_they_report(caplog, settings):
    settings.ROOT_URLCONF = "tests.config.no_such_urlconf"  # the URL checks would report it

    @register("worker_test")
    def broken(app_configs, **kwargs):
        return [Error("broken on purpose", id="tests.E001")]

    from django.core.checks.registry import registry

    try:
        with caplog.at_level("WARNING", logger="config.worker"):
            reported = run_worker_checks()
    finally:
        registry.registered_checks.discard(broken)

    assert [message.id for message in reported] == ["tests.E001"]
    assert "broken on purpose" in caplog.text


@pytest.mark.django_db
def test_with_debug_on_a_task_starts_with_an_empty_query_log(settings):
    settings.DEBUG = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    assert len(connection.queries_log) >= 1

    _drop_debug_query_log()

    assert len(connection.queries_log) == 0


@pytest.mark.django_db
def test_a_query_log_being_captured_is_left_alone(settings):
    settings.DEBUG = True
    with CaptureQueriesContext(connection) as captured:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        _drop_debug_query_log()

    assert len(captured) == 1
