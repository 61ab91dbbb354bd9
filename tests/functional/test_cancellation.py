"""The cancellation saga: refunds and releases a confirmed trip, or leaves it whole."""

from decimal import Decimal

import pytest

from bookings import services as booking_services
from bookings.errors import BookingNotCancellable
from bookings.models import Booking
from inventory import selectors as inventory_selectors
from payments import selectors as payment_selectors
from sagas.models import Saga, SagaLog
from tests.functional.support import book_trip, done_steps, log_rows, stock, wait_terminal

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

CANCEL_STEPS = [
    "refund_payment",
    "release_car",
    "release_hotel",
    "release_flight",
    "mark_cancelled",
]


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


@pytest.fixture
def confirmed_booking(customer, trip_items):
    booking = book_trip(customer, trip_items)
    assert wait_terminal(booking.saga_id).status == Saga.Status.COMPLETED
    booking.refresh_from_db()
    return booking


def test_cancelling_a_confirmed_booking_refunds_and_releases_everything(
    confirmed_booking, trip_items
):
    booking = booking_services.booking_cancel(booking_id=confirmed_booking.id)
    assert booking.status == Booking.Status.CANCELLING

    saga = wait_terminal(booking.cancel_saga_id)

    assert saga.status == Saga.Status.COMPLETED
    assert saga.saga_type == "booking_cancellation"
    assert done_steps(saga.id, phase=SagaLog.Phase.ACTION) == CANCEL_STEPS
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CANCELLED
    assert stock(trip_items) == {"FL-TEST": (5, 0, 0), "HT-TEST": (5, 0, 0), "CR-TEST": (5, 0, 0)}
    references = [line.hold_reference for line in booking.lines.all()]
    holds = inventory_selectors.holds_by_reference(references=references)
    assert {hold.status for hold in holds.values()} == {"RELEASED"}
    totals = payment_selectors.money_totals(references=[f"booking:{booking.id}"])
    assert totals == {
        "charged": Decimal("360.00"),
        "refunded": Decimal("360.00"),
        "net": Decimal("0"),
    }


def test_a_cancellation_that_fails_midway_leaves_the_booking_confirmed_and_paid(
    confirmed_booking, trip_items
):
    before = stock(trip_items)
    booking = booking_services.booking_cancel(
        booking_id=confirmed_booking.id, chaos={"fail": ["release_flight"]}
    )

    saga = wait_terminal(booking.cancel_saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    assert done_steps(saga.id, phase=SagaLog.Phase.COMPENSATION) == [
        "reinstate_hotel",
        "reinstate_car",
        "recharge_payment",
    ]
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert stock(trip_items) == before
    totals = payment_selectors.money_totals(references=[f"booking:{booking.id}"])
    assert totals["net"] == booking.total
    assert log_rows(saga.id, phase=SagaLog.Phase.ACTION)[-1] == ("release_flight", "failed")


def test_only_a_confirmed_booking_can_be_cancelled(customer, trip_items):
    booking = book_trip(customer, trip_items, chaos={"fail": ["reserve_car"]})
    wait_terminal(booking.saga_id)

    with pytest.raises(
        BookingNotCancellable,
        match="only a confirmed booking can be cancelled; this one is REJECTED",
    ):
        booking_services.booking_cancel(booking_id=booking.id)
