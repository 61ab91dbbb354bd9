"""The harness's own database work, made to outlast a database restart or a dropped session.

A chaos run restarts PostgreSQL or terminates sessions while its monitor
loop keeps querying. After such a fault the first query on the old
connection fails (OperationalError or InterfaceError), and Django marks the
connection unusable only after that error: the harness closes it, waits a
little longer each time, and tries again with a new session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.db import connection

from sagas.errors import DATABASE_UNAVAILABLE

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_WAIT_S = 0.2
LONGEST_WAIT_S = 3.0
RETRY_BUDGET_S = 90.0  # a restart of a local PostgreSQL takes seconds; a stuck one, longer

CONNECTION_ERRORS = DATABASE_UNAVAILABLE


class DatabaseUnavailable(Exception):
    """The database could not be reached within the retry budget."""


def forget_connection() -> None:
    """Drop this thread's connection, so the next query opens a new session.

    Never inside ``atomic()``: the transaction would be lost silently.
    """
    if connection.in_atomic_block:
        return
    try:
        connection.close()
    except CONNECTION_ERRORS:
        # Closing a connection whose server went away can fail; it is gone either way.
        connection.connection = None


def retry_db(
    fn: Callable[[], T],
    *,
    what: str,
    budget_s: float = RETRY_BUDGET_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``fn()``, retried with backoff while the database is unreachable.

    ``fn`` must be safe to run again (reads, or writes that are idempotent).
    Raises DatabaseUnavailable naming ``what`` once ``budget_s`` is spent.
    """
    deadline = clock() + budget_s
    wait = FIRST_WAIT_S
    while True:
        try:
            return fn()
        except CONNECTION_ERRORS as exc:
            if connection.in_atomic_block:
                raise
            forget_connection()
            if clock() + wait > deadline:
                raise DatabaseUnavailable(
                    f"{what}: the database did not answer for {budget_s:g}s ({exc})"
                ) from exc
            logger.info("%s: database unavailable (%s); retrying in %.1fs", what, exc, wait)
            sleep(wait)
            wait = min(wait * 2, LONGEST_WAIT_S)


def describe_error(exc: BaseException) -> str:
    """The error's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Backoff:
    """For a loop that must keep going while the database is away: when to try it again.

    ``failed()`` after a connection error closes the connection and pushes the
    next attempt back (doubling, bounded); ``ready()`` says whether to try now;
    ``succeeded()`` resets it.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.wait = 0.0
        self.next_try = 0.0
        self.failures = 0
        self.last_error = ""

    def ready(self) -> bool:
        return self.clock() >= self.next_try

    @property
    def down(self) -> bool:
        return self.wait > 0

    def failed(self, exc: BaseException) -> None:
        forget_connection()
        self.failures += 1
        self.last_error = describe_error(exc)
        self.wait = min(max(self.wait * 2, FIRST_WAIT_S), LONGEST_WAIT_S)
        self.next_try = self.clock() + self.wait

    def succeeded(self) -> None:
        self.wait = 0.0
        self.next_try = 0.0
