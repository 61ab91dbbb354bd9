"""Nothing waits forever: the reconciler, the sweeper, and a broker that is down."""

from datetime import timedelta
from unittest import mock

import pytest
from django.utils import timezone
from kombu.exceptions import OperationalError

from bookings.models import Booking
from sagas import services as saga_services
from sagas.models import Saga, SagaLog
from tests.functional.support import TRIP_STEPS, done_steps, park_after, stock, wait_terminal

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

LONG_AGO = timedelta(hours=2)


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def stuck_after(customer, trip_items, steps: int) -> Saga:
    return Saga.objects.get(pk=park_after(customer, trip_items, steps))


def backdate(saga: Saga, **fields) -> None:
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - LONG_AGO, **fields)


def test_a_running_saga_whose_messages_were_lost_is_resumed_where_it_stopped(customer, trip_items):
    saga = stuck_after(customer, trip_items, steps=2)
    assert saga_services.sagas_recover_stalled()["resumed"] == 0  # still within its budget

    backdate(saga)
    counts = saga_services.sagas_recover_stalled()

    assert counts["resumed"] == 1
    saga = wait_terminal(saga.id)
    assert saga.status == Saga.Status.COMPLETED
    assert done_steps(saga.id, phase=SagaLog.Phase.ACTION) == TRIP_STEPS
    assert stock(trip_items) == {"FL-TEST": (4, 0, 1), "HT-TEST": (4, 0, 1), "CR-TEST": (4, 0, 1)}


def test_a_saga_past_its_deadline_is_compensated(customer, trip_items):
    before_flight = stock(trip_items)["FL-TEST"]
    saga = stuck_after(customer, trip_items, steps=2)

    backdate(saga, deadline=timezone.now() - timedelta(seconds=1))
    counts = saga_services.sagas_recover_stalled()

    assert counts["deadline_compensated"] == 1
    saga = wait_terminal(saga.id)
    assert saga.status == Saga.Status.COMPENSATED
    assert saga.failure_reason.startswith("deadline passed")
    # The car step may have been in flight: undone too, and found nothing to undo.
    compensations = SagaLog.objects.filter(saga=saga, phase="compensation", status__in=SagaLog.DONE)
    assert list(compensations.values_list("step", "status")) == [
        ("release_car", "skipped"),
        ("release_hotel", "succeeded"),
        ("release_flight", "succeeded"),
    ]
    assert stock(trip_items)["FL-TEST"] == before_flight
    assert Booking.objects.get(saga_id=saga.id).status == Booking.Status.REJECTED


def test_a_stalled_compensation_is_queued_again(customer, trip_items):
    saga = stuck_after(customer, trip_items, steps=2)
    # Compensation was claimed, but its messages were lost.
    Saga.objects.filter(pk=saga.pk).update(status=Saga.Status.COMPENSATING, undo_cursor=2)
    backdate(saga)

    counts = saga_services.sagas_recover_stalled()

    assert counts["compensation_requeued"] == 1
    saga = wait_terminal(saga.id)
    assert saga.status == Saga.Status.COMPENSATED
    assert done_steps(saga.id, phase=SagaLog.Phase.COMPENSATION) == [
        "release_hotel",
        "release_flight",
    ]


def test_two_sweepers_at_once_act_on_a_stalled_saga_once(customer, trip_items):
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    saga = stuck_after(customer, trip_items, steps=1)
    backdate(saga)

    def sweep(_):
        try:
            return saga_services.sagas_recover_stalled()["resumed"]
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        resumed = sum(pool.map(sweep, range(2)))

    assert resumed == 1
    assert wait_terminal(saga.id).status == Saga.Status.COMPLETED


def test_the_api_accepts_a_booking_while_the_broker_is_down(
    customer, client_for, trip_items, settings
):
    body = {
        "customer": {"name": "Alice Example", "email": "alice@example.com"},
        "lines": [{"sku": "FL-TEST", "quantity": 1}],
        "payment": {"amount": "200.00", "currency": "EUR", "card_token": "tok_ok"},
    }
    refused = OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
    with mock.patch("kombu.messaging.Producer.publish", side_effect=refused) as publish:
        response = client_for(customer).post("/api/bookings/", body, format="json")

    assert publish.called
    assert response.status_code == 202
    saga = Saga.objects.get(pk=response.json()["saga_id"])
    assert saga.status == Saga.Status.PENDING  # persisted, not lost

    # The broker is back; the reconciler (beat) publishes what was not published.
    Saga.objects.filter(pk=saga.pk).update(
        created_at=timezone.now() - timedelta(seconds=settings.SAGA_DISPATCH_GRACE_S + 1)
    )
    assert saga_services.sagas_reconcile_pending() == 1
    assert wait_terminal(saga.id).status == Saga.Status.COMPLETED
