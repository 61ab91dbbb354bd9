"""Task events go out in batches (sagas.events), and every one of them still arrives."""

from __future__ import annotations

import base64
import json
import threading

import pytest
import redis
from django.conf import settings

from sagas.events import BatchedTaskEvents, _Scheduler
from sagas.models import SagaLog
from tests.conftest import wait_for
from tests.functional.support import TRIP_STEPS, book_trip, wait_terminal


class StubDispatcher:
    def __init__(self) -> None:
        self.buffer_limit = 24
        self.on_send_buffered = "celery's"
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


class StubHub:
    def __init__(self) -> None:
        self.soon: list[object] = []
        self.later: list[tuple[float, object]] = []

    def call_soon(self, callback, *args):
        self.soon.append(callback)

    def call_later(self, delay, callback, *args):
        self.later.append((delay, callback))

    def run_soon(self) -> None:
        """The loop's next turn: what was handed to it from any thread runs there."""
        while self.soon:
            self.soon.pop(0)()


class StubConsumer:
    def __init__(self, *, hub=True, dispatcher=True) -> None:
        self.hub = StubHub() if hub else None
        self.event_dispatcher = StubDispatcher() if dispatcher else None


def test_the_events_of_an_interval_are_flushed_once_after_it():
    consumer = StubConsumer()
    BatchedTaskEvents(consumer).start(consumer)
    dispatcher, hub = consumer.event_dispatcher, consumer.hub
    assert isinstance(dispatcher.on_send_buffered, _Scheduler)
    assert dispatcher.buffer_limit == settings.SAGA_TASK_EVENTS_BATCH

    for _ in range(30):  # thirty events buffered within one interval: one flush scheduled
        dispatcher.on_send_buffered()
    # The timer is armed on the loop's turn, never from the sender's thread.
    assert hub.later == []
    hub.run_soon()
    assert [delay for delay, _ in hub.later] == [settings.SAGA_TASK_EVENTS_FLUSH_MS / 1000]
    assert dispatcher.flushes == 0

    hub.later.pop()[1]()  # the interval is over
    assert dispatcher.flushes == 1
    dispatcher.on_send_buffered()  # the next event starts the next batch
    hub.run_soon()
    assert len(hub.later) == 1


def test_stopping_the_consumer_flushes_what_is_buffered():
    consumer = StubConsumer()
    step = BatchedTaskEvents(consumer)
    step.start(consumer)
    step.stop(consumer)
    assert consumer.event_dispatcher.flushes == 1


@pytest.mark.parametrize("consumer", [StubConsumer(hub=False), StubConsumer(dispatcher=False)])
def test_without_an_event_loop_or_a_dispatcher_celery_keeps_its_own_flushing(consumer):
    BatchedTaskEvents(consumer).start(consumer)
    if consumer.event_dispatcher is not None:
        assert consumer.event_dispatcher.on_send_buffered == "celery's"


def test_a_zero_interval_keeps_celerys_flush_on_every_loop_turn(settings):
    settings.SAGA_TASK_EVENTS_FLUSH_MS = 0
    consumer = StubConsumer()
    BatchedTaskEvents(consumer).start(consumer)
    assert consumer.event_dispatcher.on_send_buffered == "celery's"
    assert consumer.event_dispatcher.buffer_limit == 24


class EventListener:
    """Every task event message published on the broker while it listens, as lists of events."""

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("*celeryev*")
        # Subscribed for sure before anything is published.
        confirmed = self.pubsub.get_message(timeout=5)
        assert confirmed is not None, "no confirmation of the subscription"
        assert confirmed["type"] == "psubscribe", confirmed
        self.messages: list[list[dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message is None or message["type"] != "pmessage":
                continue
            envelope = json.loads(message["data"])
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            events = json.loads(body)
            events = events if isinstance(events, list) else [events]
            self.messages.append([event for event in events if event["type"].startswith("task-")])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pubsub.close()
        self.client.close()


@pytest.mark.saga
@pytest.mark.django_db(transaction=True)
def test_a_sagas_task_events_all_arrive_batched_across_its_tasks(
    celery_worker, customer, trip_items
):
    assert celery_worker.app.conf.worker_send_task_events is True
    listener = EventListener()
    try:
        booking = book_trip(customer, trip_items)
        saga = wait_terminal(booking.saga_id)
        task_ids = set(
            SagaLog.objects.filter(saga_id=saga.pk, status=SagaLog.Status.SUCCEEDED).values_list(
                "task_id", flat=True
            )
        )
        assert len(task_ids) == len(TRIP_STEPS)

        def seen() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {task_id: set() for task_id in task_ids}
            for events in listener.messages:
                for event in events:
                    if event.get("uuid") in found:
                        found[event["uuid"]].add(event["type"])
            done = all({"task-received", "task-succeeded"} <= types for types in found.values())
            return found if done else None

        wait_for(seen, timeout=10, message="every step's received and succeeded events")
    finally:
        listener.close()
    # Batched: some message carries the events of more than one step (Celery's own
    # flush sends each turn of the worker's loop, one task, on its own).
    tasks_per_message = [
        len({event["uuid"] for event in events if event.get("uuid") in task_ids})
        for events in listener.messages
    ]
    assert max(tasks_per_message) > 1, tasks_per_message
