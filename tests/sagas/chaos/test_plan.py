"""Chaos plans: seeded fault draws, option validation, and the compensation-order check."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bookings.saga_steps import trip_booking
from sagas.chaos.invariants import compensation_order_problem
from sagas.chaos.plan import Backends, ChaosConfigError, ChaosOptions, draw_plans
from sagas.faults import validate_plan

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
        ({"cancel_rate": 1.01}, "--cancel-rate must be a probability between 0 and 1, not 1.01"),
        ({"gateway_timeout_rate": -1}, "--gateway-timeout-rate must be a probability"),
        ({"gateway_late_rate": float("inf")}, "--gateway-late-rate must be a probability"),
        (
            {"gateway_timeout_rate": 0.6, "gateway_late_rate": 0.5},
            "--gateway-timeout-rate and --gateway-late-rate pick one card per saga: "
            "together at most 1, not 1.1",
        ),
        ({"gateway_brownout": -2}, "--gateway-brownout must be seconds between 0 and 600, not -2"),
        ({"gateway_brownout": 601}, "--gateway-brownout must be seconds between 0 and 600"),
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


def test_no_fault_flag_means_the_default_mix_and_a_zero_flag_means_none():
    assert ChaosOptions().with_faults().default_faults is True
    assert ChaosOptions().with_faults().fail_rate == 0.05
    given_zero = ChaosOptions(faults_given=True).with_faults()
    assert (given_zero.fail_rate, given_zero.default_faults) == (0.0, False)
    assert ChaosOptions(no_faults=True).with_faults().fail_rate == 0.0
    with pytest.raises(ChaosConfigError, match="--no-faults contradicts --duplicate-rate"):
        ChaosOptions(no_faults=True, duplicate_rate=0.1).with_faults()


def test_with_operator_retry_compensation_faults_are_for_good():
    undo = {"reserve_flight": "release_flight", "reserve_hotel": "release_hotel"}
    options = ChaosOptions(sagas=200, fail_rate=0.3, compensation_fail_rate=1.0)

    healing = draw_plans(options, seed=3, actions=ACTIONS, compensations=undo)
    for_good = draw_plans(
        replace(options, operator_retry=True), seed=3, actions=ACTIONS, compensations=undo
    )

    assert any("compensation_transient" in plan.chaos for plan in healing)
    assert not any("compensation_fail" in plan.chaos for plan in healing)
    assert not any("compensation_transient" in plan.chaos for plan in for_good)
    # The same sagas get the fault, only its kind changes.
    assert [sorted(p.chaos.get("compensation_transient", {})) for p in healing] == [
        p.chaos.get("compensation_fail", []) for p in for_good
    ]


# --- infrastructure faults and crashes ---------------------------------------------

POSTGRES = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "127.0.0.1"}
SQLITE = {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app.sqlite3"}
REDIS = "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"crash_rate": 1.2, "workers": 1}, "--crash-rate must be a probability between 0 and 1"),
        ({"crash_rate": 0.1}, "--crash-rate needs --workers"),
        ({"kill_worker_host": 1}, "--kill-worker-host needs --workers"),
        ({"workers": 1, "kill_worker_host": 0.5}, "--kill-worker-host must be a whole number"),
        ({"workers": 1, "kill_worker_host": -1}, "--kill-worker-host must be a whole number"),
        ({"workers": 1, "kill_worker_host": 101}, "--kill-worker-host must be at most 100"),
        ({"sagas": 2, "workers": 1, "kill_worker_host": 3}, "--kill-worker-host must be at most 2"),
        ({"freeze_worker": 5}, "--freeze-worker needs --workers 2 or more"),
        ({"workers": 1, "freeze_worker": 5}, "--freeze-worker needs --workers 2 or more"),
        ({"workers": 2, "freeze_worker": -1}, "--freeze-worker must be seconds between 0 and 3600"),
        ({"workers": 2, "freeze_worker": float("inf")}, "--freeze-worker must be seconds"),
        ({"workers": 2, "freeze_worker": 3601}, "--freeze-worker must be seconds"),
        ({"drop_db_connections": True}, "--drop-db-connections needs --workers"),
    ],
)
def test_invalid_infrastructure_faults_are_refused_naming_the_flag(options, message):
    with pytest.raises(ChaosConfigError) as raised:
        ChaosOptions(**options).validate(actions=ACTIONS)

    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("options", "database", "broker_url", "message"),
    [
        (
            {"flush_broker": True},
            POSTGRES,
            "amqp://guest@rabbit:5672//",
            "--flush-broker empties a Redis database (FLUSHDB); the broker is amqp://, not Redis",
        ),
        ({"flush_broker": True}, POSTGRES, "", "the broker is not set://, not Redis"),
        (
            {"workers": 1, "drop_db_connections": True},
            SQLITE,
            REDIS,
            "--drop-db-connections ends the workers' PostgreSQL sessions (pg_terminate_backend); "
            "the database is sqlite3, not PostgreSQL",
        ),
        (
            {"restart_database": True},
            SQLITE,
            REDIS,
            "--restart-database restarts a PostgreSQL server; the database is sqlite3",
        ),
    ],
)
def test_faults_the_backends_cannot_take_are_refused(options, database, broker_url, message):
    backends = Backends(database=database, broker_url=broker_url)

    with pytest.raises(ChaosConfigError) as raised:
        ChaosOptions(**options).validate(actions=ACTIONS, backends=backends)

    assert message in str(raised.value)


@pytest.mark.parametrize(
    "broker_url",
    ["redis://127.0.0.1:6379/3", "rediss://:pw@cache:6380/0", "redis+socket:///run/redis.sock"],
)
def test_infrastructure_faults_pass_on_postgresql_and_redis(broker_url):
    ChaosOptions(
        workers=2,
        crash_rate=0.1,
        kill_worker_host=2,
        freeze_worker=5,
        flush_broker=True,
        restart_database=True,
        drop_db_connections=True,
    ).validate(actions=ACTIONS, backends=Backends(database=POSTGRES, broker_url=broker_url))


def test_crash_draws_leave_every_other_fault_where_it_was():
    options = {"fail_rate": 0.1, "transient_rate": 0.1, "duplicate_rate": 0.2}

    without = plans(11, **options)
    with_crashes = plans(11, **options, crash_rate=0.2)

    assert with_crashes == plans(11, **options, crash_rate=0.2)  # same seed, same crashes
    assert any("crash" in plan.chaos for plan in with_crashes)
    stripped = [{k: v for k, v in p.chaos.items() if k != "crash"} for p in with_crashes]
    assert stripped == [plan.chaos for plan in without]
    assert [p.duplicate_step for p in with_crashes] == [p.duplicate_step for p in without]


def test_crashes_hit_only_steps_that_are_delivered_and_compensations_that_run():
    drawn = plans(5, fail_rate=0.15, crash_rate=0.3)

    crashes = sum(plan.faults["crash"] for plan in drawn)
    assert crashes == sum(len(plan.chaos.get("crash", [])) for plan in drawn) > 0
    for plan in drawn:
        validate_plan(plan.chaos, actions=ACTIONS, compensations=trip_booking.compensation_names)
        reach = ACTIONS.index(plan.fails_at) if plan.fails_at else len(ACTIONS)
        delivered = set(ACTIONS[: reach + 1])
        undone = {UNDO[step] for step in ACTIONS[:reach] if UNDO[step]} if plan.fails_at else set()
        assert set(plan.chaos.get("crash", [])) <= delivered | undone
    # Per action that is delivered, about the rate.
    delivered = sum(
        min(len(ACTIONS), ACTIONS.index(p.fails_at) + 1 if p.fails_at else 5) for p in drawn
    )
    action_crashes = sum(
        len([name for name in plan.chaos.get("crash", []) if name in ACTIONS]) for plan in drawn
    )
    assert action_crashes / delivered == pytest.approx(0.3, abs=0.03)


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"crash": "reserve_car"}, "chaos.crash must be a list of step names"),
        ({"crash": ["reserve_boat"]}, r"chaos.crash names unknown steps \['reserve_boat'\]"),
    ],
)
def test_a_bad_crash_plan_is_refused(plan, message):
    with pytest.raises(ValueError, match=message):
        validate_plan(plan, actions=ACTIONS, compensations=trip_booking.compensation_names)


def test_a_crash_plan_may_name_actions_and_compensations():
    plan = {"crash": ["reserve_car", "release_hotel"]}

    assert (
        validate_plan(plan, actions=ACTIONS, compensations=trip_booking.compensation_names) is plan
    )
