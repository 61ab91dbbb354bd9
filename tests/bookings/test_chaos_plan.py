"""The chaos run's building blocks without workers: plans, option checks and invariant checks."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from bookings.chaos.invariants import check_run, compensation_order_problem
from bookings.chaos.plan import ChaosConfigError, ChaosOptions, draw_plans
from bookings.models import Booking, BookingLine
from bookings.saga_steps import trip_booking
from inventory import services as inventory
from payments.models import Charge, LedgerEntry, Refund
from sagas.faults import validate_plan
from sagas.models import Saga, SagaLog

ACTIONS = trip_booking.action_names
UNDO = {step.name: step.undo_name for step in trip_booking.steps}


def plans(seed=1, **options):
    return draw_plans(
        ChaosOptions(**{"sagas": 2000, **options}), seed=seed, actions=ACTIONS, compensations=UNDO
    )


# --- plans ---------------------------------------------------------------------


def test_the_same_seed_draws_the_same_plans_and_another_seed_others():
    options = {"fail_rate": 0.1, "transient_rate": 0.1, "duplicate_rate": 0.2}

    assert plans(7, **options) == plans(7, **options)
    assert plans(7, **options) != plans(8, **options)


def test_without_rates_no_saga_gets_a_fault():
    drawn = plans()

    assert all(plan.chaos == {} and plan.duplicate_step is None for plan in drawn)


def test_rates_give_the_expected_share_of_faults():
    drawn = plans(
        3,
        fail_rate=0.07,
        transient_rate=0.1,
        compensation_fail_rate=0.2,
        duplicate_rate=0.2,
    )

    failing = sum(1 for plan in drawn if plan.fails_at) / len(drawn)
    duplicated = sum(1 for plan in drawn if plan.duplicate_step is not None) / len(drawn)
    assert failing == pytest.approx(1 - 0.93**5, abs=0.04)  # 0.30
    # A saga failing at its first action passes nothing that could be delivered twice.
    assert duplicated == pytest.approx(0.2 * (1 - 0.07), abs=0.03)
    reachable = sum(ACTIONS.index(p.fails_at) if p.fails_at else 5 for p in drawn)
    transient = sum(plan.faults["transient"] for plan in drawn)
    assert transient / reachable == pytest.approx(0.1, abs=0.02)
    undoable = sum(ACTIONS.index(p.fails_at) for p in drawn if p.fails_at)
    undo_faults = sum(plan.faults["compensation_transient"] for plan in drawn)
    assert undo_faults / undoable == pytest.approx(0.2, abs=0.04)


def test_each_plan_is_valid_and_injects_only_faults_that_can_happen():
    for plan in plans(
        5, fail_rate=0.1, transient_rate=0.3, compensation_fail_rate=0.3, duplicate_rate=0.5
    ):
        validate_plan(plan.chaos, actions=ACTIONS, compensations=trip_booking.compensation_names)
        reach = ACTIONS.index(plan.fails_at) if plan.fails_at else len(ACTIONS)
        assert plan.chaos.get("fail", []) == ([plan.fails_at] if plan.fails_at else [])
        assert all(ACTIONS.index(step) < reach for step in plan.chaos.get("transient", {}))
        assert all(n in (1, 2) for n in plan.chaos.get("transient", {}).values())
        undone = {UNDO[step] for step in ACTIONS[:reach] if UNDO[step]}
        assert set(plan.chaos.get("compensation_transient", {})) <= undone
        if plan.duplicate_step is not None:
            # The copy's step was passed, and the saga is held at the next one (not the last).
            assert plan.duplicate_step < min(reach, len(ACTIONS) - 2)
            assert plan.chaos["delay_ms"] == {ACTIONS[plan.duplicate_step + 1]: 300}
        else:
            assert "delay_ms" not in plan.chaos


def test_fail_step_fails_every_saga_at_that_step_or_earlier():
    drawn = plans(fail_step="reserve_car", fail_rate=0.05)

    assert {plan.fails_at for plan in drawn} == {"reserve_flight", "reserve_hotel", "reserve_car"}
    assert sum(plan.fails_at == "reserve_car" for plan in drawn) > 0.8 * len(drawn)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sagas": 0}, "--sagas must be a whole number of at least 1, not 0"),
        ({"concurrency": -3}, "--concurrency must be a whole number of at least 1, not -3"),
        ({"fail_rate": 1.5}, "--fail-rate must be a probability between 0 and 1, not 1.5"),
        ({"transient_rate": -0.1}, "--transient-rate must be a probability between 0 and 1"),
        ({"compensation_fail_rate": 2}, "--compensation-fail-rate must be a probability"),
        ({"duplicate_rate": float("nan")}, "--duplicate-rate must be a probability"),
        ({"fail_step": "reserve_boat"}, "--fail-step 'reserve_boat' is not a step"),
        ({"topology": "split"}, "--topology split needs --workers"),
        ({"kill_workers": 1}, "--kill-workers needs --workers"),
        ({"workers": 2, "kill_workers": 101}, "--kill-workers must be at most 100, not 101"),
        ({"sagas": 3, "workers": 1, "kill_workers": 4}, "--kill-workers must be at most 3"),
        ({"restart_broker": True}, "--restart-broker needs --workers"),
        ({"workers": 17}, "--workers must be at most 16, not 17"),
        ({"timeout": 0}, "--timeout must be more than 0 seconds, not 0"),
        ({"capacity": 0}, "--capacity must be a whole number of at least 1, not 0"),
        ({"json_path": "/no/such/dir/report.json"}, "--json /no/such/dir/report.json: directory"),
    ],
)
def test_invalid_options_are_refused_naming_the_flag(options, message):
    with pytest.raises(ChaosConfigError) as raised:
        ChaosOptions(**options).validate(actions=ACTIONS)

    assert message in str(raised.value)


def test_valid_options_pass(tmp_path):
    ChaosOptions(
        sagas=10,
        workers=1,
        topology="split",
        kill_workers=2,
        restart_broker=True,
        fail_step="charge_payment",
        json_path=str(tmp_path / "report.json"),
    ).validate(actions=ACTIONS)


# --- the order of compensations --------------------------------------------------


@pytest.mark.parametrize(
    ("status", "steps_done", "compensations", "problem"),
    [
        ("COMPENSATED", 3, ["release_car", "release_hotel", "release_flight"], None),
        # The charge timed out: its outcome is unknown, so it is refunded first.
        (
            "COMPENSATED",
            3,
            ["refund_payment", "release_car", "release_hotel", "release_flight"],
            None,
        ),
        ("COMPENSATED", 3, ["release_hotel", "release_car", "release_flight"], "expected"),
        ("COMPENSATED", 3, ["release_car", "release_hotel"], "expected"),
        ("FAILED", 3, ["release_car"], None),
        ("FAILED", 3, ["release_hotel"], "prefix"),
        ("COMPLETED", 5, ["release_flight"], "COMPLETED but compensated"),
    ],
)
def test_compensations_must_reverse_the_actions(status, steps_done, compensations, problem):
    found = compensation_order_problem(
        definition=trip_booking,
        status=status,
        steps_done=steps_done,
        actions=ACTIONS[:steps_done],
        compensations=compensations,
    )

    assert (found is None) if problem is None else (problem in found)


def test_an_extra_compensation_is_allowed_only_for_a_step_without_a_succeeded_action():
    found = compensation_order_problem(
        definition=trip_booking,
        status="COMPENSATED",
        steps_done=2,
        actions=ACTIONS[:2],
        compensations=["release_car", "release_car", "release_hotel", "release_flight"],
    )

    assert "expected ['release_hotel', 'release_flight']" in found


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
        charge = Charge.objects.create(
            idempotency_key=key or f"unit:{uuid.uuid4().hex}",
            reference=f"booking:{booking.id}",
            amount=booking.total,
            currency="EUR",
            gateway_charge_id=uuid.uuid4().hex,
        )
        LedgerEntry.objects.create(
            entry_type="CHARGE",
            amount=charge.amount,
            currency="EUR",
            charge=charge,
            reference=charge.reference,
        )
        if refund:
            given = Refund.objects.create(
                charge=charge,
                idempotency_key=f"refund:{charge.idempotency_key}",
                amount=charge.amount,
                currency="EUR",
                gateway_refund_id=uuid.uuid4().hex,
            )
            LedgerEntry.objects.create(
                entry_type="REFUND",
                amount=-given.amount,
                currency="EUR",
                charge=charge,
                refund=given,
                reference=charge.reference,
            )
            Charge.objects.filter(pk=charge.pk).update(
                refunded_amount=charge.amount, status=Charge.Status.REFUNDED
            )

    def completed(self):
        saga, booking = self.saga(
            status="COMPLETED", steps_done=5, booking_status="CONFIRMED", actions=ACTIONS
        )
        for kind in self.items:
            self.hold(booking, kind, then="confirm")
        self.charge(booking)
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
        results = check_run(saga_ids=[saga.id for saga, _ in sagas], skus=self.skus)
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
        "all_terminal",
        "no_failed",
        "completed_consistent",
        "compensated_consistent",
        "inventory_balanced",
        "money_balanced",
        "one_success_per_step",
        "compensation_order",
    ]
    assert "net 360.00, confirmed bookings 360.00" in results["money_balanced"].note


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
        "completed_consistent": [str(saga.id)],
        "money_balanced": [str(saga.id)],
    }
    assert results["completed_consistent"].details[str(saga.id)] == "2 charges instead of one"


@pytest.mark.django_db
def test_a_compensated_saga_whose_charge_was_not_refunded_is_flagged(trips):
    saga, _ = trips.compensated_at_confirm(refund=False)

    results = trips.check((saga, None))

    assert failing(results) == {
        "compensated_consistent": [str(saga.id)],
        "money_balanced": [str(saga.id)],
    }
    assert "charges - refunds = 360.00" in results["compensated_consistent"].details[str(saga.id)]


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

    results = check_run(saga_ids=[running.id, failed.id], skus=[], undispatched=3)

    assert results[0].offenders == [str(running.id), "(not dispatched)"]
    assert results[0].details["(not dispatched)"] == "3 booking(s) never started: timed out"
    assert results[1].offenders == [str(failed.id)]
    assert results[-1].passed  # a FAILED saga's partial compensation is a prefix: in order


# --- worker processes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "inherited", "expected"),
    [
        (
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "test_app",
                "USER": "app",
                "PASSWORD": "p@ss/word",
                "HOST": "db",
                "PORT": 5432,
            },
            "postgres://app@db:5432/app",
            "postgres://app:p%40ss%2Fword@db:5432/test_app",
        ),
        (
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "app",
                "USER": "app",
                "HOST": "db",
                "PORT": 5432,
            },
            "postgres://app@db:5432/app?sslmode=require",
            "postgres://app@db:5432/app?sslmode=require",
        ),
        (
            {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app/test.sqlite3"},
            "",
            "sqlite:////srv/app/test.sqlite3",
        ),
    ],
)
def test_workers_get_the_database_this_process_uses(monkeypatch, database, inherited, expected):
    from bookings.worker_processes import database_url

    monkeypatch.setenv("DATABASE_URL", inherited)

    assert database_url(database) == expected
