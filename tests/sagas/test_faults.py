import pytest

from sagas.faults import validate_plan

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
