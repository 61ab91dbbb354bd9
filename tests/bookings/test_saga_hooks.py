"""How a saga's end meets the booking: hooks that refuse, calls that may still land."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from bookings import services
from bookings.models import Booking
from bookings.saga_steps import booking_cancellation
from sagas import services as saga_services
from sagas.models import Saga, SagaLog
from tests.functional.support import book_trip

pytestmark = pytest.mark.django_db


def compensating(booking, saga_id, *, booking_status: str) -> Saga:
    """The saga with every compensation done, about to finish; the booking as given."""
    Booking.objects.filter(pk=booking.pk).update(status=booking_status)
    Saga.objects.filter(pk=saga_id).update(status=Saga.Status.COMPENSATING, undo_cursor=0, round=1)
    return Saga.objects.get(pk=saga_id)


def test_a_hook_that_finds_the_booking_in_an_unexpected_state_fails_the_saga_loudly(
    customer, trip_items, caplog
):
    booking = book_trip(customer, trip_items)
    # Compensated, but the booking says CONFIRMED: something else moved it.
    saga = compensating(booking, booking.saga_id, booking_status=Booking.Status.CONFIRMED)

    assert saga_services.saga_finish_compensation(saga_id=saga.id) is True

    saga.refresh_from_db()
    assert saga.status == Saga.Status.FAILED
    assert saga.failure_reason == (
        f"compensated, but reject_booking refused: BookingStateConflict: booking {booking.id} "
        "is CONFIRMED; only PENDING or NEEDS_ATTENTION can become REJECTED"
    )
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED  # the hook changed nothing
    assert "hook reject_booking failed" in caplog.text


def test_a_cancellation_does_not_finish_while_its_refund_call_may_still_land(customer, trip_items):
    booking = book_trip(customer, trip_items)
    Booking.objects.filter(pk=booking.pk).update(status=Booking.Status.CONFIRMED)
    booking = services.booking_cancel(booking_id=booking.id)
    refund_step = booking_cancellation.steps[0]
    saga = compensating(booking, booking.cancel_saga_id, booking_status=Booking.Status.CANCELLING)
    now = timezone.now()
    # A copy of the refund went out to the gateway and has not come back.
    marker = SagaLog.objects.create(
        saga=saga,
        step="refund_payment",
        step_index=0,
        phase=SagaLog.Phase.ACTION,
        status=SagaLog.Status.STARTED,
        may_have_effect=True,
        started_at=now,
        finished_at=now,
    )

    assert saga_services.saga_finish_compensation(saga_id=saga.id) is False
    saga.refresh_from_db()
    assert saga.status == Saga.Status.COMPENSATING
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CANCELLING  # not cancellable again meanwhile

    # Still out just inside its hard limit plus the horizon: not yet.
    horizon = settings.SAGA_CALL_HORIZON_S
    SagaLog.objects.filter(pk=marker.pk).update(
        started_at=now - timedelta(seconds=refund_step.hard_limit_s + horizon - 5)
    )
    assert saga_services.saga_finish_compensation(saga_id=saga.id) is False
    # Past its hard limit plus the horizon (a frozen copy's too), it cannot land any more.
    long_ago = now - timedelta(seconds=refund_step.hard_limit_s + horizon + 1)
    SagaLog.objects.filter(pk=marker.pk).update(started_at=long_ago)
    assert saga_services.saga_finish_compensation(saga_id=saga.id) is True
    saga.refresh_from_db()
    booking.refresh_from_db()
    assert (saga.status, booking.status) == (Saga.Status.COMPENSATED, Booking.Status.CONFIRMED)
