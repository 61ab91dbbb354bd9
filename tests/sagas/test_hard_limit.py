"""A step killed by its hard time limit: retried by the engine while its budget lasts.

Celery fails a task killed by its hard time limit without retrying it,
whatever its policy, and calls its errback. The errback asks the result store
whether that is what happened (``sagas.tasks._hit_hard_time_limit``), and the
services then publish the step again with Celery's retry count and a backoff,
or, once the step's budget is spent, go on as for any final failure, counting
the killed attempt as one that may have had its effect.

The service tests use plain ``django_db`` and run the on-commit publish with
the chain builders mocked, to read what would have been published. The last
test kills a real step in a real prefork worker.
"""

from __future__ import annotations

import os
import time
import uuid
from unittest import mock

import pytest
from celery.exceptions import Retry, SoftTimeLimitExceeded, TimeLimitExceeded
from django.conf import settings
from django.db import connection, transaction
from django_celery_results.models import TaskResult

from bookings.models import Booking
from sagas import services, tasks
from sagas.definitions import COMPENSATION_RETRY, RetryPolicy, SagaDefinition, Step
from sagas.models import Saga, SagaLog
from sagas.services import saga_start
from tests.functional.support import wait_terminal
from tests.probe_worker import probe_worker
from tests.sagas.support import StandInTask, act, undo

Status = Saga.Status
LogStatus = SagaLog.Status
ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION


def delay_bounds(policy: RetryPolicy, retries: int) -> tuple[float, float]:
    """The least and most ``policy.delay(retries)`` can be, jitter and rounding included."""
    cap = min(policy.max_backoff_s, float(settings.SAGA_MAX_RETRY_DELAY_S))
    delay = min(cap, policy.backoff_s * 2**retries) * settings.SAGA_RETRY_DELAY_SCALE
    return round(delay / 2, 3) - 0.001, round(delay, 3) + 0.001


def published(builder: mock.MagicMock) -> dict:
    """The keyword options of the one ``apply_async`` of what ``builder`` built."""
    builder.return_value.apply_async.assert_called_once()
    args, options = builder.return_value.apply_async.call_args
    assert args == ()
    return options


def killed(saga: Saga, failed_task_id: str) -> bool:
    """Report a hard-killed action, as ``sagas.step_failed`` does."""
    return services.saga_action_failed(
        saga_id=saga.pk, failed_task_id=failed_task_id, hard_time_limit=True
    )


# --- actions -----------------------------------------------------------------------


@pytest.mark.django_db
def test_an_action_killed_by_its_hard_limit_is_published_again_and_nothing_is_undone(
    trip, make_booking, django_capture_on_commit_callbacks
):
    _booking, saga = make_booking()
    act(trip, saga, "reserve_flight")

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        outcome = killed(saga, "killed-hotel-1")

    assert outcome is False
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done, saga.undo_cursor) == (Status.RUNNING, 1, 0)
    [row] = SagaLog.objects.filter(saga=saga, step="reserve_hotel")
    assert (row.phase, row.status, row.attempt, row.round) == (ACTION, LogStatus.RETRYING, 1, 0)
    assert row.may_have_effect is True
    assert row.task_id == "killed-hotel-1"
    hotel = trip.steps[trip.index_of("reserve_hotel")]
    assert row.error.startswith(
        f"TimeLimitExceeded: hard time limit ({hotel.hard_limit_s}s) exceeded (retry in "
    )
    # The rest of the chain, from the killed step, with Celery's retry count and a backoff.
    actions.assert_called_once_with(trip, str(saga.pk), start=1)
    options = published(actions)
    assert options["retries"] == 1
    low, high = delay_bounds(hotel.retry, 0)
    assert low <= options["countdown"] <= high
    assert f"(retry in {options['countdown']}s)" in row.error
    compensations.assert_not_called()


def killed_at_the_hotel(trip, make_booking, capture_on_commit):
    """A saga past reserve_flight whose reserve_hotel was killed once (task killed-hotel-1)."""
    _booking, saga = make_booking()
    act(trip, saga, "reserve_flight")
    with mock.patch("sagas.canvas.action_chain"), capture_on_commit(execute=True):
        killed(saga, "killed-hotel-1")
    return saga


@pytest.mark.django_db
def test_the_second_hard_kill_counts_the_first_as_a_retry(
    trip, make_booking, django_capture_on_commit_callbacks
):
    saga = killed_at_the_hotel(trip, make_booking, django_capture_on_commit_callbacks)

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert killed(saga, "killed-hotel-2") is False

    rows = SagaLog.objects.filter(saga=saga, step="reserve_hotel").order_by("id")
    assert [(row.status, row.attempt, row.task_id) for row in rows] == [
        (LogStatus.RETRYING, 1, "killed-hotel-1"),
        (LogStatus.RETRYING, 2, "killed-hotel-2"),
    ]
    options = published(actions)
    assert options["retries"] == 2
    low, high = delay_bounds(trip.steps[1].retry, 1)
    assert low <= options["countdown"] <= high


@pytest.mark.django_db
def test_an_action_killed_once_its_budget_is_spent_times_out_and_is_undone_too(
    trip, make_booking, django_capture_on_commit_callbacks
):
    hotel = trip.steps[trip.index_of("reserve_hotel")]
    _booking, saga = make_booking(chaos={"transient": {"reserve_hotel": hotel.retry.max_retries}})
    act(trip, saga, "reserve_flight")
    # Every retry the policy allows was taken by ordinary transient failures ...
    for retries in range(hotel.retry.max_retries):
        with pytest.raises(Retry):
            act(trip, saga, "reserve_hotel", StandInTask(retries=retries))
    # ... and the last attempt was killed by its hard limit.

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        outcome = killed(saga, "killed-hotel-last")

    assert outcome is True  # the errback claimed the saga for compensation
    actions.assert_not_called()
    last = SagaLog.objects.filter(saga=saga, step="reserve_hotel").latest("id")
    assert (last.status, last.attempt, last.may_have_effect) == (
        LogStatus.TIMED_OUT,
        hotel.retry.max_retries + 1,
        True,
    )
    assert last.error == f"TimeLimitExceeded: hard time limit ({hotel.hard_limit_s}s) exceeded"
    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    # The killed step may have had its effect: it is undone, newest first.
    assert saga.undo_cursor == 2
    assert saga.failure_reason == f"step reserve_hotel failed: {last.error}"
    compensations.assert_called_once_with(trip, str(saga.pk), 2, 1)
    assert published(compensations) == {}


@pytest.mark.django_db
def test_one_hard_kill_reported_twice_is_retried_once(
    trip, make_booking, django_capture_on_commit_callbacks
):
    # Celery 5.7 on prefork calls a hard-killed task's errbacks twice: once
    # from the pool's failure callback, once from Request.on_timeout.
    saga = killed_at_the_hotel(trip, make_booking, django_capture_on_commit_callbacks)

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert killed(saga, "killed-hotel-1") is False

    rows = SagaLog.objects.filter(saga=saga, step="reserve_hotel")
    assert [(row.status, row.attempt) for row in rows] == [(LogStatus.RETRYING, 1)]
    actions.assert_not_called()
    compensations.assert_not_called()
    assert Saga.objects.get(pk=saga.pk).status == Status.RUNNING


@pytest.mark.django_db
def test_a_second_report_of_a_hard_kill_after_its_retry_succeeded_blames_no_later_step(
    trip, make_booking, django_capture_on_commit_callbacks
):
    saga = killed_at_the_hotel(trip, make_booking, django_capture_on_commit_callbacks)
    act(trip, saga, "reserve_hotel", StandInTask(retries=1))  # the retry went through

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert killed(saga, "killed-hotel-1") is False

    assert not SagaLog.objects.filter(saga=saga, step="reserve_car").exists()
    actions.assert_not_called()
    compensations.assert_not_called()
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.RUNNING, 2)


@pytest.mark.django_db
def test_a_hard_kill_reported_after_the_saga_moved_on_retries_nothing(
    trip, make_booking, django_capture_on_commit_callbacks
):
    _booking, saga = make_booking()
    act(trip, saga, "reserve_flight")
    services.saga_begin_compensation(saga_id=saga.pk, reason="deadline passed")

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        outcome = killed(saga, "killed-late")

    assert outcome is False
    assert not SagaLog.objects.filter(saga=saga, task_id="killed-late").exists()
    actions.assert_not_called()
    compensations.assert_not_called()
    assert Saga.objects.get(pk=saga.pk).status == Status.COMPENSATING


# --- compensations -----------------------------------------------------------------


def compensating(trip, make_booking, **chaos) -> Saga:
    """A saga that held the flight and the hotel and is now compensating (release_hotel first)."""
    _booking, saga = make_booking(chaos=chaos or None)
    act(trip, saga, "reserve_flight")
    act(trip, saga, "reserve_hotel")
    with pytest.raises(Exception, match="chaos: reserve_car fails"):
        act(trip, saga, "reserve_car")
    assert services.saga_begin_compensation(saga_id=saga.pk, failed_task_id="car")
    saga.refresh_from_db()
    assert (saga.status, saga.undo_cursor, saga.round) == (Status.COMPENSATING, 2, 1)
    return saga


def killed_compensation(saga: Saga, failed_task_id: str, round: int = 1) -> bool:
    return services.saga_fail_compensation(
        saga_id=saga.pk, failed_task_id=failed_task_id, round=round, hard_time_limit=True
    )


@pytest.mark.django_db
def test_a_compensation_killed_by_its_hard_limit_is_published_again(
    trip, make_booking, django_capture_on_commit_callbacks
):
    saga = compensating(trip, make_booking, fail=["reserve_car"])

    with (
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        outcome = killed_compensation(saga, "killed-release-1")

    assert outcome is False
    saga.refresh_from_db()
    assert (saga.status, saga.undo_cursor, saga.failure_reason) == (
        Status.COMPENSATING,
        2,
        "step reserve_car failed: sagas.errors.ChaosFailure: chaos: reserve_car fails",
    )
    [row] = SagaLog.objects.filter(saga=saga, phase=COMPENSATION)
    assert (row.step, row.status, row.attempt, row.round, row.may_have_effect) == (
        "release_hotel",
        LogStatus.RETRYING,
        1,
        1,
        True,
    )
    # The compensations still to run, in the same round, as Task.retry would have.
    compensations.assert_called_once_with(trip, str(saga.pk), 2, 1)
    options = published(compensations)
    assert options["retries"] == 1
    low, high = delay_bounds(COMPENSATION_RETRY, 0)
    assert low <= options["countdown"] <= high


@pytest.mark.django_db
def test_a_compensation_killed_once_its_budget_is_spent_fails_the_saga_for_an_operator(
    trip, make_booking, django_capture_on_commit_callbacks
):
    budget = COMPENSATION_RETRY.max_retries
    saga = compensating(
        trip,
        make_booking,
        fail=["reserve_car"],
        compensation_transient={"release_hotel": budget},
    )
    for retries in range(budget):
        with pytest.raises(Retry):
            undo(trip, saga, "reserve_hotel", StandInTask(retries=retries))

    with (
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        outcome = killed_compensation(saga, "killed-release-last")

    assert outcome is True
    compensations.assert_not_called()
    rows = SagaLog.objects.filter(saga=saga, phase=COMPENSATION).order_by("id")
    assert [row.status for row in rows] == [LogStatus.RETRYING] * budget + [LogStatus.TIMED_OUT]
    hard_limit = trip.steps[trip.index_of("reserve_hotel")].hard_limit_s
    assert rows.last().attempt == budget + 1
    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    assert saga.failure_reason == (
        "compensation of release_hotel exhausted its retries: "
        f"TimeLimitExceeded: hard time limit ({hard_limit}s) exceeded"
    )
    booking = Booking.objects.get(pk=saga.context["booking_id"])
    assert booking.status == Booking.Status.NEEDS_ATTENTION


@pytest.mark.django_db
def test_a_hard_kill_reported_from_an_earlier_round_retries_nothing(
    trip, make_booking, django_capture_on_commit_callbacks
):
    saga = compensating(trip, make_booking, fail=["reserve_car"])
    Saga.objects.filter(pk=saga.pk).update(round=2)

    with (
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert killed_compensation(saga, "killed-round-1", round=1) is False

    assert not SagaLog.objects.filter(saga=saga, phase=COMPENSATION).exists()
    compensations.assert_not_called()
    assert Saga.objects.get(pk=saga.pk).status == Status.COMPENSATING


# --- telling a hard kill from the result store ----------------------------------------


def stored_failure(exc: BaseException) -> str:
    from config.celery_app import app

    task_id = str(uuid.uuid4())
    app.backend.mark_as_failure(task_id, exc)
    return task_id


@pytest.mark.django_db
def test_a_stored_time_limit_exceeded_is_a_hard_kill():
    from config.celery_app import app

    task_id = stored_failure(TimeLimitExceeded(15))

    assert tasks._hit_hard_time_limit(app, task_id) is True


@pytest.mark.django_db
@pytest.mark.parametrize(
    "exc",
    [SoftTimeLimitExceeded(), ValueError("boom"), RuntimeError("TimeLimitExceeded")],
    ids=["soft-limit", "other-error", "lookalike-message"],
)
def test_any_other_stored_failure_is_no_hard_kill(exc):
    from config.celery_app import app

    assert tasks._hit_hard_time_limit(app, stored_failure(exc)) is False


@pytest.mark.django_db
def test_an_unknown_empty_or_unreadable_result_is_no_hard_kill():
    from config.celery_app import app

    unreadable = str(uuid.uuid4())
    TaskResult.objects.create(
        task_id=unreadable, status="FAILURE", result="{not json", content_type="application/json"
    )

    assert tasks._hit_hard_time_limit(app, str(uuid.uuid4())) is False
    assert tasks._hit_hard_time_limit(app, "") is False
    assert tasks._hit_hard_time_limit(app, unreadable) is False


@pytest.mark.django_db
def test_the_errbacks_pass_on_whether_the_failed_task_was_hard_killed():
    task_id = stored_failure(TimeLimitExceeded(15))
    other = stored_failure(ValueError("boom"))

    with (
        mock.patch("sagas.services.saga_action_failed", return_value=False) as action_failed,
        mock.patch("sagas.services.saga_fail_compensation", return_value=False) as undo_failed,
    ):
        tasks.step_failed(task_id, saga_id="s-1", step=3)
        tasks.compensation_failed(other, saga_id="s-1", round=2, step=1)

    action_failed.assert_called_once_with(
        saga_id="s-1", failed_task_id=task_id, hard_time_limit=True, step=3
    )
    undo_failed.assert_called_once_with(
        saga_id="s-1", failed_task_id=other, round=2, hard_time_limit=False, step=1
    )


# --- end to end: a real prefork worker kills a real step ------------------------------

PROBE_SAGA = "hard_limit_probe"
PROBE_QUEUE = "hard-limit-probe"
# Set in the worker subprocess, which imports this module to know the probe saga.
WORKER_FLAG = "SAGAS_HARD_LIMIT_PROBE_WORKER"


def _sleep_through_soft_limits(seconds: float) -> None:
    """Sleep, ignoring soft time limits, as a call stuck outside Python would."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.1))
        except SoftTimeLimitExceeded:
            continue


def stubborn(saga: Saga) -> dict:
    """Hangs past its hard limit on its first attempt; the retry goes through."""
    retried = SagaLog.objects.filter(saga=saga, step="stubborn", status=LogStatus.RETRYING).exists()
    if not retried:
        _sleep_through_soft_limits(60)
    return {"done": True}


def unstick(saga: Saga) -> dict:
    return {"undone": True}


def finish(saga: Saga) -> dict:
    return {"finished": True}


def declare_probe_saga() -> SagaDefinition:
    """One step that outlives its hard limit (1 s soft, 6 s hard) and one after it."""
    definition = SagaDefinition(
        PROBE_SAGA,
        steps=[
            Step(
                "stubborn",
                stubborn,
                unstick,
                queue=PROBE_QUEUE,
                timeout_s=1,
                retry=RetryPolicy(max_retries=1, backoff_s=0.1),
            ),
            Step("finish", finish, queue=PROBE_QUEUE),
        ],
    )
    tasks.register_step_tasks()
    return definition


if os.environ.get(WORKER_FLAG):
    declare_probe_saga()


@pytest.fixture
def probe_saga_worker(scratch_registry, transactional_db, tmp_path):
    """The probe saga declared here, and a prefork worker (-c 1) that knows it too."""
    definition = declare_probe_saga()
    logfile = tmp_path / "worker.log"
    with probe_worker(
        module=__name__,
        flag=WORKER_FLAG,
        queues=(PROBE_QUEUE, "sagas"),
        logfile=logfile,
        name="hard-limit",
    ):
        yield definition, logfile


@pytest.mark.saga
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_step_killed_by_its_hard_limit_in_a_prefork_worker_is_retried_and_the_saga_completes(
    probe_saga_worker,
):
    from config.celery_app import app

    if connection.vendor != "postgresql":
        # Seen on the SQLite fallback only: the prefork worker's main process
        # never reaches its hard-limit handler while the killed step's child
        # holds the database file's lock (no "Hard time limit exceeded" line).
        pytest.skip("needs PostgreSQL: a prefork worker on one SQLite file stalls at the kill")
    definition, logfile = probe_saga_worker
    stubborn_step = definition.steps[0]
    with transaction.atomic():
        saga = saga_start(saga_type=PROBE_SAGA, business_key=f"probe:{uuid.uuid4()}")

    done = wait_terminal(saga.pk, timeout=45)

    rows = SagaLog.objects.filter(saga=saga).order_by("id")
    history = [(row.step, row.status, row.attempt, row.may_have_effect) for row in rows]
    assert (done.status, history) == (
        Status.COMPLETED,
        [
            ("stubborn", LogStatus.RETRYING, 1, True),
            ("stubborn", LogStatus.SUCCEEDED, 2, False),
            # The retry count went to the killed step's message only.
            ("finish", LogStatus.SUCCEEDED, 1, False),
        ],
    ), done.failure_reason
    killed_row = rows.first()
    assert killed_row.error.startswith(
        f"TimeLimitExceeded: hard time limit ({stubborn_step.hard_limit_s}s) exceeded (retry in "
    )
    assert tasks._hit_hard_time_limit(app, killed_row.task_id) is True
    assert f"Hard time limit ({stubborn_step.hard_limit_s}s) exceeded" in logfile.read_text()


@pytest.mark.django_db
def test_a_step_killed_after_it_committed_has_the_rest_of_its_chain_published_once(
    trip, make_booking, django_capture_on_commit_callbacks
):
    _booking, saga = make_booking()
    act(trip, saga, "reserve_flight")  # committed; then the hard limit killed the task

    with (
        mock.patch("sagas.canvas.action_chain") as actions,
        mock.patch("sagas.canvas.compensation_chain") as compensations,
        django_capture_on_commit_callbacks(execute=True),
    ):
        for _report in range(2):  # prefork reports the kill twice
            assert (
                services.saga_action_failed(
                    saga_id=saga.pk, failed_task_id="killed-after", hard_time_limit=True, step=0
                )
                is False
            )

    actions.assert_called_once_with(trip, str(saga.pk), start=1)
    actions.return_value.apply_async.assert_called_once_with()
    compensations.assert_not_called()
    [row] = SagaLog.objects.filter(saga=saga, task_id="killed-after")
    assert (row.step, row.status) == ("reserve_flight", LogStatus.IGNORED)
    assert row.error.startswith("TimeLimitExceeded: hard time limit exceeded after the step")
    saga.refresh_from_db()
    assert (saga.status, saga.steps_done) == (Status.RUNNING, 1)
