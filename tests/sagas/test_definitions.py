import pytest

from sagas.definitions import RetryPolicy, SagaDefinition, Step, registry
from sagas.errors import TransientError, UnknownSagaType


def noop(saga):
    return None


def test_retry_delays_grow_exponentially_within_jitter_bounds(settings):
    settings.SAGA_RETRY_DELAY_SCALE = 1.0
    settings.SAGA_MAX_RETRY_DELAY_S = 30
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=8)

    for retries, ceiling in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        delays = {policy.delay(retries) for _ in range(50)}
        assert min(delays) >= ceiling / 2
        assert max(delays) <= ceiling
        assert len(delays) > 1, "jitter spreads retries that failed together"


def test_retry_delay_never_exceeds_the_visibility_bound(settings):
    settings.SAGA_RETRY_DELAY_SCALE = 1.0
    settings.SAGA_MAX_RETRY_DELAY_S = 3
    policy = RetryPolicy(backoff_s=1, max_backoff_s=60, jitter=False)

    assert policy.delay(10) == 3


def test_a_policy_retries_only_the_errors_it_names():
    policy = RetryPolicy()

    assert policy.retries(TransientError("blip"))
    assert not policy.retries(ValueError("bad input"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_retries": -1}, "max_retries"), ({"backoff_s": 0}, "backoff_s")],
)
def test_a_nonsensical_retry_policy_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)


def test_a_saga_type_with_repeated_step_names_is_refused():
    with pytest.raises(ValueError, match="repeats a step or compensation name"):
        SagaDefinition("twice", steps=[Step("a", noop), Step("a", noop)])


def test_a_saga_type_without_steps_is_refused():
    with pytest.raises(ValueError, match="has no steps"):
        SagaDefinition("empty", steps=[])


def test_the_registry_names_the_known_types_when_asked_for_an_unknown_one():
    with pytest.raises(
        UnknownSagaType, match=r"unknown saga type 'nope'; known: \[.*'trip_booking'"
    ):
        registry.get("nope")


def test_compensations_are_named_after_their_functions():
    trip = registry.get("trip_booking")

    assert trip.action_names == [
        "reserve_flight",
        "reserve_hotel",
        "reserve_car",
        "charge_payment",
        "confirm_booking",
    ]
    assert trip.compensation_names == [
        "release_flight",
        "release_hotel",
        "release_car",
        "refund_payment",
    ]
    assert trip.action_task_name(1) == "trip_booking.reserve_hotel"
    assert trip.compensation_task_name(1) == "trip_booking.release_hotel"
    with pytest.raises(ValueError, match="has no compensation"):
        trip.compensation_task_name(4)


def test_the_next_step_to_undo_skips_steps_without_a_compensation():
    trip = registry.get("trip_booking")  # confirm_booking (index 4) has no compensation

    assert trip.next_to_undo(5) == 3
    assert trip.next_to_undo(4) == 3
    assert trip.next_to_undo(1) == 0
    assert trip.next_to_undo(0) is None
