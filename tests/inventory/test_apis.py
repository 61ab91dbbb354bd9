import pytest

pytestmark = pytest.mark.django_db


def test_items_list_what_can_be_booked(customer, client_for, trip_items):
    response = client_for(customer).get("/api/inventory/items/")

    assert response.status_code == 200
    assert response.json()["results"] == [
        {
            "sku": "CR-TEST",
            "kind": "car",
            "name": "Test car",
            "price": "40.00",
            "currency": "EUR",
            "available": 5,
        },
        {
            "sku": "FL-TEST",
            "kind": "flight_seat",
            "name": "Test flight",
            "price": "200.00",
            "currency": "EUR",
            "available": 5,
        },
        {
            "sku": "HT-TEST",
            "kind": "hotel_room",
            "name": "Test hotel",
            "price": "120.00",
            "currency": "EUR",
            "available": 5,
        },
    ]


def test_items_filter_by_kind(customer, client_for, trip_items):
    response = client_for(customer).get("/api/inventory/items/", {"kind": "hotel_room"})

    assert [item["sku"] for item in response.json()["results"]] == ["HT-TEST"]


def test_an_unknown_kind_is_a_400(customer, client_for, trip_items):
    response = client_for(customer).get("/api/inventory/items/", {"kind": "boat"})

    assert response.status_code == 400
    assert "boat" in response.json()["errors"]["kind"][0]


def test_anonymous_requests_for_items_get_401(client_for):
    assert client_for().get("/api/inventory/items/").status_code == 401
