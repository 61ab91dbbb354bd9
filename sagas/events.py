"""A worker's task events, published in batches rather than one Redis round trip each.

Celery's worker buffers task events (received, started, succeeded, ...) and
flushes the buffer on the event loop's next turn. Under load a turn handles
one message, so every event becomes a PUBLISH of its own: three per task, each
a round trip the worker's main process waits for between handing tasks to its
pool processes (measured in a saga burst: 45% of the main process's samples).
Flushed on a timer instead, one PUBLISH carries every event of the interval
(``task.multi``, which Flower and Celery's event receivers read as the events
one by one, in order); a buffer that reaches ``SAGA_TASK_EVENTS_BATCH`` is
flushed at once. Monitors see an event at most ``SAGA_TASK_EVENTS_FLUSH_MS``
later. ``SAGA_TASK_EVENTS_FLUSH_MS=0`` keeps Celery's own flushing.

Imported by ``config.celery_app`` before Django's apps are loaded: nothing
here may import a model.
"""

from __future__ import annotations

from celery import bootsteps
from django.conf import settings


class BatchedTaskEvents(bootsteps.StartStopStep):
    """Flush the consumer's buffered task events every ``SAGA_TASK_EVENTS_FLUSH_MS``."""

    requires = ("celery.worker.consumer.events:Events",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.interval_s = settings.SAGA_TASK_EVENTS_FLUSH_MS / 1000

    def start(self, parent) -> None:
        dispatcher, hub = getattr(parent, "event_dispatcher", None), getattr(parent, "hub", None)
        # No event loop (eventlet, gevent) or events off for good: nothing is buffered.
        if dispatcher is None or hub is None or self.interval_s <= 0:
            return
        dispatcher.buffer_limit = settings.SAGA_TASK_EVENTS_BATCH
        dispatcher.on_send_buffered = _Scheduler(dispatcher, hub, self.interval_s)

    def stop(self, parent) -> None:
        # Runs before the Events step closes the dispatcher: nothing buffered is left behind.
        dispatcher = getattr(parent, "event_dispatcher", None)
        if dispatcher is not None:
            dispatcher.flush()

    shutdown = stop


class _Scheduler:
    """``on_send_buffered``: one flush ``interval_s`` after the first event of a batch."""

    def __init__(self, dispatcher, hub, interval_s: float) -> None:
        self.dispatcher, self.hub, self.interval_s = dispatcher, hub, interval_s
        self.pending = False

    def __call__(self) -> None:
        if not self.pending:
            self.pending = True
            # Armed from the loop's own thread: a threads pool sends events from its
            # threads, and kombu's timer is not thread-safe (call_soon is, and wakes
            # the loop). An unlocked check can at worst arm two flushes: harmless.
            self.hub.call_soon(self._arm)

    def _arm(self) -> None:
        self.hub.call_later(self.interval_s, self.flush)

    def flush(self) -> None:
        self.pending = False
        self.dispatcher.flush()
