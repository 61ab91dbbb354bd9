"""The trip's and the cancellation's steps: what they do, and what they ask the database.

The statement counts are pinned: a step that grows a savepoint, or reads again
a row it already holds, fails here. The counts are the domain's statements
only (``sagas.bench.sqlcount`` classifies them); the step wrapper's
bookkeeping is the saga engine's to count.
"""

from __future__ import annotations

from unittest import mock

import pytest
from django.db import transaction

from bookings import services
from bookings.models import Booking
from bookings.saga_steps import booking_cancellation, trip_booking
from inventory.models import Hold, Item
from payments import selectors as payment_selectors
from sagas.bench.sqlcount import DOMAIN, TRANSACTION, count_sql, counting, is_savepoint
from sagas.harness.plugin import harness_for
from sagas.models import Saga
from tests.functional.support import book_trip

pytestmark = pytest.mark.usefixtures("redis_url")

# Domain statements per step of the trip, on the path every saga takes.
TRIP_ACTIONS = {
    # INSERT ... ON CONFLICT DO NOTHING RETURNING the hold, UPDATE its item.
    "reserve_flight": 2,
    "reserve_hotel": 2,
    "reserve_car": 2,
    # SELECT the charge by key (none yet), INSERT the charge and its ledger entry.
    "charge_payment": 3,
    # UPDATE the three holds, UPDATE each of their items, UPDATE the booking.
    "confirm_booking": 5,
}
TRIP_COMPENSATIONS = {
    # SELECT the charge with its refund under the key, INSERT refund and ledger
    # entry, UPDATE the charge's refunded total.
    "refund_payment": 4,
    # UPDATE the hold, UPDATE its item.
    "release_car": 2,
    "release_hotel": 2,
    "release_flight": 2,
}


@pytest.fixture
def redis_url(settings):
    if not settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set: the fake gateway keeps its state in Redis")
    return settings.REDIS_URL


def domain(counter) -> list[str]:
    return [" ".join(sql.split()) for kind, sql in counter.statements if kind == DOMAIN]


def unpublished(customer, trip_items) -> Booking:
    """A trip booked through ``booking_create``, its saga left PENDING and published nowhere."""
    with mock.patch("sagas.services.transaction.on_commit"):
        return book_trip(customer, trip_items)


@pytest.mark.django_db(transaction=True)
def test_the_trip_steps_issue_a_pinned_number_of_domain_statements_and_no_savepoint():
    harness = harness_for("trip_booking", purpose="bench", run_id="steps")
    harness.prepare(sagas=10)

    counted = count_sql(harness)

    rows = {(row["phase"], row["step"]): row for row in counted["steps"]}
    assert {step: rows["action", step][DOMAIN] for step in TRIP_ACTIONS} == TRIP_ACTIONS, [
        rows["action", step]["statements"] for step in TRIP_ACTIONS
    ]
    assert {
        step: rows["compensation", step][DOMAIN] for step in TRIP_COMPENSATIONS
    } == TRIP_COMPENSATIONS, [
        rows["compensation", step]["statements"] for step in TRIP_COMPENSATIONS
    ]
    # The bare chain does the same domain work, statement for statement.
    assert {step: rows["bare", step][DOMAIN] for step in TRIP_ACTIONS} == TRIP_ACTIONS
    for row in counted["steps"]:
        for line in row["statements"]:
            kind, _, sql = line.partition(": ")
            assert not (kind == DOMAIN and is_savepoint(sql)), (row["step"], line)
    # Issue 11's targets: actions 4 or fewer on average, compensations 3.
    assert counted["action"][DOMAIN] <= 3.5
    assert counted["compensation"][DOMAIN] <= 2.5


@pytest.mark.django_db(transaction=True)
def test_the_cancellation_steps_read_no_booking_line_and_hold_no_savepoint(customer, trip_items):
    booking = unpublished(customer, trip_items)
    trip = Saga.objects.get(pk=booking.saga_id)
    for step in trip_booking.steps:
        if step.external:
            step.action(trip)
        else:
            with transaction.atomic():
                step.action(trip)
    with mock.patch("sagas.services.transaction.on_commit"):
        booking = services.booking_cancel(booking_id=booking.id)
    cancellation = Saga.objects.get(pk=booking.cancel_saga_id)
    counts = {}

    for step in booking_cancellation.steps:
        with counting() as counter:
            if step.external:
                step.action(cancellation)
            else:
                with transaction.atomic():
                    step.action(cancellation)
        counts[step.name] = domain(counter)

    assert {name: len(sql) for name, sql in counts.items()} == {
        # SELECT the booking's charges (each with its refund under this saga's
        # key), then the refund's INSERT, INSERT and UPDATE.
        "refund_payment": 4,
        # UPDATE the (sold) hold, UPDATE its item.
        "release_car": 2,
        "release_hotel": 2,
        "release_flight": 2,
        "mark_cancelled": 1,
    }, counts
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CANCELLED
    assert set(Hold.objects.values_list("status", flat=True)) == {Hold.Status.RELEASED}
    assert payment_selectors.money_totals(references=[f"booking:{booking.id}"])["net"] == 0

    undo = {}
    for step in reversed(booking_cancellation.steps[1:4]):
        with transaction.atomic(), counting() as counter:
            step.compensation(cancellation)
        undo[step.undo_name] = domain(counter)

    # UPDATE the hold back to CONFIRMED, UPDATE its item.
    assert {name: len(sql) for name, sql in undo.items()} == {
        "reinstate_flight": 2,
        "reinstate_hotel": 2,
        "reinstate_car": 2,
    }, undo
    assert set(Hold.objects.values_list("status", flat=True)) == {Hold.Status.CONFIRMED}
    assert {(item.available, item.held, item.sold) for item in Item.objects.all()} == {(4, 0, 1)}


@pytest.mark.django_db
def test_a_saga_started_before_its_context_carried_the_lines_reads_them_from_the_booking(
    customer, trip_items
):
    booking = unpublished(customer, trip_items)
    saga = Saga.objects.get(pk=booking.saga_id)
    # The context as booking_create wrote it before the trip plan was added.
    saga.context = {"booking_id": str(booking.id), "card_token": "tok_ok"}
    counts = {}

    for step in trip_booking.steps:
        with transaction.atomic(), counting() as counter:
            step.action(saga)
        counts[step.name] = [sql for kind, sql in counter.statements if kind != TRANSACTION]

    # One more read per step than with the plan: the lines, or the booking.
    assert len(counts["reserve_flight"]) == TRIP_ACTIONS["reserve_flight"] + 1
    assert len(counts["confirm_booking"]) == TRIP_ACTIONS["confirm_booking"] + 1
    assert counts["charge_payment"][0].startswith('SELECT "bookings_booking"')
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert set(Hold.objects.values_list("status", flat=True)) == {Hold.Status.CONFIRMED}
    charge = payment_selectors.charges_for_reference(reference=f"booking:{booking.id}")
    assert [(info.amount, info.currency) for info in charge] == [(booking.total, "EUR")]


@pytest.mark.django_db
def test_the_trip_plan_names_each_lines_hold_and_the_total_to_charge(customer, trip_items):
    booking = unpublished(customer, trip_items)
    saga = Saga.objects.get(pk=booking.saga_id)

    lines = list(booking.lines.order_by("id"))

    assert saga.context["total"] == "360.00"
    assert saga.context["currency"] == "EUR"
    assert saga.context["lines"] == [
        {"kind": line.kind, "sku": line.sku, "quantity": 1, "hold": line.hold_reference}
        for line in lines
    ]
