"""Retention of the bookings context: old Idempotency-Keys go, sagas of open bookings stay.

Bookings reference their sagas by id only (``saga_id``, ``cancel_saga_id``), and
bookings themselves are never deleted. Once the engine deletes a saga
(``SAGA_RETENTION_SAGAS_DAYS``), its booking keeps the id and the saga's link
answers 404. That is acceptable only for a booking that can no longer change:
cancelling a CONFIRMED booking reads the card token from its trip saga, so
:func:`sagas_of_settled_bookings` keeps every saga of a booking that is not
REJECTED or CANCELLED.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from bookings.models import Booking, IdempotencyKey
from sagas.models import Saga
from sagas.retention import (
    Budget,
    RetentionSettings,
    delete_in_batches,
    int_setting,
    keep_sagas,
    sagas_purge_expired,
)

logger = logging.getLogger(__name__)

SETTLED = (Booking.Status.REJECTED, Booking.Status.CANCELLED)


@keep_sagas
def sagas_of_settled_bookings(sagas: QuerySet[Saga]) -> QuerySet[Saga]:
    """The expired sagas bookings let go: none of an open booking's (trip or cancellation)."""
    open_bookings = Booking.objects.exclude(status__in=SETTLED)
    return sagas.exclude(Exists(open_bookings.filter(saga_id=OuterRef("pk")))).exclude(
        Exists(open_bookings.filter(cancel_saga_id=OuterRef("pk")))
    )


def expired_idempotency_keys(*, now: datetime) -> QuerySet[IdempotencyKey]:
    ttl = int_setting("BOOKINGS_IDEMPOTENCY_KEY_TTL_S", 86_400, minimum=60)
    return IdempotencyKey.objects.filter(created_at__lt=now - timedelta(seconds=ttl))


def idempotency_keys_purge(*, dry_run: bool = False, now: datetime | None = None) -> dict[str, int]:
    """Delete Idempotency-Keys older than ``BOOKINGS_IDEMPOTENCY_KEY_TTL_S``, in batches.

    Batch size and time budget are the engine's (``SAGA_RETENTION_BATCH``,
    ``SAGA_RETENTION_MAX_S``). Returns the keys deleted (or due, with
    ``dry_run``) and how many are still due when the budget ran out.
    """
    config = RetentionSettings.load()
    keys = expired_idempotency_keys(now=now or timezone.now())
    started = time.monotonic()
    if dry_run:
        counts = {"idempotency_keys": keys.count(), "left": 0}
    else:
        purged = delete_in_batches(
            keys,
            by="created_at",
            batch_size=config.batch_size,
            budget=Budget(config.max_seconds),
        )
        counts = {
            "idempotency_keys": purged.deleted[IdempotencyKey._meta.label],
            "left": purged.left,
        }
    logger.info(
        "retention%s: %s idempotency keys %s in %.1f s; %s left",
        " (dry run)" if dry_run else "",
        counts["idempotency_keys"],
        "due" if dry_run else "deleted",
        time.monotonic() - started,
        counts["left"],
    )
    return counts


def retention_purge(*, dry_run: bool = False) -> dict[str, int]:
    """Beat's two retention jobs at once (``manage.py purge_expired``): the engine's, then ours."""
    engine = sagas_purge_expired(dry_run=dry_run)
    keys = idempotency_keys_purge(dry_run=dry_run)
    return {**engine, **keys, "left": engine["left"] + keys["left"]}
