"""A worker's lease on the broker messages it holds (Redis), renewed while it is alive.

The Redis transport hands a message out again once it was unacknowledged for
``visibility_timeout``. With every live worker renewing what it holds, that
timeout can be short, so the messages of a worker that died or froze come back
within seconds, and a long task or a retry's countdown is still never
delivered twice. See ``sagas.broker`` for how recovery uses it.

Imported by ``config.celery_app`` before Django's apps are loaded: nothing
here may import a model.
"""

from __future__ import annotations

import logging
import time

from celery import bootsteps
from django.conf import settings

logger = logging.getLogger(__name__)


class MessageLeases(bootsteps.StartStopStep):
    """A worker's lease on the messages it holds: renewed every ``SAGA_LEASE_RENEW_S``.

    Renewing moves each held message's score in the transport's
    ``unacked_index`` to now (``ZADD XX``: a message acknowledged meanwhile
    is not brought back). It runs in the consumer's event loop, so a worker
    whose loop stops (killed, frozen, wedged) stops renewing, and its
    messages come back after ``visibility_timeout``.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref = None

    def start(self, parent) -> None:
        interval = float(getattr(settings, "SAGA_LEASE_RENEW_S", 0) or 0)
        if interval > 0:
            self.timer_ref = parent.timer.call_repeatedly(interval, self.renew, (parent,))

    def stop(self, parent) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None

    shutdown = stop

    @staticmethod
    def renew(parent) -> int:
        """Renew this worker's leases; how many messages it holds."""
        channel = getattr(getattr(parent, "task_consumer", None), "channel", None)
        qos = getattr(channel, "qos", None)
        if qos is None or not hasattr(channel, "unacked_key"):
            return 0
        try:
            tags = list(qos._delivered)
        except RuntimeError:  # changed while copied: renew on the next tick
            return 0
        if not tags:
            return 0
        try:
            with channel.conn_or_acquire() as client:
                client.zadd(channel.unacked_index_key, dict.fromkeys(tags, time.time()), xx=True)
        except Exception as exc:
            logger.warning("could not renew the leases of %d message(s): %s", len(tags), exc)
        return len(tags)
