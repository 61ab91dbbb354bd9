"""The chain builder: signatures by task name, saga id explicit, errbacks on every step."""

import pytest

from sagas.canvas import action_chain, compensation_chain
from sagas.definitions import SagaDefinition, Step, registry
from sagas.errors import StepTaskMissing


def test_compensations_are_queued_newest_first_then_the_finish():
    trip = registry.get("trip_booking")

    undo = compensation_chain(trip, "00000000-0000-0000-0000-000000000001", 4)
    assert [sig.task for sig in undo.tasks] == [
        "trip_booking.refund_payment",
        "trip_booking.release_car",
        "trip_booking.release_hotel",
        "trip_booking.release_flight",
        "sagas.finish_compensation",
    ]


def test_every_step_signature_is_immutable_carries_the_saga_id_and_an_errback():
    trip = registry.get("trip_booking")
    saga_id = "00000000-0000-0000-0000-000000000002"

    signatures = action_chain(trip, saga_id).tasks

    assert [sig.options["queue"] for sig in signatures] == [
        "inventory",
        "inventory",
        "inventory",
        "payments",
        "bookings",
    ]
    for index, sig in enumerate(signatures):
        assert sig.immutable
        assert sig.kwargs == {"saga_id": saga_id}
        [errback] = sig.options["link_error"]
        assert errback["task"] == "sagas.step_failed"
        assert errback["kwargs"] == {"saga_id": saga_id, "step": index}


def test_a_chain_of_a_type_whose_tasks_were_never_made_is_refused(scratch_registry):
    late = SagaDefinition("late_saga", steps=[Step("only", lambda saga: None)])

    with pytest.raises(StepTaskMissing, match=r"task late_saga\.only is not registered"):
        action_chain(late, "00000000-0000-0000-0000-000000000003")


def test_every_compensation_message_carries_its_round_and_so_does_its_errback():
    trip = registry.get("trip_booking")
    saga_id = "00000000-0000-0000-0000-000000000004"

    undo = compensation_chain(trip, saga_id, 4, round=3).tasks

    for sig in undo:
        assert sig.kwargs == {"saga_id": saga_id, "round": 3}
    for sig, index in zip(undo[:-1], [3, 2, 1, 0], strict=True):
        [errback] = sig.options["link_error"]
        assert errback["task"] == "sagas.compensation_failed"
        assert errback["kwargs"] == {"saga_id": saga_id, "round": 3, "step": index}
