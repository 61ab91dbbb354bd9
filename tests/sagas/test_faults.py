import subprocess
import sys

import pytest
from django.conf import settings

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


# Run in a fresh interpreter: a fork of the test process (which runs a worker
# thread) can inherit a lock that some thread held, and hang.
CHILD = """
import os, sys, types, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.test")
django.setup()
from sagas import faults
saga = types.SimpleNamespace(context={"chaos": {"crash": ["reserve_car", "release_car"]}})
fault, step, first = sys.argv[1], sys.argv[2], sys.argv[3]
if first == "default":
    getattr(faults, fault)(saga, step, 1)
else:
    getattr(faults, fault)(saga, step, 1, first_delivery=first == "first")
sys.exit(0)
"""


def _run_fault(fault: str, step: str, first_delivery: str) -> int:
    """The exit status of a process whose saga's plan crashes ``step`` (0: it survived)."""
    done = subprocess.run(  # noqa: S603 - this interpreter, our own code
        [sys.executable, "-c", CHILD, fault, step, first_delivery],
        cwd=settings.BASE_DIR,
        timeout=60,
        check=False,
    )
    return done.returncode


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
    assert _run_fault(fault, step, "first" if first_delivery else "again") == status


def test_a_crash_is_a_first_delivery_by_default_so_older_callers_still_crash():
    assert _run_fault("before_action", "reserve_car", "default") == CRASH_EXIT_STATUS


@pytest.mark.parametrize("hook", ["before_action", "before_compensation"])
def test_a_planned_delay_holds_the_step_or_compensation_it_names(hook, monkeypatch):
    from sagas import faults
    from sagas.models import Saga

    slept = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    saga = Saga(context={"chaos": {"delay_ms": {"release_hotel": 1500}}})

    getattr(faults, hook)(saga, "release_hotel", 1)
    getattr(faults, hook)(saga, "release_car", 1)

    assert slept == [1.5]
