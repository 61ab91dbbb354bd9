"""The payment gateway misbehaving as real ones do, end to end.

Late captures, brown-outs, copies of the charge arriving late or twice, and a
publish that fails after the booking committed. Each runs on the real worker,
Redis and database, and checks the money in our ledger and in the gateway's
own books: the books must say what the saga's outcome says.
"""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from decimal import Decimal
from unittest import mock

import pytest
from django.db import DatabaseError, OperationalError, connection, connections, transaction
from django.utils import timezone

from bookings.models import Booking
from bookings.saga_steps import PAYMENT_RETRY, trip_booking
from bookings.services import charge_key
from inventory import services as inventory_services
from payments import selectors as payment_selectors
from payments.errors import ChargeVoided, GatewayUnavailable
from payments.gateways import get_gateway
from payments.gateways.fake import FakeGateway
from payments.models import Refund
from sagas import services as saga_services
from sagas.canvas import action_chain, action_signature
from sagas.models import Saga, SagaLog
from tests.conftest import wait_for
from tests.functional.support import (
    SOLD,
    TOTAL,
    TRIP_STEPS,
    UNTOUCHED,
    book_trip,
    books,
    done_steps,
    gateway_books,
    gateway_unrecorded,
    ledger,
    park_after,
    reference,
    stock,
    trip_body,
    wait_terminal,
)
from tests.sagas.support import StandInTask, act

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION
LogStatus = SagaLog.Status

BODY = trip_body()


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def attempts(saga_id, step: str, phase: str = ACTION) -> list[SagaLog]:
    return list(SagaLog.objects.filter(saga_id=saga_id, step=step, phase=phase).order_by("id"))


def assert_undone(booking, trip_items) -> None:
    """A compensated trip: rejected, the money back in both books, the stock untouched."""
    booking.refresh_from_db()
    assert booking.status == Booking.Status.REJECTED
    assert ledger(booking) == {"charged": TOTAL, "refunded": TOTAL, "net": Decimal(0)}
    assert books(booking) == {"captured": TOTAL, "refunded": TOTAL, "net": Decimal(0)}
    assert gateway_unrecorded(reference(booking)) == []
    assert stock(trip_items) == UNTOUCHED


# --- a. late capture --------------------------------------------------------------


def test_a_capture_that_lands_while_the_charge_is_still_retrying_completes_the_trip_once(
    customer, trip_items, settings
):
    # Lands well before the charge's retries run out (about 0.19 s of backoff at the least).
    settings.PAYMENTS_FAKE_LATE_CAPTURE_S = 0.1
    booking = book_trip(customer, trip_items, card_token="tok_late")

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPLETED
    charge = attempts(saga.id, "charge_payment")
    assert charge[0].status == LogStatus.RETRYING
    assert "GatewayTimeout" in charge[0].error
    assert charge[0].may_have_effect is True
    assert [row.status for row in charge[1:-1]] == [LogStatus.RETRYING] * (len(charge) - 2)
    assert charge[-1].status == LogStatus.SUCCEEDED
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert len(get_gateway().charges(reference=reference(booking))) == 1
    assert books(booking) == {"captured": TOTAL, "refunded": Decimal(0), "net": TOTAL}
    assert ledger(booking) == {"charged": TOTAL, "refunded": Decimal(0), "net": TOTAL}
    assert gateway_unrecorded(reference(booking)) == []
    assert stock(trip_items) == SOLD


def test_a_capture_landing_after_every_charge_attempt_timed_out_is_awaited_and_refunded(
    customer, trip_items, settings
):
    # The backoff scaled so that the capture lands after the charge gave up
    # (its four retries back off 1.5-3.0 s in all) but well before the refund
    # would (its first five retries alone back off 3.1 s or more): the refund
    # finds the capture still in progress, waits for it, and gives it back.
    settings.SAGA_RETRY_DELAY_SCALE = 0.4
    settings.PAYMENTS_FAKE_LATE_CAPTURE_S = 3.8
    booking = book_trip(customer, trip_items, card_token="tok_late")

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    charge = attempts(saga.id, "charge_payment")
    assert [(row.status, row.may_have_effect) for row in charge] == [
        *[(LogStatus.RETRYING, True)] * PAYMENT_RETRY.max_retries,
        (LogStatus.TIMED_OUT, True),
    ]
    refund = attempts(saga.id, "refund_payment", COMPENSATION)
    assert refund[0].status == LogStatus.RETRYING
    assert "GatewayChargePending" in refund[0].error
    assert refund[-1].status == LogStatus.SUCCEEDED
    assert refund[-1].result["amount"] == str(TOTAL)
    assert done_steps(saga.id, phase=COMPENSATION) == [
        "refund_payment",
        "release_car",
        "release_hotel",
        "release_flight",
    ]
    assert_undone(booking, trip_items)


def test_a_late_capture_that_succeeded_is_refunded_when_a_later_step_fails(
    customer, trip_items, settings
):
    settings.PAYMENTS_FAKE_LATE_CAPTURE_S = 0.1
    booking = book_trip(
        customer, trip_items, card_token="tok_late", chaos={"fail": ["confirm_booking"]}
    )

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    assert attempts(saga.id, "charge_payment")[-1].status == LogStatus.SUCCEEDED
    assert "refund_payment" in done_steps(saga.id, phase=COMPENSATION)
    assert_undone(booking, trip_items)


# --- b. brown-out ------------------------------------------------------------------


def test_a_brownout_after_a_lost_capture_rejects_the_trip_and_gives_the_money_back(
    customer, trip_items
):
    booking = book_trip(customer, trip_items, card_token="tok_brownout_4")

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    charge = attempts(saga.id, "charge_payment")
    assert [(row.attempt, row.status, row.may_have_effect) for row in charge] == [
        # Every attempt called the gateway out: any of them may have had an
        # effect (the first did), so even the 503s are not taken at their word.
        (1, LogStatus.RETRYING, True),
        (2, LogStatus.RETRYING, True),
        (3, LogStatus.RETRYING, True),
        (4, LogStatus.RETRYING, True),
        (5, LogStatus.TIMED_OUT, True),
    ]
    assert "GatewayUnavailable" in saga.failure_reason
    assert done_steps(saga.id, phase=COMPENSATION)[0] == "refund_payment"
    assert_undone(booking, trip_items)


# --- c. nothing held across the gateway ----------------------------------------------

_SAGA_IN_KEY = re.compile(r"saga:([0-9a-f-]{36}):")


class LockProbeGateway(FakeGateway):
    """Before each call that moves money, looks at what the calling worker holds in the database.

    From another connection it asks for the saga row with ``FOR UPDATE
    NOWAIT`` (refused at once if anyone holds it) and reads the caller's
    session in ``pg_stat_activity``: ``idle``, not ``idle in transaction``.
    """

    seen: list[dict] = []

    def charge(self, **kwargs):
        self._probe("charge", kwargs["idempotency_key"])
        return super().charge(**kwargs)

    def refund(self, **kwargs):
        self._probe("refund", kwargs["idempotency_key"])
        return super().refund(**kwargs)

    def void(self, **kwargs):
        self._probe("void", kwargs["idempotency_key"])
        return super().void(**kwargs)

    def _probe(self, call: str, key: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            [caller] = cursor.fetchone()
        observed = {"call": call, "in_atomic_block": connection.in_atomic_block}

        def look() -> None:
            try:
                with transaction.atomic():
                    saga_id = _SAGA_IN_KEY.search(key).group(1)
                    list(Saga.objects.select_for_update(nowait=True).filter(pk=saga_id))
                observed["saga_row"] = "free"
            except DatabaseError as exc:
                observed["saga_row"] = f"locked: {exc}"
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", [caller])
                    [observed["caller_state"]] = cursor.fetchone()
            finally:
                connections.close_all()

        prober = threading.Thread(target=look)
        prober.start()
        prober.join(timeout=10)
        type(self).seen.append(observed)


@pytest.mark.postgres
def test_no_transaction_or_saga_row_lock_is_held_while_the_gateway_works(
    customer, trip_items, settings
):
    if connection.vendor != "postgresql":
        pytest.skip("pg_stat_activity and NOWAIT locks are PostgreSQL's")
    settings.PAYMENTS_GATEWAY = f"{__name__}.LockProbeGateway"
    LockProbeGateway.seen = []
    # The charge succeeds and the confirmation fails: the refund calls the gateway too.
    booking = book_trip(customer, trip_items, chaos={"fail": ["confirm_booking"]})

    saga = wait_terminal(booking.saga_id)

    assert saga.status == Saga.Status.COMPENSATED
    free = {"in_atomic_block": False, "saga_row": "free", "caller_state": "idle"}
    assert LockProbeGateway.seen == [{"call": "charge", **free}, {"call": "refund", **free}]
    assert books(booking)["net"] == 0


# --- d. a publish that fails after commit ---------------------------------------------


def age_past_dispatch_grace(saga_id, settings) -> None:
    Saga.objects.filter(pk=saga_id).update(
        created_at=timezone.now() - timedelta(seconds=settings.SAGA_DISPATCH_GRACE_S + 1)
    )


def post_booking(client_for, customer):
    response = client_for(customer).post("/api/bookings/", BODY, format="json")
    assert response.status_code == 202, response.content
    assert response["Location"] == response.json()["saga_url"]
    return response.json()


@pytest.mark.parametrize(
    "fault",
    [
        # The broker refuses the chain.
        mock.patch("sagas.canvas.action_chain", side_effect=ConnectionError("broker down")),
        # Publishing itself raises: on_commit is robust, the request does not see it.
        mock.patch("sagas.services.saga_publish", side_effect=RuntimeError("publisher crashed")),
    ],
    ids=["broker-refuses", "publisher-raises"],
)
def test_a_booking_whose_publish_fails_is_accepted_and_the_reconciler_publishes_it(
    fault, customer, client_for, trip_items, settings
):
    with fault as failing:
        body = post_booking(client_for, customer)
    assert failing.called
    saga = Saga.objects.get(pk=body["saga_id"])
    assert (saga.status, saga.dispatched_at) == (Saga.Status.PENDING, None)
    # Too young for the reconciler: its own publish may still be on the way.
    assert saga_services.sagas_reconcile_pending() == 0

    age_past_dispatch_grace(saga.id, settings)
    assert saga_services.sagas_reconcile_pending() == 1

    assert wait_terminal(saga.id).status == Saga.Status.COMPLETED
    assert Booking.objects.get(pk=body["id"]).status == Booking.Status.CONFIRMED
    assert gateway_books(f"booking:{body['id']}")["net"] == TOTAL


def failing_running_update():
    # The RUNNING update's value is built first: failing there is the update failing.
    return mock.patch(
        "sagas.services.Coalesce", side_effect=OperationalError("server closed the connection")
    )


def test_a_booking_whose_running_update_fails_is_accepted_and_runs_all_the_same(
    customer, client_for, trip_items, settings
):
    with failing_running_update() as failing:
        body = post_booking(client_for, customer)
    assert failing.called

    saga = wait_terminal(body["saga_id"])

    assert saga.status == Saga.Status.COMPLETED
    assert saga.dispatched_at is None
    assert done_steps(saga.id, phase=ACTION) == TRIP_STEPS
    age_past_dispatch_grace(saga.id, settings)
    assert saga_services.sagas_reconcile_pending() == 0
    assert gateway_books(f"booking:{body['id']}")["net"] == TOTAL


def test_a_chain_published_before_the_running_update_failed_and_the_reconcilers_both_run_once(
    customer, client_for, trip_items, settings
):
    # The first publish reaches the broker but is delivered only later (held
    # here); the RUNNING update fails, so the saga looks never published.
    held = mock.MagicMock()
    with failing_running_update(), mock.patch("sagas.canvas.action_chain", return_value=held):
        body = post_booking(client_for, customer)
    held.apply_async.assert_called_once_with()
    saga_id = body["saga_id"]
    assert Saga.objects.get(pk=saga_id).status == Saga.Status.PENDING

    age_past_dispatch_grace(saga_id, settings)
    assert saga_services.sagas_reconcile_pending() == 1
    action_chain(trip_booking, saga_id).apply_async()  # the first publish, delivered now

    saga = wait_terminal(saga_id)
    assert saga.status == Saga.Status.COMPLETED
    assert done_steps(saga_id, phase=ACTION) == TRIP_STEPS
    assert len(get_gateway().charges(reference=f"booking:{body['id']}")) == 1
    assert gateway_books(f"booking:{body['id']}")["net"] == TOTAL
    assert payment_selectors.money_totals(references=[f"booking:{body['id']}"])["net"] == TOTAL


def test_an_operator_retry_whose_publish_fails_is_accepted_and_the_sweeper_publishes_it(
    customer, operator, client_for, trip_items
):
    booking = book_trip(
        customer,
        trip_items,
        chaos={"fail": ["confirm_booking"], "compensation_fail": ["release_hotel"]},
    )
    assert wait_terminal(booking.saga_id).status == Saga.Status.FAILED
    staff = client_for(operator)

    with mock.patch(
        "sagas.canvas.compensation_chain", side_effect=ConnectionError("broker down")
    ) as failing:
        response = staff.post(f"/api/sagas/{booking.saga_id}/retry-compensation/")

    assert failing.called
    assert response.status_code == 202, response.content
    saga = Saga.objects.get(pk=booking.saga_id)
    assert (saga.status, saga.round) == (Saga.Status.COMPENSATING, 2)
    # Nothing was published: once the compensation's whole budget has passed
    # without progress, the sweeper publishes it.
    Saga.objects.filter(pk=saga.id).update(updated_at=timezone.now() - timedelta(hours=1))
    assert saga_services.sagas_recover_stalled()["compensation_requeued"] == 1
    assert wait_terminal(saga.id).status == Saga.Status.COMPENSATED
    assert_undone(booking, trip_items)


# --- e. late and duplicate copies of the charge ------------------------------------------


class CountingGateway(FakeGateway):
    """The fake gateway, counting every call made to it by method and key."""

    calls: list[tuple[str, str]] = []

    def charge(self, **kwargs):
        type(self).calls.append(("charge", kwargs["idempotency_key"]))
        return super().charge(**kwargs)

    def void(self, **kwargs):
        type(self).calls.append(("void", kwargs["idempotency_key"]))
        return super().void(**kwargs)

    def refund(self, **kwargs):
        type(self).calls.append(("refund", kwargs["idempotency_key"]))
        return super().refund(**kwargs)


def deliver_charge_again(saga_id) -> SagaLog:
    """Publish one more copy of the saga's charge_payment and wait for its own log row."""
    index = trip_booking.index_of("charge_payment")
    copy = action_signature(trip_booking, index, str(saga_id)).apply_async()
    # Its row is first written STARTED (the call is out), then closed with the outcome.
    return wait_for(
        lambda: (
            SagaLog.objects.filter(saga_id=saga_id, task_id=copy.id)
            .exclude(status=LogStatus.STARTED)
            .first()
        ),
        message="the late copy of charge_payment to be logged",
    )


def test_a_second_delivery_of_the_charge_after_completion_calls_no_gateway_and_refunds_nothing(
    customer, trip_items, settings
):
    settings.PAYMENTS_GATEWAY = f"{__name__}.CountingGateway"
    CountingGateway.calls = []
    booking = book_trip(customer, trip_items)
    assert wait_terminal(booking.saga_id).status == Saga.Status.COMPLETED
    assert CountingGateway.calls == [("charge", charge_key(booking.saga_id))]

    copy = deliver_charge_again(booking.saga_id)

    assert copy.status == LogStatus.IGNORED
    assert copy.error == "saga is COMPLETED: action not run"
    assert CountingGateway.calls == [("charge", charge_key(booking.saga_id))]
    assert Refund.objects.count() == 0
    assert Saga.objects.get(pk=booking.saga_id).status == Saga.Status.COMPLETED
    booking.refresh_from_db()
    assert booking.status == Booking.Status.CONFIRMED
    assert books(booking) == {"captured": TOTAL, "refunded": Decimal(0), "net": TOTAL}


def test_a_late_copy_of_a_charge_that_failed_for_good_charges_nothing_and_voids_its_key(
    customer, trip_items
):
    booking = book_trip(customer, trip_items, chaos={"fail": ["charge_payment"]})
    saga = wait_terminal(booking.saga_id)
    assert saga.status == Saga.Status.COMPENSATED
    # A definite failure: compensation started below the charge.
    assert "refund_payment" not in done_steps(saga.id, phase=COMPENSATION)
    assert saga.undo_cursor == 0

    copy = deliver_charge_again(saga.id)

    assert copy.status == LogStatus.IGNORED
    assert copy.error == "saga is COMPENSATED: action not run"
    assert books(booking) == {"captured": Decimal(0), "refunded": Decimal(0), "net": Decimal(0)}
    assert ledger(booking)["charged"] == 0
    # The copy settled the key: no capture still on its way can ever land.
    with pytest.raises(ChargeVoided):
        get_gateway().charge(
            amount=TOTAL,
            currency="EUR",
            card_token="tok_ok",
            idempotency_key=charge_key(saga.id),
            reference=reference(booking),
        )


class RacingGateway(FakeGateway):
    """One copy's capture lands; before its answer is back, the saga is compensated past it.

    ``meanwhile`` runs once, right after that capture: it plays what other
    workers did in the meantime. Every other charge call is refused (503).
    """

    meanwhile = None
    problems: list[str] = []

    def charge(self, **kwargs):
        meanwhile, type(self).meanwhile = type(self).meanwhile, None
        if meanwhile is None:
            raise GatewayUnavailable("Gateway unavailable (503); nothing was charged.")
        captured = super().charge(**kwargs)
        try:
            meanwhile()
        except Exception as exc:  # reported by the test, not lost in the worker
            type(self).problems.append(repr(exc))
        return captured


def test_a_copy_in_flight_when_another_copy_fails_for_good_has_its_capture_refunded(
    customer, trip_items, settings
):
    settings.PAYMENTS_GATEWAY = f"{__name__}.RacingGateway"
    saga_id = park_after(customer, trip_items, 3)
    booking = Booking.objects.get(saga_id=saga_id)

    def another_copy_fails_for_good_and_compensation_begins():
        # A second copy of the step (a redelivery, say) takes its last retry and
        # gets a 503, and the errback starts the compensation. The first copy's
        # call is still out (its STARTED row says so), so the charge is undone too.
        last = StandInTask(retries=PAYMENT_RETRY.max_retries)
        try:
            act(trip_booking, Saga.objects.get(pk=saga_id), "charge_payment", last)
        except GatewayUnavailable:
            pass
        else:
            raise AssertionError("the other copy did not fail")
        assert saga_services.saga_action_failed(saga_id=saga_id, failed_task_id="other-copy")
        assert Saga.objects.get(pk=saga_id).undo_cursor == 4

    RacingGateway.meanwhile = another_copy_fails_for_good_and_compensation_begins
    RacingGateway.problems = []

    copy = deliver_charge_again(saga_id)
    saga = wait_terminal(saga_id)

    assert RacingGateway.problems == []
    assert copy.status == LogStatus.IGNORED
    assert copy.error == "saga is COMPENSATING: action not run"
    assert saga.status == Saga.Status.COMPENSATED
    assert sorted((row.status, row.attempt) for row in attempts(saga_id, "charge_payment")) == [
        (LogStatus.IGNORED, 1),
        (LogStatus.TIMED_OUT, PAYMENT_RETRY.max_retries + 1),
    ]
    # The compensation settled the capture with the gateway and refunded it.
    assert done_steps(saga_id, phase=COMPENSATION) == [
        "refund_payment",
        "release_car",
        "release_hotel",
        "release_flight",
    ]
    assert_undone(booking, trip_items)


def captured_by_a_lost_copy(customer, trip_items):
    """A saga at its charge whose capture only the gateway knows: its copy died after it."""
    saga_id = park_after(customer, trip_items, 3)
    booking = Booking.objects.get(saga_id=saga_id)
    get_gateway().charge(
        amount=TOTAL,
        currency="EUR",
        card_token="tok_ok",
        idempotency_key=charge_key(saga_id),
        reference=reference(booking),
    )
    return saga_id, booking


def test_a_late_copy_finding_its_saga_compensated_past_it_refunds_a_lost_capture(
    customer, trip_items
):
    # An earlier copy captured and died before any record of it reached us;
    # the saga was compensated without the charge (nothing on record said so).
    saga_id, booking = captured_by_a_lost_copy(customer, trip_items)
    Saga.objects.filter(pk=saga_id).update(status=Saga.Status.COMPENSATED, undo_cursor=0)
    for line in booking.lines.all():
        inventory_services.hold_release(reference=line.hold_reference)
    Booking.objects.filter(pk=booking.pk).update(status=Booking.Status.REJECTED)

    copy = deliver_charge_again(saga_id)

    # Its redelivery settles the key with the gateway and refunds what landed.
    assert copy.status == LogStatus.IGNORED
    assert copy.error.startswith("saga is COMPENSATED: action not run; its late effect was undone")
    assert_undone(booking, trip_items)


def test_a_late_copy_leaves_a_failed_sagas_undo_to_the_operators_retry(customer, trip_items):
    saga_id, booking = captured_by_a_lost_copy(customer, trip_items)
    # FAILED with the charge still to undo: the operator's retry will, in turn.
    Saga.objects.filter(pk=saga_id).update(status=Saga.Status.FAILED, undo_cursor=4)

    copy = deliver_charge_again(saga_id)

    assert copy.error == "saga is FAILED: action not run"
    assert books(booking)["net"] == TOTAL
