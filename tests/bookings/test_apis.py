import json
from decimal import Decimal

import pytest

from bookings.models import Booking
from sagas.models import Saga
from tests.functional.support import trip_body

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice(customer, client_for, trip_items):
    return client_for(customer)


def test_booking_a_trip_answers_202_with_the_booking_and_the_saga_location(alice, customer):
    response = alice.post("/api/bookings/", trip_body(), format="json")

    assert response.status_code == 202
    body = response.json()
    booking = Booking.objects.get(pk=body["id"])
    saga = Saga.objects.get(pk=body["saga_id"])
    assert response["Location"] == f"/api/sagas/{saga.id}/" == body["saga_url"]
    assert body["status"] == "PENDING"
    assert body["total"] == "360.00"
    assert body["customer"] == {"name": "Alice Example", "email": "alice@example.com"}
    assert [line["sku"] for line in body["lines"]] == ["FL-TEST", "HT-TEST", "CR-TEST"]
    assert booking.user == customer
    assert saga.owner == customer
    assert saga.business_key == f"booking:{booking.id}"


@pytest.mark.parametrize(
    ("change", "field", "code", "message"),
    [
        (
            {"lines": [{"sku": "NOPE-1", "quantity": 1}]},
            "lines.0.sku",
            "unknown_sku",
            "unknown SKU(s): NOPE-1",
        ),
        (
            {"lines": [{"sku": "FL-TEST", "quantity": 0}]},
            "lines.0.quantity",
            "invalid",
            "greater than or equal to 1",
        ),
        ({"lines": []}, "lines", "invalid", "may not be empty"),
        (
            {"payment": {"amount": "359.99", "currency": "EUR", "card_token": "tok_ok"}},
            "payment.amount",
            "payment_mismatch",
            "does not match the lines' total 360.00 EUR",
        ),
        (
            {"payment": {"amount": 360, "currency": "EUR", "card_token": "tok_ok"}},
            "payment.amount",
            "invalid",
            "decimal string",
        ),
        (
            {"payment": {"amount": "360.00", "currency": "JPY", "card_token": "tok_ok"}},
            "payment.currency",
            "invalid",
            '"JPY" is not a valid choice',
        ),
        ({"customer": {"name": "A"}}, "customer.email", "invalid", "This field is required"),
        (
            {"chaos": {"fail": ["reserve_boat"]}},
            "chaos",
            "invalid_booking",
            "unknown steps ['reserve_boat']",
        ),
    ],
)
def test_an_invalid_booking_is_refused_with_a_message_for_the_field(
    alice, change, field, code, message
):
    response = alice.post("/api/bookings/", trip_body(**change), format="json")

    assert response.status_code == 400
    body = response.json()
    assert body["code"] == code
    assert message in " ".join(body["errors"][field])
    assert Booking.objects.count() == 0
    assert Saga.objects.count() == 0


def test_malformed_json_is_a_400_that_says_so(alice):
    response = alice.post("/api/bookings/", "{not json", content_type="application/json")

    assert response.status_code == 400
    assert response.json()["code"] == "parse_error"
    assert "JSON parse error" in response.json()["detail"]


def test_the_same_idempotency_key_and_body_returns_the_first_response_without_a_second_booking(
    alice,
):
    first = alice.post("/api/bookings/", trip_body(), format="json", HTTP_IDEMPOTENCY_KEY="trip-1")
    again = alice.post("/api/bookings/", trip_body(), format="json", HTTP_IDEMPOTENCY_KEY="trip-1")

    assert first.status_code == again.status_code == 202
    assert again.json() == first.json()
    assert again["Location"] == first["Location"]
    assert again["Idempotent-Replayed"] == "true"
    assert Booking.objects.count() == 1
    assert Saga.objects.count() == 1


def test_the_same_idempotency_key_with_another_body_is_a_422_naming_the_conflict(alice):
    first = alice.post("/api/bookings/", trip_body(), format="json", HTTP_IDEMPOTENCY_KEY="trip-1")
    other = trip_body(customer={"name": "Someone Else", "email": "else@example.com"})

    response = alice.post("/api/bookings/", other, format="json", HTTP_IDEMPOTENCY_KEY="trip-1")

    assert response.status_code == 422
    body = response.json()
    assert body["code"] == "idempotency_key_reused"
    assert f"already used for booking {first.json()['id']}" in body["detail"]
    assert Booking.objects.count() == 1


def test_idempotency_keys_belong_to_their_user(alice, other_customer, client_for):
    alice.post("/api/bookings/", trip_body(), format="json", HTTP_IDEMPOTENCY_KEY="trip-1")

    response = client_for(other_customer).post(
        "/api/bookings/", trip_body(), format="json", HTTP_IDEMPOTENCY_KEY="trip-1"
    )

    assert response.status_code == 202
    assert Booking.objects.count() == 2


def test_an_overlong_idempotency_key_is_refused(alice):
    response = alice.post(
        "/api/bookings/", trip_body(), format="json", HTTP_IDEMPOTENCY_KEY="k" * 256
    )

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["errors"]


def test_a_chaos_plan_is_accepted_when_chaos_is_enabled(alice):
    plan = {"fail": ["charge_payment"], "compensation_fail": ["release_hotel"]}

    response = alice.post("/api/bookings/", trip_body(chaos=plan), format="json")

    assert response.status_code == 202
    assert Saga.objects.get(pk=response.json()["saga_id"]).context["chaos"] == plan


def test_the_chaos_shortcut_fails_the_named_step(alice):
    response = alice.post("/api/bookings/?chaos=car", trip_body(), format="json")

    assert response.status_code == 202
    assert Saga.objects.get(pk=response.json()["saga_id"]).context["chaos"] == {
        "fail": ["reserve_car"]
    }


def test_an_unknown_chaos_shortcut_is_refused(alice):
    response = alice.post("/api/bookings/?chaos=boat", trip_body(), format="json")

    assert response.status_code == 400
    assert "unknown chaos shortcut 'boat'" in response.json()["errors"]["chaos"][0]


@pytest.mark.parametrize("path", ["/api/bookings/", "/api/bookings/?chaos=car"])
def test_chaos_is_forbidden_to_customers_when_chaos_is_disabled(alice, settings, path):
    settings.SAGA_CHAOS_ENABLED = False
    body = trip_body(chaos={"fail": ["reserve_car"]}) if "?" not in path else trip_body()

    response = alice.post(path, body, format="json")

    assert response.status_code == 403
    assert "SAGA_CHAOS_ENABLED" in response.json()["detail"]
    assert Booking.objects.count() == 0


def test_staff_may_send_chaos_when_chaos_is_disabled(operator, client_for, trip_items, settings):
    settings.SAGA_CHAOS_ENABLED = False

    response = client_for(operator).post("/api/bookings/?chaos=payment", trip_body(), format="json")

    assert response.status_code == 202


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/bookings/"),
        ("post", "/api/bookings/"),
        ("get", "/api/bookings/00000000-0000-0000-0000-000000000000/"),
        ("post", "/api/bookings/00000000-0000-0000-0000-000000000000/cancel/"),
    ],
)
def test_anonymous_requests_get_401(client_for, method, path):
    response = getattr(client_for(), method)(path, {}, format="json")

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Token"


def test_customers_list_only_their_own_bookings_and_staff_list_all(
    alice, other_customer, operator, client_for
):
    mine = alice.post("/api/bookings/", trip_body(), format="json").json()
    theirs = client_for(other_customer).post("/api/bookings/", trip_body(), format="json").json()

    listed = alice.get("/api/bookings/").json()
    everything = client_for(operator).get("/api/bookings/?page_size=1").json()

    assert [booking["id"] for booking in listed["results"]] == [mine["id"]]
    assert listed["count"] == 1
    assert everything["count"] == 2
    assert len(everything["results"]) == 1
    assert everything["results"][0]["id"] == theirs["id"]  # newest first
    assert everything["next"] is not None


def test_another_users_booking_is_a_404(alice, other_customer, client_for, operator):
    theirs = client_for(other_customer).post("/api/bookings/", trip_body(), format="json").json()

    assert alice.get(f"/api/bookings/{theirs['id']}/").status_code == 404
    assert alice.post(f"/api/bookings/{theirs['id']}/cancel/").status_code == 404
    assert client_for(operator).get(f"/api/bookings/{theirs['id']}/").status_code == 200


def test_a_booking_is_shown_to_its_owner(alice):
    created = alice.post("/api/bookings/", trip_body(), format="json").json()

    response = alice.get(f"/api/bookings/{created['id']}/")

    assert response.status_code == 200
    assert response.json() == created


def test_cancelling_a_booking_that_is_not_confirmed_is_a_409(alice):
    created = alice.post("/api/bookings/", trip_body(), format="json").json()

    response = alice.post(f"/api/bookings/{created['id']}/cancel/")

    assert response.status_code == 409
    assert response.json()["code"] == "booking_not_cancellable"
    assert "this one is PENDING" in response.json()["detail"]


def test_cancelling_a_confirmed_booking_starts_the_cancellation_saga(alice):
    created = alice.post("/api/bookings/", trip_body(), format="json").json()
    Booking.objects.filter(pk=created["id"]).update(status=Booking.Status.CONFIRMED)

    response = alice.post(f"/api/bookings/{created['id']}/cancel/")

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "CANCELLING"
    saga = Saga.objects.get(pk=body["cancel_saga_id"])
    assert saga.saga_type == "booking_cancellation"
    assert response["Location"] == f"/api/sagas/{saga.id}/"
    assert saga.context["charge_key"] == f"saga:{created['saga_id']}:charge_payment"


def test_an_unknown_booking_is_a_404(alice):
    response = alice.get("/api/bookings/00000000-0000-0000-0000-000000000000/")

    assert response.status_code == 404
    assert response.json()["code"] == "booking_not_found"


def test_money_in_responses_is_a_decimal_string(alice):
    body = alice.post("/api/bookings/", trip_body(), format="json").json()

    assert Decimal(body["total"]) == Decimal("360.00")
    assert json.dumps(body["lines"][0]["unit_price"]) == '"200.00"'
