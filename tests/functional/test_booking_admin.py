"""The booking's admin page, after a real saga: its graph, why it ended, its holds and money."""

from __future__ import annotations

import pytest

from sagas.models import Saga
from tests.functional.support import book_trip, wait_terminal

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def test_a_booking_page_shows_its_saga_why_it_ended_and_its_holds_charges_and_refunds(
    admin_client, customer, trip_items
):
    booking = book_trip(customer, trip_items, chaos={"fail": ["confirm_booking"]})
    saga = wait_terminal(booking.saga_id)
    assert saga.status == Saga.Status.COMPENSATED

    response = admin_client.get(f"/admin/bookings/booking/{booking.pk}/change/")

    assert response.status_code == 200
    context = response.context
    assert context["graph"]["failing_action"] == "confirm_booking"
    assert [step["compensation"]["state"] for step in context["graph"]["steps"][:4]] == [
        "undone",
        "undone",
        "undone",
        "undone",
    ]
    assert context["graph_follow"] is False
    assert context["booking_why"].startswith("confirm_booking could not be completed")
    assert sorted(hold.status for hold in context["holds"]) == ["RELEASED"] * 3
    [charge] = context["charges"]
    [refund] = context["refunds"]
    assert refund.charge_key == charge.idempotency_key
    assert refund.amount == charge.amount == charge.refunded_amount
    assert 'id="saga-timeline"' in response.text
    assert f'data-feed-url="/api/sagas/{saga.pk}/"' in response.text
    assert charge.gateway_charge_id in response.text
