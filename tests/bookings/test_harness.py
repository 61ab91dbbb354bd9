"""The trip plug-in's invariants, and the engine's, over rows built as a chaos run leaves them."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from bookings.harness import TripHarness
from bookings.models import Booking, BookingLine
from bookings.saga_steps import trip_booking
from bookings.services import charge_key
from inventory import services as inventory
from payments import services as payments
from payments.gateways import get_gateway
from sagas.chaos.invariants import check_run
from sagas.models import Saga, SagaLog

ACTIONS = trip_booking.action_names


# --- invariant checks over hand-built rows -----------------------------------------


class Trips:
    """Builds sagas, bookings, holds, charges and log rows the way a run leaves them."""

    def __init__(self, user):
        self.user = user
        self.items = {
            kind: inventory.item_create(
                sku=f"UT-{kind}", kind=kind, name=kind, capacity=10, price=price, currency="EUR"
            )
            for kind, price in [
                ("flight_seat", Decimal("200.00")),
                ("hotel_room", Decimal("120.00")),
                ("car", Decimal("40.00")),
            ]
        }
        self.skus = [item.sku for item in self.items.values()]
        self.clock = timezone.now()

    def saga(self, *, status, steps_done, booking_status, actions=(), compensations=()):
        saga = Saga.objects.create(
            saga_type="trip_booking",
            business_key="-",
            status=status,
            steps_done=steps_done,
            context={},
        )
        booking = Booking.objects.create(
            user=self.user,
            customer_name="Unit",
            customer_email="unit@example.com",
            total=Decimal("360.00"),
            currency="EUR",
            saga_id=saga.id,
            status=booking_status,
        )
        Saga.objects.filter(pk=saga.pk).update(business_key=f"booking:{booking.id}")
        for item in self.items.values():
            BookingLine.objects.create(
                booking=booking,
                sku=item.sku,
                kind=item.kind,
                name=item.name,
                quantity=1,
                unit_price=item.price,
                currency="EUR",
            )
        for step in actions:
            self.log(saga, step, SagaLog.Phase.ACTION)
        for step in compensations:
            self.log(saga, step, SagaLog.Phase.COMPENSATION)
        return saga, booking

    def log(self, saga, step, phase, status=SagaLog.Status.SUCCEEDED):
        self.clock += timedelta(milliseconds=5)
        SagaLog.objects.create(
            saga=saga,
            step=step,
            step_index=0,
            phase=phase,
            status=status,
            started_at=self.clock,
            finished_at=self.clock,
        )

    def hold(self, booking, kind, *, then=None):
        line = booking.lines.get(kind=kind)
        inventory.hold_place(sku=line.sku, quantity=1, reference=line.hold_reference)
        if then == "confirm":
            inventory.hold_confirm(reference=line.hold_reference)
        elif then == "release":
            inventory.hold_release(reference=line.hold_reference)

    def charge(self, booking, *, key=None, refund=False):
        """Charge (and refund) through payments and the real fake gateway, as a run would."""
        key = key or f"unit:{uuid.uuid4().hex}"
        payments.charge_create(
            amount=booking.total,
            currency="EUR",
            card_token="tok_ok",
            idempotency_key=key,
            reference=f"booking:{booking.id}",
        )
        if refund:
            payments.charge_undo(idempotency_key=key)

    def completed(self):
        saga, booking = self.saga(
            status="COMPLETED", steps_done=5, booking_status="CONFIRMED", actions=ACTIONS
        )
        for kind in self.items:
            self.hold(booking, kind, then="confirm")
        self.charge(booking, key=charge_key(saga.id))
        return saga, booking

    def compensated_at_car(self, *, release_hotel=True, compensations=None):
        saga, booking = self.saga(
            status="COMPENSATED",
            steps_done=2,
            booking_status="REJECTED",
            actions=ACTIONS[:2],
            compensations=compensations or ["release_hotel", "release_flight"],
        )
        self.hold(booking, "flight_seat", then="release")
        self.hold(booking, "hotel_room", then="release" if release_hotel else None)
        return saga, booking

    def compensated_at_confirm(self, *, refund=True):
        undo = ["refund_payment", "release_car", "release_hotel", "release_flight"]
        saga, booking = self.saga(
            status="COMPENSATED",
            steps_done=4,
            booking_status="REJECTED",
            actions=ACTIONS[:4],
            compensations=undo,
        )
        for kind in self.items:
            self.hold(booking, kind, then="release")
        self.charge(booking, refund=refund)
        return saga, booking

    def check(self, *sagas):
        harness = TripHarness(trip_booking, purpose="chaos", run_id="unit")
        harness.skus = [self.skus]
        results = check_run(saga_ids=[saga.id for saga, _ in sagas], harness=harness)
        return {result.name: result for result in results}


@pytest.fixture
def trips(django_user_model):
    return Trips(django_user_model.objects.create_user(username="chaos-unit"))


def failing(results):
    return {name: result.offenders for name, result in results.items() if not result.passed}


@pytest.mark.django_db
def test_a_run_that_kept_every_invariant_passes(trips):
    results = trips.check(
        trips.completed(), trips.compensated_at_car(), trips.compensated_at_confirm()
    )

    assert failing(results) == {}
    assert list(results) == [
        # The engine's own invariants, then the trip plug-in's.
        "all_terminal",
        "no_failed",
        "one_success_per_step",
        "compensation_order",
        "completed_consistent",
        "compensated_consistent",
        "cancellations_consistent",
        "bookings_settled",
        "inventory_balanced",
        "money_balanced",
        "gateway_books_balanced",
        "gateway_captures_recorded",
    ]
    assert "net 360.00, confirmed bookings 360.00" in results["money_balanced"].note
    assert "net 360.00" in results["gateway_books_balanced"].note


@pytest.mark.django_db
def test_a_compensated_saga_with_a_live_hold_is_flagged(trips):
    saga, _ = trips.compensated_at_car(release_hotel=False)

    results = trips.check(trips.completed(), (saga, None))

    assert failing(results) == {
        "compensated_consistent": [str(saga.id)],
        "inventory_balanced": ["UT-hotel_room"],
    }
    assert "is still HELD" in results["compensated_consistent"].details[str(saga.id)]
    assert results["inventory_balanced"].details["UT-hotel_room"] == "1 unit(s) still held"


@pytest.mark.django_db
def test_a_completed_saga_charged_twice_is_flagged(trips):
    saga, booking = trips.completed()
    trips.charge(booking)

    results = trips.check((saga, booking))

    assert failing(results) == {
        "money_balanced": [str(saga.id)],
        "gateway_books_balanced": [str(saga.id)],
    }
    assert results["money_balanced"].details[str(saga.id)] == (
        f"booking {booking.id} CONFIRMED: charged 720.00, refunded 0.00, net 720.00, "
        "expected 360.00"
    )
    assert results["gateway_books_balanced"].details[str(saga.id)] == (
        f"booking {booking.id} CONFIRMED: gateway captured 720.00, refunded 0.00, "
        "net 720.00, expected 360.00"
    )


@pytest.mark.django_db
def test_a_compensated_saga_whose_charge_was_not_refunded_is_flagged(trips):
    saga, _ = trips.compensated_at_confirm(refund=False)

    results = trips.check((saga, None))

    assert failing(results) == {
        "compensated_consistent": [str(saga.id)],
        "money_balanced": [str(saga.id)],
        "gateway_books_balanced": [str(saga.id)],
    }
    assert "charges - refunds = 360.00" in results["compensated_consistent"].details[str(saga.id)]


@pytest.mark.django_db
def test_money_only_the_gateway_holds_is_flagged_with_the_booking_and_amounts(trips):
    # Path 1 as it used to end: our ledger shows nothing, the gateway kept the money.
    saga, booking = trips.compensated_at_car()
    key = f"saga:{saga.id}:charge_payment"
    get_gateway().charge(
        amount=booking.total,
        currency="EUR",
        card_token="tok_ok",
        idempotency_key=key,
        reference=f"booking:{booking.id}",
    )

    results = trips.check((saga, booking))

    assert failing(results) == {
        "gateway_books_balanced": [str(saga.id)],
        "gateway_captures_recorded": [str(saga.id)],
    }
    assert results["gateway_books_balanced"].details[str(saga.id)] == (
        f"booking {booking.id} REJECTED: gateway captured 360.00, refunded 0.00, "
        "net 360.00, expected 0.00"
    )
    assert results["gateway_captures_recorded"].details[str(saga.id)] == (
        f"booking {booking.id}: gateway capture {key} of 360.00 has no local record"
    )


@pytest.mark.django_db
def test_a_cancelled_booking_still_paid_and_a_booking_left_cancelling_are_flagged(trips):
    trip, booking = trips.completed()
    cancellation = Saga.objects.create(
        saga_type="booking_cancellation",
        business_key=f"booking:{booking.id}",
        status="COMPLETED",
        steps_done=5,
    )
    Booking.objects.filter(pk=booking.pk).update(status="CANCELLED")
    stuck_trip, stuck = trips.completed()
    Booking.objects.filter(pk=stuck.pk).update(status="CANCELLING")

    results = trips.check((trip, booking), (cancellation, None), (stuck_trip, stuck))

    failed = failing(results)
    assert failed["cancellations_consistent"] == [str(cancellation.id)]
    assert failed["bookings_settled"] == [str(stuck_trip.id)]
    assert results["bookings_settled"].details[str(stuck_trip.id)] == (
        f"booking {stuck.id} is CANCELLING"
    )
    details = results["cancellations_consistent"].details[str(cancellation.id)]
    assert f"booking {booking.id}: hold" in details
    assert "charges - refunds = 360.00" in details


@pytest.mark.django_db
def test_compensations_in_the_wrong_order_are_flagged(trips):
    saga, _ = trips.compensated_at_car(compensations=["release_flight", "release_hotel"])

    results = trips.check((saga, None))

    assert failing(results) == {"compensation_order": [str(saga.id)]}
    assert results["compensation_order"].details[str(saga.id)] == (
        "compensated ['release_flight', 'release_hotel'], "
        "expected ['release_hotel', 'release_flight']"
    )


@pytest.mark.django_db
def test_a_second_successful_row_for_one_step_is_flagged(trips):
    saga, booking = trips.completed()
    # The database refuses a second success row; drop its guard (inside this
    # test's transaction, which rolls back) to see that the check catches one.
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX sagalog_one_success_per_step_phase")
    trips.log(saga, "reserve_hotel", SagaLog.Phase.ACTION)

    results = trips.check((saga, booking))

    assert failing(results)["one_success_per_step"] == [str(saga.id)]
    assert results["one_success_per_step"].details[str(saga.id)] == (
        "2 successful actions of reserve_hotel"
    )


@pytest.mark.django_db
def test_open_and_failed_sagas_are_flagged(trips):
    running, _ = trips.saga(
        status="RUNNING", steps_done=1, booking_status="PENDING", actions=ACTIONS[:1]
    )
    failed, _ = trips.saga(
        status="FAILED",
        steps_done=2,
        booking_status="NEEDS_ATTENTION",
        actions=ACTIONS[:2],
        compensations=["release_hotel"],
    )

    results = check_run(saga_ids=[running.id, failed.id], undispatched=3)

    assert results[0].offenders == [str(running.id), "(not dispatched)"]
    assert results[0].details["(not dispatched)"] == "3 saga(s) never started: timed out"
    assert results[1].offenders == [str(failed.id)]
    assert results[-1].passed  # a FAILED saga's partial compensation is a prefix: in order
