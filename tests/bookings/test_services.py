from decimal import Decimal

import pytest

from bookings import services
from bookings.errors import InvalidBooking, PaymentMismatch, UnknownSku
from bookings.models import Booking, BookingLine
from sagas.models import Saga

pytestmark = pytest.mark.django_db


def line(sku, quantity=1):
    return services.LineRequest(sku=sku, quantity=quantity)


def pay(amount, currency="EUR", token="tok_ok"):
    return services.PaymentRequest(amount=Decimal(amount), currency=currency, card_token=token)


def create(user, lines, payment, **kwargs):
    return services.booking_create(
        user=user,
        customer_name="Alice Example",
        customer_email="alice@example.com",
        lines=lines,
        payment=payment,
        **kwargs,
    )


def test_a_booking_is_written_with_its_lines_and_a_pending_trip_saga(customer, trip_items):
    booking = create(customer, [line("FL-TEST", 2), line("HT-TEST")], pay("520.00"))

    booking.refresh_from_db()
    assert booking.status == Booking.Status.PENDING
    assert booking.total == Decimal("520.00")
    assert [(item.sku, item.kind, item.quantity) for item in booking.lines.all()] == [
        ("FL-TEST", "flight_seat", 2),
        ("HT-TEST", "hotel_room", 1),
    ]
    saga = Saga.objects.get(pk=booking.saga_id)
    assert saga.saga_type == "trip_booking"
    assert saga.status == Saga.Status.PENDING
    assert saga.business_key == f"booking:{booking.id}"
    flight, hotel = booking.lines.all()
    # What the steps need of the booking travels in the saga's context.
    assert saga.context == {
        "booking_id": str(booking.id),
        "card_token": "tok_ok",
        "total": "520.00",
        "currency": "EUR",
        "lines": [
            {"kind": "flight_seat", "sku": "FL-TEST", "quantity": 2, "hold": flight.hold_reference},
            {"kind": "hotel_room", "sku": "HT-TEST", "quantity": 1, "hold": hotel.hold_reference},
        ],
    }
    assert saga.deadline > saga.created_at


def test_an_unknown_sku_is_refused_and_nothing_is_written(customer, trip_items):
    with pytest.raises(UnknownSku, match="unknown SKU\\(s\\): NOPE-1"):
        create(customer, [line("FL-TEST"), line("NOPE-1")], pay("200.00"))

    assert Booking.objects.count() == 0
    assert Saga.objects.count() == 0


def test_a_payment_that_does_not_match_the_lines_total_is_refused(customer, trip_items):
    with pytest.raises(PaymentMismatch, match=r"does not match the lines' total 200\.00 EUR"):
        create(customer, [line("FL-TEST")], pay("199.99"))


def test_a_payment_in_another_currency_is_refused(customer, trip_items):
    with pytest.raises(PaymentMismatch, match="payment currency USD does not match"):
        create(customer, [line("FL-TEST")], pay("200.00", currency="USD"))


@pytest.mark.parametrize(
    ("lines", "message"),
    [([], "at least one line"), ([("FL-TEST", 0)], "quantity must be at least 1")],
)
def test_a_booking_without_valid_lines_is_refused(customer, trip_items, lines, message):
    with pytest.raises(InvalidBooking, match=message):
        create(customer, [line(sku, qty) for sku, qty in lines], pay("200.00"))


def test_a_chaos_plan_naming_an_unknown_step_is_refused(customer, trip_items):
    with pytest.raises(InvalidBooking, match=r"chaos\.fail names unknown steps \['reserve_boat'\]"):
        create(customer, [line("FL-TEST")], pay("200.00"), chaos={"fail": ["reserve_boat"]})


def test_bookings_purge_deletes_the_bookings_with_their_lines_only(customer, trip_items):
    doomed = create(customer, [line("FL-TEST"), line("HT-TEST")], pay("320.00"))
    kept = create(customer, [line("CR-TEST")], pay("40.00"))

    assert services.bookings_purge(booking_ids=[doomed.id]) == 1

    assert list(Booking.objects.values_list("id", flat=True)) == [kept.id]
    assert BookingLine.objects.filter(booking_id=doomed.id).count() == 0
    assert BookingLine.objects.filter(booking=kept).count() == 1
