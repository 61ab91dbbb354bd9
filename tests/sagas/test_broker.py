"""Reading the broker: a queued or held step told apart from a lost one, and workers' leases."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
import redis
from celery import current_app
from django.db import transaction
from django.utils import timezone

from sagas import broker, canvas
from sagas import services as saga_services
from sagas.definitions import SagaDefinition, Step
from sagas.models import Saga
from tests.conftest import wait_for

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

# Nobody consumes this queue: its messages stay where the test put them.
IDLE_QUEUE = "broker-probe"


def hold(saga: Saga) -> dict:
    return {"held": True}


def release(saga: Saga) -> dict:
    return {"released": True}


@pytest.fixture
def idle_saga(scratch_registry):
    from sagas import tasks

    definition = SagaDefinition(
        "broker_probe",
        steps=[
            Step("hold", hold, release, queue=IDLE_QUEUE),
            Step("again", hold, queue=IDLE_QUEUE),
        ],
    )
    tasks.register_step_tasks()
    client = redis.Redis.from_url(current_app.conf.broker_url)
    client.delete(IDLE_QUEUE)
    yield definition
    client.delete(IDLE_QUEUE)


def stalled_saga(definition: SagaDefinition) -> Saga:
    """A RUNNING saga quiet for an hour, as the sweeper finds one."""
    long_ago = timezone.now() - timedelta(hours=1)
    saga = Saga.objects.create(
        saga_type=definition.name,
        business_key=f"probe:{uuid.uuid4()}",
        status=Saga.Status.RUNNING,
        deadline=timezone.now() + timedelta(hours=1),
    )
    Saga.objects.filter(pk=saga.pk).update(updated_at=long_ago)
    return saga


def test_a_saga_whose_step_is_queued_is_found_and_one_with_none_is_not(idle_saga):
    queued, silent = stalled_saga(idle_saga), stalled_saga(idle_saga)
    canvas.action_chain(idle_saga, str(queued.pk)).apply_async()

    assert broker.sagas_with_messages({str(queued.pk), str(silent.pk)}) == {str(queued.pk)}
    assert broker.sagas_with_messages(set()) == set()


def test_a_message_a_worker_holds_unacknowledged_still_counts(idle_saga):
    saga = stalled_saga(idle_saga)
    canvas.action_chain(idle_saga, str(saga.pk)).apply_async()

    with current_app.connection_for_read() as connection:
        queue = connection.SimpleQueue(IDLE_QUEUE)
        message = queue.get(timeout=5)  # taken by a "worker", not yet acknowledged
        try:
            assert redis.Redis.from_url(current_app.conf.broker_url).llen(IDLE_QUEUE) == 0
            assert broker.sagas_with_messages({str(saga.pk)}) == {str(saga.pk)}
        finally:
            message.ack()
            queue.close()

    assert broker.sagas_with_messages({str(saga.pk)}) == set()


def test_the_sweeper_leaves_a_saga_queued_behind_a_backlog_and_resumes_a_lost_one(idle_saga):
    queued, lost = stalled_saga(idle_saga), stalled_saga(idle_saga)
    canvas.action_chain(idle_saga, str(queued.pk)).apply_async()
    client = redis.Redis.from_url(current_app.conf.broker_url)

    counts = saga_services.sagas_recover_stalled()

    assert counts["resumed"] == 1
    assert broker.sagas_with_messages({str(queued.pk), str(lost.pk)}) == {
        str(queued.pk),
        str(lost.pk),
    }
    assert client.llen(IDLE_QUEUE) == 2  # one message each: nothing published twice
    # Quiet again, each with its message waiting: the next sweep publishes nothing.
    Saga.objects.filter(pk__in=[queued.pk, lost.pk]).update(
        updated_at=timezone.now() - timedelta(hours=1)
    )
    assert saga_services.sagas_recover_stalled()["resumed"] == 0
    assert client.llen(IDLE_QUEUE) == 2

    # The broker loses everything: both are lost now, and both move on.
    client.delete(IDLE_QUEUE)
    assert saga_services.sagas_recover_stalled()["resumed"] == 2


def test_a_sweep_works_through_every_stalled_saga_in_batches(idle_saga):
    sagas = [stalled_saga(idle_saga) for _ in range(7)]

    counts = saga_services.sagas_recover_stalled(limit=3)

    assert counts["resumed"] == 7
    assert broker.sagas_with_messages({str(s.pk) for s in sagas}) == {str(s.pk) for s in sagas}


def test_a_compensation_past_its_own_deadline_ends_failed_for_an_operator(idle_saga):
    saga = stalled_saga(idle_saga)
    Saga.objects.filter(pk=saga.pk).update(
        status=Saga.Status.COMPENSATING,
        undo_cursor=1,
        round=1,
        failure_reason="step again failed",
        compensation_deadline=timezone.now() - timedelta(seconds=1),
    )

    counts = saga_services.sagas_recover_stalled()

    assert counts["compensation_deadline_failed"] == 1
    saga.refresh_from_db()
    assert saga.status == Saga.Status.FAILED
    assert saga.failure_reason == (
        f"compensation did not end within {idle_saga.compensation_deadline_s}s "
        "(still to do: release); step again failed"
    )
    assert saga.finished_at is not None


def test_compensating_starts_its_own_deadline_from_the_database_clock(idle_saga):
    saga = stalled_saga(idle_saga)
    with transaction.atomic():
        assert saga_services.saga_begin_compensation(saga_id=saga.pk, reason="probe")
    saga.refresh_from_db()
    window = timedelta(seconds=idle_saga.compensation_deadline_s)
    assert saga.status == Saga.Status.COMPENSATING
    assert timezone.now() + window - timedelta(seconds=5) < saga.compensation_deadline
    assert saga.compensation_deadline < timezone.now() + window + timedelta(seconds=5)
    # The action deadline is the saga's own, untouched.
    assert saga.deadline > timezone.now() + timedelta(minutes=30)


def test_a_saga_compensating_since_before_there_were_deadlines_gets_one_not_a_failure(idle_saga):
    saga = stalled_saga(idle_saga)
    # Begun by older code: its action deadline long past, no compensation deadline.
    Saga.objects.filter(pk=saga.pk).update(
        status=Saga.Status.COMPENSATING,
        undo_cursor=1,
        round=1,
        deadline=timezone.now() - timedelta(hours=1),
    )

    counts = saga_services.sagas_recover_stalled()

    assert counts["compensation_deadline_failed"] == 0
    saga.refresh_from_db()
    assert saga.status == Saga.Status.COMPENSATING
    assert saga.compensation_deadline > timezone.now()


def test_a_message_whose_lease_lapsed_does_not_count_as_held(idle_saga):
    saga = stalled_saga(idle_saga)
    canvas.action_chain(idle_saga, str(saga.pk)).apply_async()
    client = redis.Redis.from_url(current_app.conf.broker_url)
    with current_app.connection_for_read() as connection:
        queue = connection.SimpleQueue(IDLE_QUEUE)
        message = queue.get(timeout=5)  # held by a "worker" that then died: no renewals
        try:
            visibility = current_app.conf.broker_transport_options["visibility_timeout"]
            tag = message.delivery_tag
            assert broker.sagas_with_messages({str(saga.pk)}) == {str(saga.pk)}
            client.zadd("unacked_index", {tag: time.time() - visibility - 1})

            assert broker.sagas_with_messages({str(saga.pk)}) == set()
        finally:
            message.ack()
            queue.close()


def test_a_broker_too_full_to_read_is_not_read(idle_saga, settings):
    saga = stalled_saga(idle_saga)
    for _ in range(3):
        canvas.action_chain(idle_saga, str(saga.pk)).apply_async()
    settings.SAGA_BROKER_SCAN_MAX = 2

    assert broker.sagas_with_messages({str(saga.pk)}) is None
    # The sweeper then falls back to the step's whole budget: an hour is past it.
    assert saga_services.sagas_recover_stalled()["resumed"] == 1


def test_a_live_worker_renews_its_lease_on_a_message_it_holds(celery_worker, settings):
    """A retry's countdown is held unacknowledged: its lease is renewed, so it is not handed out
    again after the (short) visibility timeout while the worker lives."""
    client = redis.Redis.from_url(current_app.conf.broker_url)
    saga_id = str(uuid.uuid4())  # no such saga: the finish does nothing when it runs
    published = time.time()
    canvas.saga_task(canvas.FINISH_COMPENSATION, saga_id).apply_async(countdown=8)

    def held_score():
        for tag, score in client.zrange("unacked_index", 0, -1, withscores=True):
            if saga_id in (client.hget("unacked", tag) or b"").decode():
                return score
        return None

    first = wait_for(held_score, timeout=5, message="the worker to hold the message")
    assert first < published + 2
    renewed = wait_for(
        lambda: (score := held_score()) and score > first + settings.SAGA_LEASE_RENEW_S / 2,
        timeout=3 * settings.SAGA_LEASE_RENEW_S,
        message="the lease to be renewed",
    )
    assert renewed
    assert broker.sagas_with_messages({saga_id}) == {saga_id}
    wait_for(lambda: held_score() is None, timeout=15, message="the finish to run and be acked")
