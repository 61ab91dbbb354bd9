"""The harness's own database work outlasts a restart: close, back off, try again."""

from __future__ import annotations

import pytest
from django.db import InterfaceError, OperationalError

from sagas.harness import db


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


CLOSED = OperationalError("server closed the connection unexpectedly")


def failing(times: int, exc: Exception = CLOSED):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "rows"

    return fn, calls


def test_a_call_is_retried_with_growing_waits_until_the_database_answers(monkeypatch):
    closed = []
    monkeypatch.setattr(db, "forget_connection", lambda: closed.append(1))
    clock = Clock()
    fn, calls = failing(5, InterfaceError("connection already closed"))

    assert db.retry_db(fn, what="poll", sleep=clock.sleep, clock=clock) == "rows"

    assert len(calls) == 6
    assert len(closed) == 5  # a new session after every failure
    assert clock.slept == [0.2, 0.4, 0.8, 1.6, 3.0]


def test_retrying_gives_up_after_its_budget_naming_what_failed(monkeypatch):
    monkeypatch.setattr(db, "forget_connection", lambda: None)
    clock = Clock()
    fn, _ = failing(1000)

    with pytest.raises(db.DatabaseUnavailable, match="the report: the database did not answer"):
        db.retry_db(fn, what="the report", budget_s=10, sleep=clock.sleep, clock=clock)

    assert clock.now <= 10


def test_other_errors_are_not_retried(monkeypatch):
    fn, calls = failing(1, ValueError("a bug"))

    with pytest.raises(ValueError, match="a bug"):
        db.retry_db(fn, what="poll")

    assert len(calls) == 1


def test_the_loops_backoff_doubles_while_down_and_resets_once_it_answers(monkeypatch):
    monkeypatch.setattr(db, "forget_connection", lambda: None)
    clock = Clock()
    backoff = db.Backoff(clock=clock)
    assert backoff.ready()
    assert not backoff.down

    backoff.failed(OperationalError("terminating connection due to administrator command\nmore"))
    assert backoff.down
    assert not backoff.ready()
    assert backoff.last_error == (
        "OperationalError: terminating connection due to administrator command"
    )
    clock.now += 0.2
    assert backoff.ready()
    for _ in range(6):
        backoff.failed(OperationalError("down"))
    assert backoff.wait == db.LONGEST_WAIT_S

    backoff.succeeded()
    assert backoff.ready()
    assert not backoff.down
