"""What the broker holds of a saga: telling a queued or running step from a lost one.

Every message of a saga carries its id (``saga_id`` in the task's kwargs). On
Redis, a message is either in a queue's list or, once a worker took it, in the
transport's ``unacked`` hash until the worker acknowledges it (a retry waiting
for its countdown is held there too). So a saga with no message in either
place has lost its messages (the broker flushed them, or was restarted
without its data), while one whose step waits behind a backlog has one: the
sweeper publishes the rest of a chain only for the former, and never adds to a
backlog.

A worker that dies holding a message leaves it in ``unacked``; it goes back to
its queue once the worker's lease on it lapses. Every live worker renews the
leases of the messages it holds (:class:`sagas.leases.MessageLeases`, a
consumer bootstep that ``config.celery_app`` installs), so the transport's ``visibility_timeout``
can be short (a lost worker's messages come back within seconds) without a
long-running task or a long countdown being delivered twice. Renewing costs a
worker one Redis command every ``SAGA_LEASE_RENEW_S``, and a step nothing.

Other brokers cannot be read this way: there the functions below answer
``None`` and recovery falls back to waiting out each step's retry budget.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterable

from celery import current_app
from django.conf import settings

from sagas.definitions import MAINTENANCE_QUEUE, SAGA_QUEUE, registry

logger = logging.getLogger(__name__)

# How long the sweeper waits for the broker before falling back to budgets.
BROKER_TIMEOUT_S = 5.0


def saga_queues() -> set[str]:
    """Every queue a saga's message can be on: the saga queue and each step's."""
    queues = {SAGA_QUEUE}
    for definition in registry.all():
        queues.update(step.queue for step in definition.steps)
    queues.discard(MAINTENANCE_QUEUE)
    return queues


def sagas_with_messages(saga_ids: Iterable[str], *, app=None) -> set[str] | None:
    """Which of ``saga_ids`` have a message queued, or held by a worker whose lease is alive.

    ``None`` when the broker is not Redis, cannot be read now, or holds more
    than ``SAGA_BROKER_SCAN_MAX`` saga messages (reading them all would cost
    more than recovery saves: then recovery falls back to budgets).
    """
    wanted = {str(saga_id) for saga_id in saga_ids}
    if not wanted:
        return set()
    present = sagas_in_broker(app=app)
    return None if present is None else present & wanted


def sagas_in_broker(*, app=None) -> set[str] | None:
    """The ids of every saga with a message queued, or held by a worker whose lease is alive.

    One atomic read (MULTI/EXEC) of every saga queue, of the ``unacked``
    hash and of the leases that lapsed (``unacked_index`` scores older than
    the visibility timeout), so a message moving between a queue and a
    worker is seen in one place or the other. A message whose lease lapsed
    belongs to a worker that died or froze: it does not count (the
    transport hands it out again, or the sweeper publishes the rest).
    """
    app = app or current_app
    limit = getattr(settings, "SAGA_BROKER_SCAN_MAX", 100_000)
    try:
        with app.pool.acquire(block=True, timeout=BROKER_TIMEOUT_S) as connection:
            channel = connection.default_channel
            if not hasattr(channel, "unacked_key"):
                return None
            keys = [
                channel._q_for_pri(queue, priority)
                for queue in sorted(saga_queues())
                for priority in channel.priority_steps
            ]
            sizes = channel.client.pipeline(transaction=False)
            for key in keys:
                sizes.llen(key)
            sizes.hlen(channel.unacked_key)
            if sum(sizes.execute()) > limit:
                logger.warning("more than %d messages in the broker: not reading them", limit)
                return None
            lapsed_before = time.time() - channel.visibility_timeout
            pipe = channel.client.pipeline(transaction=True)
            for key in keys:
                pipe.lrange(key, 0, -1)
            pipe.hgetall(channel.unacked_key)
            pipe.zrangebyscore(channel.unacked_index_key, "-inf", lapsed_before)
            *queued, held, lapsed = pipe.execute()
    except Exception as exc:
        logger.warning("cannot read the broker's queues (%s): recovery falls back to budgets", exc)
        return None
    found: set[str] = set()
    for raw in (item for items in queued for item in items):
        _collect(_saga_id(_loads(raw)), found)
    lapsed = set(lapsed)
    for tag, raw in held.items():
        if tag in lapsed:
            continue
        entry = _loads(raw)
        _collect(_saga_id(entry[0] if isinstance(entry, list) and entry else None), found)
    return found


def _collect(saga_id: str | None, found: set[str]) -> None:
    if saga_id:
        found.add(saga_id)


def _loads(raw) -> object:
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def _saga_id(message: object) -> str | None:
    """The ``saga_id`` kwarg of a Celery (protocol 2, JSON) message, if it has one."""
    if not isinstance(message, dict):
        return None
    body = message.get("body")
    try:
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
        kwargs = payload[1] if isinstance(payload, list) and len(payload) > 1 else {}
    except (TypeError, ValueError, AttributeError):
        return None
    saga_id = kwargs.get("saga_id") if isinstance(kwargs, dict) else None
    return str(saga_id) if saga_id else None


def restore_expired_leases(*, app=None) -> None:
    """Put back on their queues the messages whose worker stopped renewing their lease.

    Workers do this themselves in their event loop; the sweeper does it too,
    so a host's messages come back even while no other worker is running.
    """
    app = app or current_app
    try:
        with app.pool.acquire(block=True, timeout=BROKER_TIMEOUT_S) as connection:
            channel = connection.default_channel
            if hasattr(channel, "unacked_key"):
                channel.qos.restore_visible(start=0, num=None, interval=1)
    except Exception as exc:
        logger.warning("cannot restore expired messages (%s)", exc)
