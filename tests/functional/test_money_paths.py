"""Four ordinary fault paths that used to lose a customer's money or take it twice.

Each runs on the real worker, Redis and database, and checks the money twice:
in our ledger and in the gateway's own books.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.utils import timezone

from bookings import services as booking_services
from bookings.models import Booking
from payments.errors import GatewayUnavailable
from payments.gateways.fake import FakeGateway
from sagas import services as saga_services
from sagas.canvas import COMPENSATION_FAILED
from sagas.models import Saga, SagaLog
from tests.functional.support import (
    SOLD,
    TOTAL,
    UNTOUCHED,
    book_trip,
    books,
    done_steps,
    ledger,
    stock,
    wait_terminal,
)

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


@pytest.fixture
def confirmed_booking(customer, trip_items):
    booking = book_trip(customer, trip_items)
    assert wait_terminal(booking.saga_id).status == Saga.Status.COMPLETED
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    return booking


class BrownoutGateway(FakeGateway):
    """Path 1 as it happens: the first capture's answer is lost, then the gateway answers 503."""

    seen: set[str] = set()

    def charge(self, *, idempotency_key: str, **kwargs):
        if idempotency_key in self.seen:
            raise GatewayUnavailable("Gateway unavailable (503); nothing was charged.")
        self.seen.add(idempotency_key)
        kwargs["card_token"] = "tok_timeout"
        return super().charge(idempotency_key=idempotency_key, **kwargs)


def test_a_capture_whose_answer_was_lost_is_refunded_even_if_later_attempts_got_503(
    customer, trip_items, settings
):
    settings.PAYMENTS_GATEWAY = f"{__name__}.BrownoutGateway"
    booking = book_trip(customer, trip_items)

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    attempts = SagaLog.objects.filter(saga=saga, step="charge_payment").order_by("attempt")
    assert [row.attempt for row in attempts] == [1, 2, 3, 4, 5]
    assert "refund_payment" in done_steps(saga.id, phase=SagaLog.Phase.COMPENSATION)
    booking.refresh_from_db()
    assert booking.status == Booking.Status.REJECTED
    assert ledger(booking) == {"charged": TOTAL, "refunded": TOTAL, "net": Decimal(0)}
    assert books(booking) == {"captured": TOTAL, "refunded": TOTAL, "net": Decimal(0)}
    assert stock(trip_items) == UNTOUCHED


def test_a_cancellation_compensated_before_its_refund_ran_charges_nothing_again(
    confirmed_booking, trip_items
):
    # The refund's message is lost (or the payments workers are away) ...
    with mock.patch("sagas.services.transaction.on_commit"):
        booking = booking_services.booking_cancel(booking_id=confirmed_booking.id)
    # ... until the deadline passes and the sweeper compensates the cancellation.
    Saga.objects.filter(pk=booking.cancel_saga_id).update(
        status=Saga.Status.RUNNING, deadline=timezone.now() - timedelta(seconds=1)
    )
    assert saga_services.sagas_recover_stalled()["deadline_compensated"] == 1

    saga = wait_terminal(booking.cancel_saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert ledger(booking) == {"charged": TOTAL, "refunded": Decimal(0), "net": TOTAL}
    assert books(booking)["net"] == TOTAL
    assert stock(trip_items) == SOLD


def test_a_second_cancellation_refunds_the_first_cancellations_recharge(
    confirmed_booking, trip_items
):
    first = booking_services.booking_cancel(
        booking_id=confirmed_booking.id, chaos={"fail": ["release_car"]}
    )
    assert wait_terminal(first.cancel_saga_id).status == Saga.Status.COMPENSATED
    first.refresh_from_db()
    assert first.status == Booking.Status.CONFIRMED
    assert ledger(first)["net"] == TOTAL

    second = booking_services.booking_cancel(booking_id=confirmed_booking.id)
    saga = wait_terminal(second.cancel_saga_id)

    assert saga.status == Saga.Status.COMPLETED
    second.refresh_from_db()
    assert second.status == Booking.Status.CANCELLED
    assert ledger(second)["net"] == 0
    assert books(second)["net"] == 0
    assert stock(trip_items) == UNTOUCHED


@pytest.mark.parametrize(
    ("start", "chaos", "after_retry", "net", "stock_after"),
    [
        (
            "trip",
            {"fail": ["confirm_booking"], "compensation_fail": ["release_hotel"]},
            Booking.Status.REJECTED,
            Decimal(0),
            UNTOUCHED,
        ),
        (
            "cancellation",
            {"fail": ["release_hotel"], "compensation_fail": ["reinstate_car"]},
            Booking.Status.CONFIRMED,
            TOTAL,
            SOLD,
        ),
    ],
)
def test_an_operator_retry_that_succeeds_leaves_the_booking_where_compensation_would(
    customer, trip_items, operator, start, chaos, after_retry, net, stock_after
):
    if start == "trip":
        booking = book_trip(customer, trip_items, chaos=chaos)
        saga_id = booking.saga_id
    else:
        booking = book_trip(customer, trip_items)
        assert wait_terminal(booking.saga_id).status == Saga.Status.COMPLETED
        booking = booking_services.booking_cancel(booking_id=booking.id, chaos=chaos)
        saga_id = booking.cancel_saga_id
    assert wait_terminal(saga_id).status == Saga.Status.FAILED
    booking.refresh_from_db()
    assert booking.status == Booking.Status.NEEDS_ATTENTION

    saga_services.saga_retry_compensation(saga_id=saga_id, operator=operator.username)
    saga = wait_terminal(saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    booking.refresh_from_db()
    assert booking.status == after_retry
    assert ledger(booking)["net"] == net
    assert books(booking)["net"] == net
    assert stock(trip_items) == stock_after


def test_a_late_failure_report_from_an_earlier_round_changes_nothing(
    customer, trip_items, operator
):
    from config.celery_app import app

    booking = book_trip(
        customer,
        trip_items,
        chaos={"fail": ["confirm_booking"], "compensation_fail": ["release_hotel"]},
    )
    assert wait_terminal(booking.saga_id).status == Saga.Status.FAILED
    # The operator retries; the new round's messages are not delivered yet ...
    with mock.patch("sagas.services.transaction.on_commit"):
        saga_services.saga_retry_compensation(saga_id=booking.saga_id, operator=operator.username)
    assert Saga.objects.get(pk=booking.saga_id).status == Saga.Status.COMPENSATING
    # ... when a copy of the first round's failure report arrives.
    late = app.signature(
        COMPENSATION_FAILED,
        args=("late-copy",),
        kwargs={"saga_id": str(booking.saga_id), "round": 1},
    ).apply_async()

    assert late.get(timeout=15) is False
    assert Saga.objects.get(pk=booking.saga_id).status == Saga.Status.COMPENSATING


def test_a_cancellation_whose_refunds_fail_halfway_pays_back_what_it_did_refund(
    confirmed_booking, trip_items
):
    from payments.models import Charge

    # A second charge of the booking that the gateway will not refund (it does
    # not know it): the refund step refunds the trip's charge, then fails for good.
    Charge.objects.create(
        idempotency_key=f"unknown:{confirmed_booking.id}",
        reference=f"booking:{confirmed_booking.id}",
        amount=Decimal("10.00"),
        currency="EUR",
        gateway_charge_id="ch_unknown_to_the_gateway",
    )
    booking = booking_services.booking_cancel(booking_id=confirmed_booking.id)

    saga = wait_terminal(booking.cancel_saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    assert "UnknownGatewayCharge" in saga.failure_reason
    # The step had called out before it failed: it is undone, so the refund it
    # did make is charged again and the customer has paid the trip once.
    assert done_steps(saga.id, phase=SagaLog.Phase.COMPENSATION) == ["recharge_payment"]
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert books(booking)["net"] == TOTAL
    assert stock(trip_items) == SOLD
