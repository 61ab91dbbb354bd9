"""The run's own loop outlasts the database faults it injects."""

from __future__ import annotations

from io import StringIO

from django.db import OperationalError

from sagas.chaos.plan import ChaosOptions
from sagas.chaos.runner import ChaosRun
from sagas.harness import db
from sagas.harness.plugin import harness_for


def a_run(monkeypatch, *, sagas=5, concurrency=5):
    monkeypatch.setattr(db, "forget_connection", lambda: None)
    harness = harness_for("toy_saga", purpose="chaos", run_id="abcd1234")
    run = ChaosRun(
        ChaosOptions(saga_type="toy_saga", sagas=sagas, concurrency=concurrency, seed=1),
        harness,
        StringIO(),
    )
    run.started = 0.0
    return run


def test_a_booking_that_cannot_be_submitted_is_counted_and_the_run_goes_on(monkeypatch):
    run = a_run(monkeypatch)
    outcomes = {
        1: OperationalError("the database system is shutting down"),
        3: ValueError("no stock"),
    }

    def start(index, *, chaos=None):
        if index in outcomes:
            raise outcomes[index]
        return f"saga-{index}"

    monkeypatch.setattr(run.harness, "start", start)

    run._guarded("dispatch and poll", run._dispatch)  # stops at the connection error
    assert [t.saga_id for t in run.tracked] == ["saga-0"]
    assert run.db.down
    assert not run.db.ready()  # backs off before the next booking

    run.db.succeeded()
    run._guarded("dispatch and poll", run._dispatch)

    assert [t.saga_id for t in run.tracked] == ["saga-0", "saga-2", "saga-4"]
    assert run.next_index == 5
    assert [(f["index"], f["reason"]) for f in run.submit_failures] == [
        (1, "OperationalError: the database system is shutting down"),
        (3, "ValueError: no stock"),
    ]
    assert run.db_errors == {"dispatch and poll": 1}
    said = run.err.getvalue()
    assert "could not submit saga 1 at" in said
    assert "database unreachable at" in said


def test_a_poll_that_fails_is_skipped_and_the_loop_says_when_the_database_is_back(monkeypatch):
    run = a_run(monkeypatch)
    calls = []

    def poll():
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("terminating connection due to administrator command")

    run._guarded("dispatch and poll", poll)
    assert run.db.down
    run.db.next_try = 0.0  # the backoff is over
    run._guarded("dispatch and poll", poll)

    assert not run.db.down
    assert "database reachable again at" in run.err.getvalue()


def test_a_step_that_needs_no_database_does_not_end_the_backoff(monkeypatch):
    run = a_run(monkeypatch)
    run._guarded("dispatch and poll", _raise_operational)

    run._guarded("the plug-in's tick", lambda: None, probe=False)

    assert run.db.down
    assert not run.db.ready()


def _raise_operational():
    raise OperationalError("the database system is starting up")
