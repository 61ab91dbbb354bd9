"""The barrier's statements: claims, the external call's mark and close, and their races.

Plain ``django_db`` for what one session sees; the races run two sessions
against PostgreSQL (``transaction=True``), where a claim holds the saga's row
until its transaction ends.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sagas import barrier
from sagas.models import Saga, SagaLog
from tests.sagas.support import act

Status = Saga.Status
LogStatus = SagaLog.Status


def _saga(make_booking, **changes) -> Saga:
    _booking, saga = make_booking()
    if changes:
        Saga.objects.filter(pk=saga.pk).update(**changes)
        saga.refresh_from_db()
    return saga


def _marker(saga: Saga, index: int, step: str) -> SagaLog:
    now = timezone.now()
    return SagaLog(
        saga_id=saga.pk,
        step=step,
        step_index=index,
        phase=SagaLog.Phase.ACTION,
        status=LogStatus.STARTED,
        may_have_effect=True,
        task_id="t-1",
        worker="w@test",
        started_at=now,
        finished_at=now,
    )


@pytest.mark.django_db
class TestClaims:
    def test_a_claim_moves_the_counter_and_returns_the_row_as_moved(self, make_booking):
        saga = _saga(make_booking)

        with CaptureQueriesContext(connection) as queries:
            claimed = barrier.claim_action(saga.pk, index=0, step="reserve_flight", last=False)

        assert len(queries) == 1  # one conditional UPDATE ... RETURNING
        with CaptureQueriesContext(connection) as reads:
            # What the wrapper, fault plans, tracing and steps read comes with the claim.
            assert (claimed.pk, claimed.status, claimed.steps_done) == (saga.pk, Status.RUNNING, 1)
            assert claimed.context == saga.context  # converted like a query's
            assert (claimed.saga_type, claimed.business_key) == (saga.saga_type, saga.business_key)
            assert (claimed.undo_cursor, claimed.round, claimed.trace_context) == (
                saga.undo_cursor,
                saga.round,
                saga.trace_context,
            )
        assert len(reads) == 0
        # The rest is deferred: loaded on first access, as the row is now.
        assert (
            claimed.get_deferred_fields()
            == {f.attname for f in Saga._meta.concrete_fields} - barrier.CLAIMED_FIELDS
        )
        with CaptureQueriesContext(connection) as reads:
            assert claimed.current_step == "reserve_flight"
        assert len(reads) == 1
        assert claimed.started_at is not None
        assert claimed.finished_at is None
        saga.refresh_from_db()
        assert (saga.status, saga.steps_done, saga.started_at) == (
            Status.RUNNING,
            1,
            claimed.started_at,
        )

    @pytest.mark.parametrize(
        ("changes", "index"),
        [
            ({}, 1),  # not due yet
            ({"steps_done": 1, "status": Status.RUNNING}, 0),  # already done
            ({"status": Status.COMPENSATING}, 0),  # too late
        ],
    )
    def test_a_claim_that_is_not_due_matches_nothing_and_writes_nothing(
        self, make_booking, changes, index
    ):
        saga = _saga(make_booking, **changes)
        before = Saga.objects.filter(pk=saga.pk).values().get()

        assert barrier.claim_action(saga.pk, index=index, step="x", last=False) is None

        assert Saga.objects.filter(pk=saga.pk).values().get() == before

    def test_the_last_claim_completes_the_saga_and_its_end_is_stamped_after_the_work(
        self, make_booking
    ):
        saga = _saga(make_booking, steps_done=4, status=Status.RUNNING)
        # Started 1.5 s ago by the database's own clock.
        Saga.objects.filter(pk=saga.pk).update(started_at=timezone.now() - timedelta(seconds=1.5))

        claimed = barrier.claim_action(saga.pk, index=4, step="confirm_booking", last=True)
        assert (claimed.status, claimed.steps_done) == (Status.COMPLETED, 5)
        assert claimed.finished_at is None  # the step's work is still to come
        row = _marker(saga, 4, "confirm_booking")
        row.status = LogStatus.SUCCEEDED
        with CaptureQueriesContext(connection) as queries:
            barrier.end_saga(saga.pk, row=row)

        assert len(queries) == (1 if connection.vendor == "postgresql" else 2)
        saga.refresh_from_db()
        elapsed = (saga.finished_at - saga.started_at).total_seconds() * 1000
        # SQLite keeps the end to the millisecond: up to 1 ms short either way.
        assert 1500 - 2 <= saga.duration_ms <= 1500 + 5000
        assert abs(saga.duration_ms - elapsed) <= 2
        assert SagaLog.objects.get(pk=row.pk).status == LogStatus.SUCCEEDED

    def test_a_saga_of_one_step_has_a_duration_of_zero_or_more(self, make_booking):
        saga = _saga(make_booking, steps_done=4)  # PENDING, never started: started_at is NULL

        claimed = barrier.claim_action(saga.pk, index=4, step="confirm_booking", last=True)
        row = _marker(saga, 4, "confirm_booking")
        row.status = LogStatus.SUCCEEDED
        barrier.end_saga(saga.pk, row=row)

        assert claimed.status == Status.COMPLETED
        saga.refresh_from_db()
        assert saga.started_at is not None
        assert saga.duration_ms >= 0
        assert saga.finished_at >= saga.started_at

    @pytest.mark.parametrize(
        ("cursor", "due"),
        [(3, True), (2, True), (4, False), (1, False), (5, False)],
    )
    def test_a_compensation_is_due_between_its_step_and_the_next_one_with_a_compensation(
        self, make_booking, cursor, due
    ):
        # Step 1 is undone at cursor 2; and at 3 only if step 2 had no compensation.
        # Pretend it has none: due_below is the next step up that has one (3).
        saga = _saga(make_booking, status=Status.COMPENSATING, undo_cursor=cursor)

        claimed = barrier.claim_compensation(saga.pk, index=1, name="release_hotel", due_below=3)

        assert (claimed is not None) == due
        saga.refresh_from_db()
        assert saga.undo_cursor == (1 if due else cursor)


@pytest.mark.django_db
class TestExternalCalls:
    def test_opening_a_due_call_marks_it_in_flight(self, make_booking):
        saga = _saga(make_booking, steps_done=3, status=Status.RUNNING)

        with CaptureQueriesContext(connection) as queries:
            read, marker = barrier.open_call(
                saga.pk, index=3, marker=_marker(saga, 3, "charge_payment")
            )

        assert read.pk == saga.pk
        assert read.context == saga.context
        if connection.vendor == "postgresql":
            assert len(queries) == 1  # the read and the mark, in one statement
            assert marker is not None
            assert marker.pk is not None
            row = SagaLog.objects.get(pk=marker.pk)
            assert (row.step, row.status, row.may_have_effect) == (
                "charge_payment",
                LogStatus.STARTED,
                True,
            )
        else:
            assert marker is None  # read only: the caller checks, then marks
            assert not SagaLog.objects.filter(saga=saga).exists()

    @pytest.mark.parametrize(
        "changes",
        [{"steps_done": 4, "status": Status.RUNNING}, {"steps_done": 3, "status": Status.FAILED}],
    )
    def test_a_call_that_is_not_due_is_read_and_not_marked(self, make_booking, changes):
        saga = _saga(make_booking, **changes)

        read, marker = barrier.open_call(
            saga.pk, index=3, marker=_marker(saga, 3, "charge_payment")
        )

        assert read.pk == saga.pk
        assert marker is None
        assert not SagaLog.objects.filter(saga=saga).exists()

    def test_a_saga_with_a_fault_plan_is_only_read_so_its_faults_strike_first(self, make_booking):
        _booking, saga = make_booking(chaos={"fail": ["charge_payment"]})
        Saga.objects.filter(pk=saga.pk).update(steps_done=3, status=Status.RUNNING)

        read, marker = barrier.open_call(
            saga.pk, index=3, marker=_marker(saga, 3, "charge_payment")
        )

        assert read.pk == saga.pk
        assert marker is None
        assert not SagaLog.objects.filter(saga=saga).exists()

    def test_a_missing_saga_opens_nothing(self, make_booking):
        saga = _saga(make_booking)
        missing = Saga(pk="00000000-0000-0000-0000-000000000000")

        assert barrier.open_call(missing.pk, index=0, marker=_marker(saga, 0, "x")) == (None, None)

    def test_closing_a_call_moves_the_counter_and_closes_its_row_together(self, make_booking):
        saga = _saga(make_booking, steps_done=3, status=Status.RUNNING)
        marker = _marker(saga, 3, "charge_payment")
        marker.save()
        marker.status, marker.result, marker.may_have_effect = LogStatus.SUCCEEDED, {"a": 1}, False

        assert barrier.close_call(
            saga.pk, index=3, step="charge_payment", last=False, marker=marker
        )

        saga.refresh_from_db()
        row = SagaLog.objects.get(pk=marker.pk)
        assert (saga.steps_done, saga.current_step) == (4, "charge_payment")
        assert (row.status, row.result, row.may_have_effect) == (
            LogStatus.SUCCEEDED,
            {"a": 1},
            False,
        )

    def test_a_call_closed_after_the_saga_moved_on_writes_neither(self, make_booking):
        saga = _saga(make_booking, steps_done=3, status=Status.COMPENSATING, undo_cursor=3)
        marker = _marker(saga, 3, "charge_payment")
        marker.save()
        marker.status = LogStatus.SUCCEEDED

        assert not barrier.close_call(
            saga.pk, index=3, step="charge_payment", last=False, marker=marker
        )

        saga.refresh_from_db()
        assert (saga.status, saga.steps_done) == (Status.COMPENSATING, 3)
        assert SagaLog.objects.get(pk=marker.pk).status == LogStatus.STARTED

    def test_closing_a_compensation_call_inserts_its_row_only_if_the_cursor_moved(
        self, make_booking
    ):
        saga = _saga(make_booking, status=Status.COMPENSATING, undo_cursor=4)
        row = _marker(saga, 3, "refund_payment")
        row.phase, row.status, row.result, row.round = (
            SagaLog.Phase.COMPENSATION,
            LogStatus.SKIPPED,
            None,
            1,
        )

        assert barrier.close_compensation_call(
            saga.pk, index=3, name="refund_payment", due_below=4, row=row
        )
        # Its copy finds the cursor moved: nothing written.
        copy = _marker(saga, 3, "refund_payment")
        copy.phase, copy.status = SagaLog.Phase.COMPENSATION, LogStatus.SUCCEEDED
        assert not barrier.close_compensation_call(
            saga.pk, index=3, name="refund_payment", due_below=4, row=copy
        )

        saga.refresh_from_db()
        assert saga.undo_cursor == 3
        rows = SagaLog.objects.filter(saga=saga).values_list("step", "status", "result")
        assert list(rows) == [("refund_payment", LogStatus.SKIPPED, None)]


# --- two sessions at once (PostgreSQL row locks) ----------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_copy_of_a_running_step_waits_for_it_then_finds_the_step_done(trip, make_booking):
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL only")
    _booking, saga = make_booking()
    claimed, release = threading.Event(), threading.Event()

    def first() -> bool:
        try:
            with transaction.atomic():
                won = barrier.claim_action(saga.pk, index=0, step="reserve_flight", last=False)
                claimed.set()
                release.wait(10)  # the step's body, still running
                return won is not None
        finally:
            connections.close_all()

    def copy() -> dict:
        try:
            claimed.wait(10)
            return act(trip, saga, "reserve_flight")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=2) as pool:
        running = pool.submit(first)
        duplicate = pool.submit(copy)
        claimed.wait(10)
        # The copy's claim waits on the row the first claim holds.
        with pytest.raises(TimeoutError):
            duplicate.result(timeout=0.5)
        release.set()
        assert running.result(timeout=10) is True
        reply = duplicate.result(timeout=10)

    assert reply["outcome"] == LogStatus.DUPLICATE
    saga.refresh_from_db()
    assert saga.steps_done == 1
    assert list(SagaLog.objects.filter(saga=saga).values_list("status", flat=True)) == [
        LogStatus.DUPLICATE
    ]
