"""The bench and the seeder: flags, the SQL counter, the report's shape, exact seeding.

No timing is asserted here: speed targets live in the bench's own output.
"""

from __future__ import annotations

import json
from numbers import Number

import pytest
from celery import current_app
from celery.utils.nodenames import host_format
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import Count

from sagas.bench.sqlcount import (
    BOOKKEEPING,
    DOMAIN,
    RESULT_BACKEND,
    TRANSACTION,
    classify,
    count_sql,
    is_savepoint,
)
from sagas.bench.workers import NODE_NAME
from sagas.harness.plugin import harness_for
from sagas.harness.processes import database_url
from sagas.models import Saga, SagaLog

TRIP_STEPS = ["reserve_flight", "reserve_hotel", "reserve_car", "charge_payment", "confirm_booking"]


# --- flags ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sagas", "0"], "--sagas must be at least 1"),
        (["--submitters", "0"], "--submitters must be between 1 and 64"),
        (["--lone", "0"], "--lone must be at least 1"),
        (["--failures", "0"], "--failures must be at least 1"),
        (["--half-load-sagas", "0"], "--half-load-sagas must be at least 1"),
        (
            ["--half-load-sagas", "5", "--skip-half-load"],
            "--half-load-sagas and --skip-half-load contradict each other",
        ),
        (["--warmup", "-1"], "--warmup must be 0 or more"),
        (["--sagas", "3", "--rounds", "4"], "--rounds must be between 1 and --sagas"),
        (["--concurrency", "0"], "--concurrency must be between 1 and 32"),
        (["--timeout", "0"], "--timeout must be a positive number of seconds"),
        (["--runs", "3"], "--runs belongs to --scale"),
        (["--scale", "--sagas", "5"], "--scale times pages only; it takes no --sagas"),
        (["--scale", "--runs", "0"], "--runs must be between 1 and 100"),
        (["--json", "/no/such/directory/report.json"], "directory /no/such/directory does not"),
    ],
)
def test_bench_refuses_bad_flags_with_a_clear_error(args, message):
    with pytest.raises(CommandError, match=message.replace("/", ".")):
        call_command("bench", *args)


def test_bench_refuses_a_directory_as_json_path(tmp_path):
    with pytest.raises(CommandError, match="is a directory; name a file"):
        call_command("bench", "--json", str(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sagas", "0"], "--sagas must be at least 1"),
        (["--logs-per-saga", "0"], "--logs-per-saga must be between 1 and 50"),
        (["--days", "0"], "--days must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_seed_sagas_refuses_bad_flags(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("seed_sagas", *args)


# --- the SQL counter -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "category"),
    [
        ('SELECT "sagas_saga"."id" FROM "sagas_saga" WHERE "id" = %s FOR UPDATE', BOOKKEEPING),
        ('INSERT INTO "sagas_sagalog" ("saga_id", "step") VALUES (%s, %s)', BOOKKEEPING),
        ('UPDATE "inventory_item" SET "available" = ("available" - 1)', DOMAIN),
        ('SELECT 1 FROM "bookings_bookingline" WHERE "booking_id" = %s', DOMAIN),
        ('SAVEPOINT "s123_x1"', DOMAIN),
        ('SELECT * FROM "django_celery_results_taskresult" WHERE "task_id" = %s', RESULT_BACKEND),
        ("BEGIN IMMEDIATE", TRANSACTION),
    ],
)
def test_statements_are_classified_by_the_tables_they_name(sql, category):
    assert classify(sql) == category


def test_savepoints_are_recognised():
    assert is_savepoint('SAVEPOINT "s1"')
    assert is_savepoint('RELEASE SAVEPOINT "s1"')
    assert is_savepoint('ROLLBACK TO SAVEPOINT "s1"')
    assert not is_savepoint('SELECT "savepoint" FROM "t"')


@pytest.mark.django_db(transaction=True)
def test_the_sql_count_runs_one_saga_through_the_step_wrapper():
    harness = harness_for("trip_booking", purpose="bench", run_id="unit")
    harness.prepare(sagas=10)

    counted = count_sql(harness)

    actions = [row for row in counted["steps"] if row["phase"] == "action"]
    compensations = [row for row in counted["steps"] if row["phase"] == "compensation"]
    bare = [row for row in counted["steps"] if row["phase"] == "bare"]
    assert [row["step"] for row in actions] == TRIP_STEPS
    assert [row["step"] for row in compensations] == [
        "refund_payment",
        "release_car",
        "release_hotel",
        "release_flight",
    ]
    # Claim the saga (one conditional UPDATE ... RETURNING) and append the log
    # row: nothing else. A gateway step reads the saga and marks its call in
    # flight in one statement, then moves the counter and closes that row in
    # one; SQLite has no data-modifying WITH, so there each takes two.
    postgres = connection.vendor == "postgresql"
    gateway = {("action", "charge_payment"): 4, ("compensation", "refund_payment"): 3}
    for row in actions + compensations:
        expected = 2 if postgres else gateway.get((row["phase"], row["step"]), 2)
        assert row[BOOKKEEPING] == expected, row["statements"]
        assert row[DOMAIN] > 0
        assert row["total"] == row[BOOKKEEPING] + row[DOMAIN]
        for line in row["statements"]:
            # A listed statement is cut short: a WITH names the tables late.
            saga_tables = "sagas_saga" in line or line.startswith(f"{BOOKKEEPING}: WITH ")
            assert line.startswith(BOOKKEEPING) == saga_tables, line
    assert all(row[BOOKKEEPING] == 0 for row in bare)
    # The bare chain does the saga's domain work, statement for statement.
    assert [row[DOMAIN] for row in bare] == [row[DOMAIN] for row in actions]
    assert counted["bookkeeping_per_step_max"] == 2
    assert counted["bookkeeping_external_action_max"] == (2 if postgres else 4)
    assert counted["result_backend_per_task"] >= 1
    assert counted["saga_level"]["errback"][BOOKKEEPING] >= 1
    sagas = Saga.objects.filter(saga_type="trip_booking")
    assert sorted(sagas.values_list("status", flat=True)) == ["COMPENSATED", "COMPLETED"]


# --- workers -------------------------------------------------------------------------


def test_workers_get_the_database_url_of_the_bench_connection():
    postgres = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "bench",
        "USER": "bob",
        "PASSWORD": "p@ss word",
        "HOST": "db.internal",
        "PORT": 5433,
    }
    assert database_url(postgres) == "postgres://bob:p%40ss%20word@db.internal:5433/bench"
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app/db.sqlite3"}
    assert database_url(sqlite) == "sqlite:////srv/app/db.sqlite3"


# --- a whole run ---------------------------------------------------------------------

NUMBERS = {
    "sagas_per_s": None,
    "bare_chains_per_s": None,
    "overhead_ratio": None,
    "worker_rss_mb": None,
    "latency_ms": ("p50", "p95", "p99"),
    "half_load_latency_ms": ("p50", "p95", "p99"),
    "lone_latency_ms": ("p50", "p95", "p99"),
    "compensation_latency_ms": ("p50", "p99"),
}


@pytest.mark.saga
@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_a_tiny_bench_run_writes_every_figure_of_the_report(tmp_path, capsys):
    path = tmp_path / "bench.json"
    call_command(
        "bench",
        *("--sagas", "3", "--lone", "2", "--failures", "2", "--half-load-sagas", "2"),
        *("--warmup", "0", "--json", str(path)),
        # The suite's own worker may be running; it shares the work, not the figures' shape.
        "--allow-foreign-workers",
        "--purge",
    )

    report = json.loads(path.read_text())
    for key, fields in NUMBERS.items():
        if fields is None:
            assert isinstance(report[key], Number), key
        else:
            for field in fields:
                assert isinstance(report[key][field], Number), (key, field)
    assert report["worker_rss_mb"] > 0
    for phase in ("action", "compensation"):
        for field in ("total", "bookkeeping", "domain"):
            assert isinstance(report["sql_per_step"][phase][field], Number), (phase, field)
    assert report["sql_per_step"]["bookkeeping_per_step_max"] == 2
    machine = report["machine"]
    for key in ("cores", "memory_mb", "python", "database", "redis"):
        assert machine[key], key
    assert {
        "sagas_per_s",
        "overhead_ratio",
        "lone_latency_ms.p50",
        "lone_latency_ms.p99",
        "half_load_latency_ms.p99",
        "compensation_latency_ms.p99",
        "sql_per_step.bookkeeping_per_step_max",
    } <= set(report["targets"])
    assert all(isinstance(t["pass"], bool) for t in report["targets"].values())
    assert "targets:" in capsys.readouterr().out
    # The workers it started are gone.
    assert not current_app.control.ping(destination=[host_format(NODE_NAME)], timeout=0.5)


# --- seeding and --scale -------------------------------------------------------------


@pytest.mark.django_db
def test_seed_sagas_inserts_exactly_the_rows_asked_for(capsys):
    call_command("seed_sagas", "--sagas", "30", "--logs-per-saga", "3", "--batch-size", "7")

    assert Saga.objects.count() == 30
    assert SagaLog.objects.count() == 90
    per_saga = set(Saga.objects.annotate(n=Count("logs")).values_list("n", flat=True))
    assert per_saga == {3}
    assert set(Saga.objects.values_list("status", flat=True)) <= set(Saga.Status.values)
    assert set(Saga.objects.values_list("saga_type", flat=True)) <= {
        "trip_booking",
        "booking_cancellation",
    }
    finished = Saga.objects.filter(status__in=Saga.TERMINAL)
    assert not finished.filter(finished_at__isnull=True).exists()
    assert not finished.filter(duration_ms__isnull=True).exists()
    assert "seeded 30 sagas and 90 saga log rows" in capsys.readouterr().out


@pytest.mark.django_db
def test_bench_scale_times_every_page_over_the_seeded_sagas(tmp_path, capsys):
    call_command("seed_sagas", "--sagas", "40", "--logs-per-saga", "5")
    path = tmp_path / "scale.json"
    seeded = dict(Saga.objects.values_list("id", "updated_at"))

    call_command("bench", "--scale", "--runs", "1", "--stalled", "300", "--json", str(path))

    report = json.loads(path.read_text())
    assert report["rows"] == {"sagas": 40, "saga_logs": 200}
    recovery = report["recovery"]
    assert (recovery["stalled"], recovery["resumed"]) == (300, 300)
    assert recovery["republished_messages"] == 300
    assert recovery["pass"] is True
    assert report["targets"]["stalled sagas moved on"]["target"] == "<= 120"
    # Its own sagas are gone, and the seeded ones (some in flight) untouched by its sweeps.
    assert dict(Saga.objects.values_list("id", "updated_at")) == seeded
    pages = report["pages"]
    for name in (
        "admin saga changelist",
        "admin saga change page",
        "GET /api/sagas/?status=FAILED",
        "GET /api/sagas/stats/",
    ):
        assert isinstance(pages[name]["median_ms"], Number), name
        assert pages[name]["slowest_query"]["sql"], name
        assert report["targets"][name]["target"] == "< 300"
    out = capsys.readouterr().out
    assert "slowest statement" in out
    assert "the targets are for 1,000,000" in out
    assert "sweeper: 300 of 300 stalled sagas moved on in" in out
