"""Fixtures of the engine's service-level tests: the trip saga and a booking of it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from bookings.models import Booking
from bookings.services import LineRequest, PaymentRequest, booking_create
from sagas.definitions import SagaDefinition, registry
from sagas.models import Saga


@pytest.fixture
def trip() -> SagaDefinition:
    return registry.get("trip_booking")


@pytest.fixture
def make_booking(customer, trip_items):
    """Book flight seats, a hotel room and a car; the booking's trip saga is PENDING."""

    def make(chaos: dict[str, Any] | None = None, *, flight_seats: int = 1) -> tuple[Booking, Saga]:
        total = Decimal("200.00") * flight_seats + Decimal("160.00")
        booking = booking_create(
            user=customer,
            customer_name="Alice Example",
            customer_email="alice@example.com",
            lines=[
                LineRequest(sku="FL-TEST", quantity=flight_seats),
                LineRequest(sku="HT-TEST", quantity=1),
                LineRequest(sku="CR-TEST", quantity=1),
            ],
            payment=PaymentRequest(amount=total, currency="EUR", card_token="tok_ok"),
            chaos=chaos,
        )
        return booking, Saga.objects.get(pk=booking.saga_id)

    return make
