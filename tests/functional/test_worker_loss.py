"""A worker process killed mid-step: the message comes back and the step has one effect."""

from __future__ import annotations

import os
import signal
import time

import pytest
from django.utils import timezone

from inventory import selectors as inventory_selectors
from inventory.models import Hold
from sagas.chaos.workers import WorkerPool
from sagas.harness.processes import child_pids
from sagas.models import Saga, SagaLog
from tests.conftest import QUEUES, wait_for
from tests.functional.support import TRIP_STEPS, book_trip, stock, wait_terminal

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def lone_worker(celery_worker, tmp_path):
    """One prefork worker process (-c 1) as the only consumer of every queue."""
    from config.celery_app import app

    embedded = [celery_worker.hostname]
    pool = WorkerPool(
        app=app, count=1, topology="shared", run_id="loss", workdir=tmp_path, queues=tuple(QUEUES)
    )
    try:
        for queue in QUEUES:
            replies = app.control.cancel_consumer(queue, destination=embedded, reply=True)
            assert replies, f"the embedded worker did not stop consuming {queue}"
        pool.start(broker_url=app.conf.broker_url)
        yield pool.workers[0]
    finally:
        pool.stop()
        for queue in QUEUES:
            app.control.add_consumer(queue, destination=embedded, reply=True)


def test_a_step_killed_mid_way_runs_again_and_has_one_effect(lone_worker, customer, trip_items):
    [child] = child_pids(lone_worker.process.pid)
    booking = book_trip(customer, trip_items, chaos={"delay_ms": {"reserve_hotel": 1500}})
    wait_for(
        lambda: Saga.objects.get(pk=booking.saga_id).steps_done >= 1,
        message="the flight to be held",
    )
    time.sleep(0.5)  # the hotel step is now asleep inside the pool process

    assert Saga.objects.get(pk=booking.saga_id).steps_done == 1
    killed_at = timezone.now()
    os.kill(child, signal.SIGKILL)
    saga = wait_terminal(booking.saga_id, timeout=60)

    assert saga.status == Saga.Status.COMPLETED
    hotel = SagaLog.objects.filter(saga=saga, step="reserve_hotel", phase="action")
    # The killed attempt committed nothing; the redelivered one recorded that
    # its worker was lost (counted against SAGA_MAX_LOST_DELIVERIES), then ran.
    assert [(row.status, row.attempt) for row in hotel] == [("lost", 1), ("succeeded", 1)]
    assert hotel.get(status="succeeded").started_at > killed_at
    assert (
        list(SagaLog.objects.filter(saga=saga, status="succeeded").values_list("step", flat=True))
        == TRIP_STEPS
    )
    line = booking.lines.get(kind="hotel_room")
    assert (
        inventory_selectors.holds_by_reference(references=[line.hold_reference])[
            line.hold_reference
        ].status
        == "CONFIRMED"
    )
    assert Hold.objects.filter(item__sku="HT-TEST").count() == 1
    assert stock(trip_items) == {"FL-TEST": (4, 0, 1), "HT-TEST": (4, 0, 1), "CR-TEST": (4, 0, 1)}
    # A task really was running in the killed process, and prefork replaced the process.
    assert "Task handler raised error: WorkerLostError" in lone_worker.logfile.read_text()
    [replacement] = child_pids(lone_worker.process.pid)
    assert replacement != child
