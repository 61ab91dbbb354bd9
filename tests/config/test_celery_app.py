"""What a production worker registers: the product's tasks, none of the harness's."""

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

LIST_TASKS = """
import json, django
django.setup()
from config.celery_app import app
app.loader.import_default_modules()  # what `celery worker` does before it consumes
print(json.dumps(sorted(app.tasks)))
"""


def registered_tasks(settings_module: str) -> list[str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": settings_module,
        "DJANGO_SECRET_KEY": "x" * 50,
        "DJANGO_ALLOWED_HOSTS": "backtrack.example.com",
        "DATABASE_URL": os.environ.get("DATABASE_URL") or "postgres://app@db/app",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
    }
    result = subprocess.run(  # noqa: S603 - our own interpreter and script
        [sys.executable, "-c", LIST_TASKS],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_production_worker_registers_no_bench_or_chaos_task():
    tasks = registered_tasks("config.settings.production")

    harness = [name for name in tasks if name.startswith(("bench.", "chaos.", "toy_saga."))]
    assert harness == []
    # The product's own tasks are all there, made from the saga registry.
    assert "trip_booking.reserve_flight" in tasks
    assert "trip_booking.refund_payment" in tasks
    assert "booking_cancellation.recharge_payment" in tasks
    assert {"sagas.step_failed", "sagas.compensation_failed", "sagas.recover_stalled"} <= set(tasks)


@pytest.mark.parametrize(
    "task",
    [
        "sagas.reconcile_pending",
        "sagas.recover_stalled",
        "sagas.purge_expired",
        "bookings.purge_idempotency_keys",
    ],
)
def test_maintenance_jobs_run_on_their_own_queue(task):
    from config.celery_app import app

    assert app.amqp.router.route({}, task)["queue"].name == "maintenance"


def test_errbacks_stay_on_the_saga_queue():
    from config.celery_app import app

    assert app.amqp.router.route({}, "sagas.step_failed")["queue"].name == "sagas"


def test_every_job_beat_schedules_sends_no_task_events():
    """Flower lists tasks from their events: beat's jobs every 2.5 s would bury the sagas'."""
    from config.celery_app import app

    app.loader.import_default_modules()
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}

    assert scheduled >= {"sagas.reconcile_pending", "sagas.recover_stalled"}
    assert {name: app.tasks[name].send_events for name in scheduled} == dict.fromkeys(
        scheduled, False
    )


def test_saga_steps_and_errbacks_still_send_task_events():
    from config.celery_app import app

    app.loader.import_default_modules()
    loud = [name for name in app.tasks if name.startswith(("trip_booking.", "sagas.step_failed"))]

    assert "trip_booking.reserve_flight" in loud
    assert all(app.tasks[name].send_events for name in loud)
