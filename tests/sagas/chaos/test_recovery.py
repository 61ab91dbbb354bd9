"""Recovery figures: which sagas a fault caught, and when each moved on."""

from __future__ import annotations

from sagas.chaos.recovery import RecoveryTracker


def running(steps: int) -> tuple[str, int, int]:
    return ("RUNNING", steps, 0)


def test_each_fault_counts_the_open_sagas_and_the_time_until_each_moved_on():
    tracker = RecoveryTracker()
    for saga in ("a", "b", "c"):
        tracker.observe(saga, running(1), at_s=9.9, terminal=False)

    tracker.fault("worker_host_kill", at_s=10.0, open_ids=["a", "b", "c"])
    tracker.observe("a", running(1), at_s=10.1, terminal=False)  # no change: still waiting
    tracker.observe("a", running(2), at_s=10.5, terminal=False)  # moved on after 0.5 s
    tracker.observe("b", ("COMPENSATING", 1, 0), at_s=12.0, terminal=False)  # 2 s
    tracker.observe("c", ("COMPLETED", 5, 0), at_s=14.0, terminal=True)  # 4 s
    tracker.observe("a", running(3), at_s=15.0, terminal=False)  # later progress: no change

    [fault] = tracker.figures({})["faults"]
    assert fault == {
        "kind": "worker_host_kill",
        "at_s": 10.0,
        "detail": "",
        "affected": 3,
        "moved_on": 3,
        "never_moved_on": 0,
        "recovered_s": 4.0,
        "moving_on_p50_s": 2.0,
        "moving_on_p99_s": 4.0,
    }


def test_an_undo_cursor_step_counts_as_moving_on_and_a_saga_that_never_moves_is_reported():
    tracker = RecoveryTracker()
    tracker.observe("a", ("COMPENSATING", 3, 0), at_s=1.0, terminal=False)
    tracker.observe("b", running(2), at_s=1.0, terminal=False)

    tracker.fault("broker_flush", at_s=2.0, open_ids=["a", "b"])
    tracker.observe("a", ("COMPENSATING", 3, 1), at_s=2.3, terminal=False)
    tracker.observe("b", running(2), at_s=30.0, terminal=False)

    [fault] = tracker.figures({})["faults"]
    assert fault["affected"] == 2
    assert fault["moved_on"] == 1
    assert fault["never_moved_on"] == 1
    assert fault["recovered_s"] is None  # one never moved on
    assert fault["moving_on_p50_s"] == 0.3


def test_a_saga_not_seen_before_the_fault_is_measured_from_its_first_sighting():
    tracker = RecoveryTracker()
    tracker.fault("db_connections_drop", at_s=5.0, open_ids=["new"])

    tracker.observe("new", ("PENDING", 0, 0), at_s=5.1, terminal=False)  # its state then
    tracker.observe("new", running(0), at_s=6.0, terminal=False)

    [fault] = tracker.figures({})["faults"]
    assert fault["recovered_s"] == 1.0


def test_one_saga_can_be_caught_by_two_faults():
    tracker = RecoveryTracker()
    tracker.observe("a", running(1), at_s=0.5, terminal=False)
    tracker.fault("worker_kill", at_s=1.0, open_ids=["a"])
    tracker.fault("database_restart", at_s=1.5, open_ids=["a"])

    tracker.observe("a", running(2), at_s=3.0, terminal=False)

    kill, restart = tracker.figures({})["faults"]
    assert (kill["recovered_s"], restart["recovered_s"]) == (2.0, 1.5)


def test_extra_latency_is_over_the_median_of_unaffected_sagas_and_never_negative():
    tracker = RecoveryTracker()
    tracker.fault("worker_freeze", at_s=1.0, open_ids=["slow", "slower", "quick"])
    durations = {
        # Unaffected: median 1000 ms.
        "u1": 900,
        "u2": 1000,
        "u3": 1100,
        # Affected.
        "slow": 3000,
        "slower": 11000,
        "quick": 800,
    }

    figures = tracker.figures(durations)

    assert figures["affected_sagas"] == 3
    assert figures["unaffected_median_ms"] == 1000
    # Extra: 2000, 10000 and 0 (800 - 1000, floored): p50 2000, p99 10000.
    assert figures["extra_latency_ms"] == {"p50": 2000, "p99": 10000}


def test_without_faults_or_unaffected_sagas_there_is_no_extra_latency():
    assert RecoveryTracker().figures({"a": 100})["extra_latency_ms"] == {"p50": None, "p99": None}
    tracker = RecoveryTracker()
    tracker.fault("broker_flush", at_s=0.0, open_ids=["a"])
    figures = tracker.figures({"a": 100})
    assert figures["unaffected_median_ms"] is None
    assert figures["extra_latency_ms"] == {"p50": None, "p99": None}


def test_an_attempt_a_worker_recorded_after_the_fault_counts_as_moving_on():
    """A compensation retrying by design is worked on, not stuck, though its state holds."""
    tracker = RecoveryTracker()
    for saga in ("retrying", "slow", "stuck"):
        tracker.observe(saga, ("COMPENSATING", 2, 2), at_s=4.0, terminal=False)
    event = tracker.fault("worker_host_kill", at_s=5.0, open_ids=["retrying", "slow", "stuck"])
    tracker.observe("slow", ("COMPENSATING", 2, 1), at_s=30.0, terminal=False)

    event.worked_on("retrying", 3.0)  # its next attempt ended 3 s after the fault
    event.worked_on("slow", 20.0)  # an attempt before the state change was seen
    event.worked_on("slow", 40.0)  # a later one changes nothing

    [fault] = tracker.figures({})["faults"]
    assert (fault["moved_on"], fault["never_moved_on"]) == (2, 1)
    assert fault["recovered_s"] is None  # "stuck" never moved on
    assert sorted(event.moved_on.values()) == [3.0, 20.0]
