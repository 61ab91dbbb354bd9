"""A client's view: book over HTTP, watch the saga, read the outcome."""

import pytest

from tests.conftest import wait_for
from tests.functional.support import trip_body

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

BODY = trip_body()


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def follow(client, location):
    def finished():
        saga = client.get(location).json()
        return saga if saga["status"] in {"COMPLETED", "COMPENSATED", "FAILED"} else None

    return wait_for(finished, message=f"{location} to finish")


def test_a_trip_booked_over_the_api_is_confirmed(customer, client_for, trip_items):
    client = client_for(customer)

    accepted = client.post("/api/bookings/", BODY, format="json")
    saga = follow(client, accepted["Location"])
    booking = client.get(f"/api/bookings/{accepted.json()['id']}/").json()

    assert accepted.status_code == 202
    assert saga["status"] == "COMPLETED"
    assert [row["step"] for row in saga["log"]] == [
        "reserve_flight",
        "reserve_hotel",
        "reserve_car",
        "charge_payment",
        "confirm_booking",
    ]
    assert booking["status"] == "CONFIRMED"
    items = client.get("/api/inventory/items/").json()["results"]
    assert {item["sku"]: item["available"] for item in items} == {
        "CR-TEST": 4,
        "FL-TEST": 4,
        "HT-TEST": 4,
    }


def test_the_chaos_shortcut_makes_the_car_fail_and_everything_is_undone(
    customer, client_for, trip_items
):
    client = client_for(customer)

    accepted = client.post("/api/bookings/?chaos=car", BODY, format="json")
    saga = follow(client, accepted["Location"])
    booking = client.get(f"/api/bookings/{accepted.json()['id']}/").json()

    assert saga["status"] == "COMPENSATED"
    assert [(row["step"], row["status"]) for row in saga["log"]] == [
        ("reserve_flight", "succeeded"),
        ("reserve_hotel", "succeeded"),
        ("reserve_car", "failed"),
        ("release_hotel", "succeeded"),
        ("release_flight", "succeeded"),
    ]
    assert booking["status"] == "REJECTED"


def test_a_confirmed_booking_is_cancelled_over_the_api(customer, client_for, trip_items):
    client = client_for(customer)
    accepted = client.post("/api/bookings/", BODY, format="json")
    follow(client, accepted["Location"])

    cancelled = client.post(f"/api/bookings/{accepted.json()['id']}/cancel/")
    saga = follow(client, cancelled["Location"])

    assert cancelled.status_code == 202
    assert saga["status"] == "COMPLETED"
    assert client.get(f"/api/bookings/{accepted.json()['id']}/").json()["status"] == "CANCELLED"
    stats = client.get("/api/sagas/stats/").json()
    assert stats["by_type"]["trip_booking"]["by_status"]["COMPLETED"] == 1
    assert stats["by_type"]["booking_cancellation"]["by_status"]["COMPLETED"] == 1
