import multiprocessing
import os

import pytest

from sagas.faults import CRASH_EXIT_STATUS, validate_plan

ACTIONS = ["reserve_car", "charge_payment"]
UNDO = ["release_car"]


def test_a_valid_plan_is_returned_unchanged():
    plan = {
        "fail": ["charge_payment"],
        "transient": {"reserve_car": 2},
        "compensation_fail": ["release_car"],
        "delay_ms": {"reserve_car": 200},
    }

    assert validate_plan(plan, actions=ACTIONS, compensations=UNDO) is plan


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ([], "chaos must be an object"),
        ({"explode": []}, r"unknown chaos keys \['explode'\]"),
        ({"fail": "reserve_car"}, "chaos.fail must be a list of step names"),
        ({"fail": ["reserve_boat"]}, r"chaos.fail names unknown steps \['reserve_boat'\]"),
        ({"compensation_fail": ["reserve_car"]}, "chaos.compensation_fail names unknown steps"),
        ({"transient": {"reserve_car": -1}}, "whole numbers >= 0"),
        ({"delay_ms": {"reserve_car": "200"}}, "whole numbers >= 0"),
    ],
)
def test_a_bad_plan_is_refused_with_a_message_naming_the_problem(plan, message):
    with pytest.raises(ValueError, match=message):
        validate_plan(plan, actions=ACTIONS, compensations=UNDO)


# --- crash ---------------------------------------------------------------------------

CRASH_PLAN = {"crash": ["reserve_car", "release_car"]}


def _run_fault(fault: str, step: str, first_delivery: bool) -> None:
    """In a child process: a saga whose plan crashes ``step``; exits 0 if it survived."""
    from types import SimpleNamespace

    from sagas import faults

    saga = SimpleNamespace(context={"chaos": CRASH_PLAN})
    getattr(faults, fault)(saga, step, 1, first_delivery=first_delivery)
    os._exit(0)


@pytest.mark.parametrize(
    ("fault", "step", "first_delivery", "status"),
    [
        ("before_action", "reserve_car", True, CRASH_EXIT_STATUS),
        ("before_action", "reserve_car", False, 0),
        ("before_action", "charge_payment", True, 0),
        ("before_compensation", "release_car", True, CRASH_EXIT_STATUS),
        ("before_compensation", "release_car", False, 0),
    ],
)
def test_a_planned_crash_ends_the_process_on_the_first_delivery_only(
    fault, step, first_delivery, status
):
    process = multiprocessing.get_context("fork").Process(
        target=_run_fault, args=(fault, step, first_delivery)
    )
    process.start()
    process.join(30)

    assert process.exitcode == status


def test_a_crash_is_a_first_delivery_by_default_so_older_callers_still_crash():
    process = multiprocessing.get_context("fork").Process(
        target=_call_without_keyword, args=("reserve_car",)
    )
    process.start()
    process.join(30)

    assert process.exitcode == CRASH_EXIT_STATUS


def _call_without_keyword(step: str) -> None:
    from types import SimpleNamespace

    from sagas import faults

    faults.before_action(SimpleNamespace(context={"chaos": CRASH_PLAN}), step, 1)
    os._exit(0)
