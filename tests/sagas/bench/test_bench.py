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

from sagas.bench import hops as hops_module
from sagas.bench.pipeline import VARIANTS
from sagas.bench.profile import hops, profile_summary
from sagas.bench.report import TARGETS, judge, target_lines
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
        (["--profile-sagas", "-1"], "--profile-sagas must be between 0 and 1000"),
        (["--tracing", "otlp"], "argument --tracing: invalid choice: 'otlp'"),
        (["--scale", "--tracing", "drop"], "--scale times pages only; it takes no --tracing"),
        (["--hops", "--failures", "3"], "--hops takes no --failures"),
        (["--hops", "--rounds", "0"], "--rounds must be between 1 and 20"),
        (["--pipeline", "--lone", "3"], "--pipeline takes no --lone"),
        (["--pipeline", "--profile-sagas", "2"], "--pipeline takes no --profile-sagas"),
        (["--pipeline", "--rounds", "21"], "--rounds must be between 1 and 20"),
        (["--pipeline", "--hops"], "--hops and --pipeline are two different runs: pick one"),
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
    # one, and the last step stamps the saga's end in the statement that logs
    # it; SQLite has no data-modifying WITH, so there each of those takes two.
    postgres = connection.vendor == "postgresql"
    sqlite_counts = {
        ("action", "charge_payment"): 4,
        ("action", "confirm_booking"): 3,
        ("compensation", "refund_payment"): 3,
    }
    for row in actions + compensations:
        expected = 2 if postgres else sqlite_counts.get((row["phase"], row["step"]), 2)
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
    assert counted["bookkeeping_per_step_max"] == (2 if postgres else 3)
    # The mean is over every counted step, the gateway's included.
    counted_rows = actions + compensations
    assert counted["bookkeeping_per_step_mean"] == round(
        sum(row[BOOKKEEPING] for row in counted_rows) / len(counted_rows), 2
    )
    assert counted["bookkeeping_per_step_mean"] == (2 if postgres else 2.44)
    assert counted["bookkeeping_external_action_max"] == (2 if postgres else 4)
    assert counted["result_backend_per_task"] >= 1
    assert counted["saga_level"]["errback"][BOOKKEEPING] >= 1
    sagas = Saga.objects.filter(saga_type="trip_booking")
    assert sorted(sagas.values_list("status", flat=True)) == ["COMPENSATED", "COMPLETED"]


# --- targets -------------------------------------------------------------------------


def _report(database: str, **figures) -> dict:
    report = {
        "machine": {"database": database},
        "sagas_per_s": 41.0,
        "noop_chains_per_s": 80.0,
        "bare_chains_per_s": 43.0,
        "lone_latency_ms": {"p50": 30.0, "p99": 70.0},
        "bare_lone_latency_ms": {"p50": 20.0, "p99": 65.0},
        **figures,
    }
    report["targets"] = judge(report)
    return report


def test_a_relative_target_is_judged_against_the_same_runs_no_op_floor():
    verdicts = _report("PostgreSQL 16.2")["targets"]

    assert verdicts["sagas_per_s"]["pass"] is True
    assert verdicts["sagas_per_s"]["target"] == "\u2265 40"
    # 41 sagas/s is below 0.55 x 80 = 44 no-op chains/s.
    assert verdicts["sagas_per_s_vs_noop"]["bound"] == 44.0
    assert verdicts["sagas_per_s_vs_noop"]["pass"] is False
    assert verdicts["sagas_per_s_vs_noop"]["target"] == "\u2265 0.55 \u00d7 80 = 44"
    assert verdicts["lone_latency_ms.p99"]["pass"] is False
    assert verdicts["lone_latency_ms.p99"]["bare_chain_passes"] is False
    assert verdicts["overhead_ratio"]["pass"] is None  # not measured here


def test_targets_are_judged_on_postgresql_and_shown_for_comparison_elsewhere():
    judged = "\n".join(target_lines(_report("PostgreSQL 16.2")))
    assert "FAIL   sagas per second (burst), against the no-op" in judged
    assert "(bare chain: 65, misses it too)" in judged

    compared = "\n".join(target_lines(_report("SQLite 3.45.1")))
    assert "PostgreSQL targets, shown for comparison (this run: SQLite 3.45.1" in compared
    assert "FAIL" not in compared
    assert "PASS" not in compared
    assert "missed sagas per second (burst), against the no-op" in compared


# --- the profile ----------------------------------------------------------------------


def test_the_profile_splits_a_hop_into_segments_from_the_workers_records():
    task = {
        "kind": "task",
        "id": "t2",
        "name": "trip_booking.reserve_hotel",
        "prerun": 10.004,
        "run_start": 10.005,
        "run_end": 10.015,
        "success": 10.017,
        "postrun": 10.0171,
        "sql": {"bookkeeping": 0.002, "domain": 0.003},
        "sql_n": 9,
        "commit": {"run": 0.001, "after": 0.0},
        "body": 0.005,
        "publish": [
            {"id": "t3", "ms": 1.5, "at": 10.0165, "body_bytes": 10, "wire_bytes": 20}
            | {"dumps_ms": 0.01, "loads_ms": 0.01}
        ],
    }
    records = [
        task,
        {"kind": "received", "id": "t2", "at": 10.002},
        {"kind": "ack", "id": "t2", "at": 10.018, "ms": 0.1},
        {"kind": "events", "n": 3, "ms": 0.3},
    ]
    first = [
        {"id": "t2", "at": 10.001, "ms": 1.0, "body_bytes": 1000, "wire_bytes": 2000}
        | {"dumps_ms": 0.02, "loads_ms": 0.03}
    ]

    (row,) = hops(records, first)

    assert row["broker"] == pytest.approx(1.0)
    assert row["to_child"] == pytest.approx(3.0)
    assert row["sql_bookkeeping"] == pytest.approx(2.0)
    assert row["body"] == pytest.approx(2.0)  # 5 ms of step body, 3 of them its SQL
    assert row["wrapper"] == pytest.approx(2.0)  # 10 ms run - 2 SQL - 1 commit - 5 body
    assert row["publish"] == pytest.approx(1.5)
    assert row["result"] == pytest.approx(0.5)
    assert row["ack"] == pytest.approx(0.1)
    assert row["total"] == pytest.approx(17.1)
    assert row["wire_bytes"] == 2000
    assert row["events"] == pytest.approx(0.3)  # 3 events per task, 0.1 ms each
    summary = profile_summary(
        [row], step_names=["trip_booking.reserve_hotel"], noop_name="bench.noop", covered="x"
    )
    assert summary["per_saga"]["total"] == pytest.approx(17.1)
    assert summary["noop_per_hop"] is None


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
        *("--warmup", "0", "--profile-sagas", "2", "--json", str(path)),
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
    # Steps inside the database; on SQLite the last one's end stamp is a statement of its own.
    assert report["sql_per_step"]["bookkeeping_per_step_max"] == (
        2 if connection.vendor == "postgresql" else 3
    )
    machine = report["machine"]
    for key in ("cores", "memory_mb", "python", "database", "redis"):
        assert machine[key], key
    assert set(report["targets"]) == {target.key for target in TARGETS}
    assert all(isinstance(t["pass"], bool) for t in report["targets"].values())
    assert report["targets"]["sagas_per_s_vs_noop"]["bound"] == round(
        0.55 * report["noop_chains_per_s"], 2
    )
    # The profile: every step of the saga as its worker ran it, and the no-op floor.
    profile = report["profile"]
    # The suite's own worker may take some of the saga steps: those go unprofiled.
    steps = list(profile["steps"])
    assert steps
    assert steps == [f"trip_booking.{s}" for s in TRIP_STEPS if f"trip_booking.{s}" in steps]
    assert all(1 <= row["n"] <= 2 for row in profile["steps"].values())
    assert profile["noop_per_hop"]["n"] == 2 * len(TRIP_STEPS)  # every hop of 2 chains
    for row in [*profile["steps"].values(), profile["noop_per_hop"]]:
        assert row["total"] > 0
        assert row["wire_bytes"] > 0
    assert profile["per_saga"]["sql_bookkeeping"] > 0
    # Where the CPU went in each kind of burst: the worker's share is part of the busy cores.
    pool_cpu_s = 0.0
    for kind in ("sagas", "bare_chains", "noop_chains"):
        cpu = report["burst_cpu"][kind]
        assert cpu["cores"] == machine["cores"], kind
        assert cpu["seconds"] > 0, kind
        parts = cpu["worker_main_cores"] + cpu["worker_pool_cores"] + cpu["rest_cores"]
        assert parts == pytest.approx(cpu["busy_cores"], abs=0.05), kind
        assert 0 <= cpu["idle_share"] <= 1, kind
        pool_cpu_s += cpu["worker_pool_cores"] * cpu["seconds"]
    # The pool ran the bursts' tasks (a tiny burst alone may take less than a clock tick).
    assert pool_cpu_s > 0
    out = capsys.readouterr().out
    assert "per-step profile, ms" in out
    assert "CPU during the bursts" in out
    assert "targets" in out
    # The workers it started are gone.
    assert not current_app.control.ping(destination=[host_format(NODE_NAME)], timeout=0.5)


@pytest.mark.saga
@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
def test_bench_pipeline_compares_worker_pipelines_with_the_production_worker(tmp_path, capsys):
    path = tmp_path / "pipeline.json"
    sagas_before = Saga.objects.count()
    call_command(
        "bench",
        *("--pipeline", "--sagas", "3", "--rounds", "1", "--json", str(path)),
        "--allow-foreign-workers",
        "--purge",
    )
    report = json.loads(path.read_text())
    results = report["results"]
    assert set(results) == set(report["variants"]) == {variant.name for variant in VARIANTS}
    assert results["production"]["sagas_per_s_ratio"] == 1.0
    assert results["production"]["pool_processes"] == 2
    assert results["one more process"]["pool_processes"] == 3
    for name, result in results.items():
        for key in ("sagas_per_s", "bare_chains_per_s", "noop_chains_per_s", "rss_mb"):
            assert isinstance(result[key], Number), (name, key)
            assert result[key] > 0, (name, key)
        assert result["saga_to_bare"] == round(
            result["sagas_per_s"] / result["bare_chains_per_s"], 3
        ), name
        assert set(result["targets"]) == {
            "sagas_per_s",
            "sagas_per_s_vs_noop",
            "overhead_ratio",
            "worker_rss_mb",
        }
        assert all(isinstance(ok, bool) for ok in result["targets"].values()), name
        assert 0 <= result["idle_share"]["sagas"] <= 1, name
    out = capsys.readouterr().out
    assert "events unbatched" in out
    assert "targets met" in out
    # Issue 11's targets are PostgreSQL's: on another database they are for comparison.
    shown = "shown for comparison" in out
    assert shown is (connection.vendor != "postgresql")
    # What it created is gone, and so are its workers.
    assert Saga.objects.count() == sagas_before
    assert not current_app.control.ping(destination=[host_format(NODE_NAME)], timeout=0.5)


@pytest.mark.saga
@pytest.mark.timeout(240)
@pytest.mark.django_db(transaction=True)
def test_bench_tracing_drop_reports_the_workers_with_tracing_off_and_on(tmp_path, capsys):
    path = tmp_path / "bench.json"
    call_command(
        "bench",
        *("--sagas", "2", "--lone", "2", "--failures", "1", "--skip-half-load"),
        *("--warmup", "0", "--profile-sagas", "0", "--tracing", "drop", "--json", str(path)),
        "--allow-foreign-workers",
        "--purge",
    )

    report = json.loads(path.read_text())
    cost = report["tracing"]
    for variant in ("off", "drop"):
        assert len(cost[variant]["bursts_per_s"]) == 2, variant  # off drop drop off
        assert cost[variant]["sagas_per_s"] > 0
        assert cost[variant]["cpu_ms_per_saga"] > 0
        assert cost[variant]["lone_latency_ms"]["n"] == 2  # one lone saga per round
    assert all(isinstance(value, Number) for value in cost["ratio_drop_to_off"].values())
    # Tracing reads the saga's context from the row the step loads: no statement more.
    for phase in ("action", "compensation"):
        assert cost["sql_per_step"][phase] == report["sql_per_step"][phase], phase
    assert (
        cost["sql_per_step"]["bookkeeping_per_step_mean"]
        == report["sql_per_step"]["bookkeeping_per_step_mean"]
    )
    if connection.vendor == "postgresql":
        assert cost["sql_per_step"]["bookkeeping_per_step_mean"] == 2
    out = capsys.readouterr().out
    assert "tracing: off vs drop" in out
    assert "worker CPU ms per saga" in out


# --- --hops ----------------------------------------------------------------------------


@pytest.mark.saga
@pytest.mark.timeout(180)
@pytest.mark.django_db(transaction=True)
def test_bench_hops_compares_worker_variants_with_the_production_worker(
    tmp_path, capsys, monkeypatch
):
    # Two of the variants keep the test short; the others differ only in what they set.
    monkeypatch.setattr(hops_module, "VARIANTS", hops_module.VARIANTS[:2])
    path = tmp_path / "hops.json"

    call_command(
        "bench",
        *("--hops", "--sagas", "3", "--lone", "2", "--rounds", "1", "--json", str(path)),
        "--allow-foreign-workers",
        "--purge",
    )

    report = json.loads(path.read_text())
    results = report["results"]
    assert list(results) == ["production", "no task events"]
    assert results["production"]["throughput_ratio"] == 1.0
    for result in results.values():
        assert result["chains_per_s"] > 0
        assert result["lone_p50_ms"] > 0
    saga_hops = report["messages"]["saga"]
    assert [row["hop"] for row in saga_hops] == [1, 2, 3, 4, 5]
    # Each hop's message carries the rest of the chain: it shrinks hop by hop.
    sizes = [row["bytes"] for row in saga_hops]
    assert sizes == sorted(sizes, reverse=True)
    messages = report["messages"]
    assert messages["no-op + errbacks"][0]["bytes"] > messages["no-op"][0]["bytes"]
    assert "variant" in capsys.readouterr().out
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
