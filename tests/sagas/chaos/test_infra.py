"""Infrastructure faults: a broker flush, ended sessions, how to restart PostgreSQL."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from django.conf import settings
from django.db import connection

from sagas.chaos import infra
from sagas.chaos.plan import ChaosConfigError
from sagas.chaos.workers import DurableRedis, has_redis_server
from sagas.harness.redis_server import redis_executable

POSTGRES = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "HOST": "127.0.0.1"}
LSCLUSTERS = "15  main    5432 online postgres /var/lib/postgresql/15/main /var/log/pg.log\n"


# --- the broker --------------------------------------------------------------------


@pytest.mark.skipif(not has_redis_server(), reason="no redis-server binary")
def test_a_flush_empties_the_brokers_database_and_leaves_the_next_one_alone(tmp_path):
    server = DurableRedis(redis_executable(), tmp_path)
    server.start()
    try:
        broker = redis.Redis.from_url(f"{server.url}/3")
        books = redis.Redis.from_url(f"{server.url}/4")  # the fake gateway's: broker + 1
        broker.rpush("payments", "m1", "m2")
        broker.hset("unacked", "tag", "m3")
        books.set("charge", "kept")

        flushed = infra.flush_broker(f"{server.url}/3", queues=("payments", "sagas"))

        assert flushed == infra.Flush(keys=2, queued=2, unacked=1)
        assert broker.dbsize() == 0
        assert books.get("charge") == b"kept"
    finally:
        server.stop()


def test_a_kombu_socket_url_is_a_redis_socket_url():
    assert infra.redis_url_of_broker("redis+socket:///run/redis.sock") == "unix:///run/redis.sock"
    assert infra.redis_url_of_broker("redis://h:6379/2") == "redis://h:6379/2"


# --- database sessions -------------------------------------------------------------


@pytest.mark.skipif(
    settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
    reason="pg_terminate_backend: PostgreSQL only",
)
@pytest.mark.django_db(transaction=True)
def test_only_the_runs_worker_sessions_are_ended():
    import psycopg

    params = connection.get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("prepare_threshold", None)

    def session(name: str):
        return psycopg.connect(**{**params, "application_name": name}, autocommit=True)

    ours = [session("chaos-abc123-1"), session("chaos-abc123-sagas-2")]
    other_run = session("chaos-def456-1")
    try:
        ended = infra.terminate_sessions("abc123")

        assert ended == 2
        for conn in ours:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
        assert other_run.execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in (*ours, other_run):
            conn.close()


# --- restarting PostgreSQL ---------------------------------------------------------


def which(*present):
    return lambda name: f"/usr/bin/{name}" if name in present else None


def lsclusters(output=LSCLUSTERS):
    def run(argv, **kwargs):
        assert argv == ["/usr/bin/pg_lsclusters", "--no-header"]
        return subprocess.CompletedProcess(argv, 0, stdout=output)

    return run


def no_show(name):
    raise PermissionError("must be superuser or have privileges of pg_read_all_settings")


def test_a_local_debian_cluster_is_restarted_with_pg_ctlcluster_matched_by_port():
    command = infra.restart_command(
        {**POSTGRES, "PORT": 5432},
        configured="",
        which=which("pg_lsclusters", "pg_ctlcluster"),
        run=lsclusters(),
        uid=0,
    )

    assert command.argv == [
        "/usr/bin/pg_ctlcluster",
        "--skip-systemctl-redirect",
        "15",
        "main",
        "restart",
    ]
    assert command.how == "cluster 15/main on port 5432"


def test_without_pg_ctlcluster_pg_ctl_restarts_the_data_directory_as_its_owner(tmp_path):
    import os

    command = infra.restart_command(
        {**POSTGRES, "HOST": "localhost"},
        configured="",
        which=which("pg_ctl"),
        show=lambda name: str(tmp_path),
        uid=os.geteuid(),
    )

    assert command.argv == ["/usr/bin/pg_ctl", "-D", str(tmp_path), "restart", "-m", "fast", "-w"]


@pytest.mark.parametrize(
    ("database", "kwargs", "message"),
    [
        (
            {**POSTGRES, "HOST": "db.internal"},
            {},
            "--restart-database can only restart a PostgreSQL on this machine; the database "
            "is on db.internal. Set CHAOS_DB_RESTART_COMMAND",
        ),
        (
            POSTGRES,
            {"which": which(), "show": no_show},
            "--restart-database cannot restart the database from here: no pg_lsclusters/"
            "pg_ctlcluster (Debian's postgresql-common); SHOW data_directory failed "
            "(must be superuser",
        ),
        (
            {**POSTGRES, "PORT": 5433},
            {
                "which": which("pg_lsclusters", "pg_ctlcluster"),
                "run": lsclusters(),
                "show": no_show,
            },
            "pg_lsclusters lists no cluster on port 5433",
        ),
        (
            POSTGRES,
            {
                "which": which("pg_lsclusters", "pg_ctlcluster"),
                "run": lsclusters(),
                "show": no_show,
                "uid": 4242,
            },
            "cluster 15/main on port 5432 belongs to postgres; only root or that user",
        ),
        (
            POSTGRES,
            {"which": which(), "show": lambda name: "/var/lib/postgresql/15/main"},
            "no pg_ctl on PATH",
        ),
    ],
)
def test_where_the_database_cannot_be_restarted_the_run_is_refused_saying_why(
    database, kwargs, message
):
    kwargs = {"configured": "", "uid": 4242, **kwargs}

    with pytest.raises(ChaosConfigError) as raised:
        infra.restart_command(database, **kwargs)

    assert message in str(raised.value)
    assert "use --drop-db-connections" in str(raised.value)


def test_a_configured_command_wins_even_for_a_remote_database(settings):
    settings.CHAOS_DB_RESTART_COMMAND = "ssh db sudo systemctl restart 'postgresql@15-main'"

    command = infra.restart_command({**POSTGRES, "HOST": "db.internal"})

    assert command.argv == ["ssh", "db", "sudo", "systemctl", "restart", "postgresql@15-main"]
    assert command.how == "from CHAOS_DB_RESTART_COMMAND"


def test_the_restart_runs_in_the_background_and_reports_its_exit(tmp_path):
    code = "import time, sys; time.sleep(0.3); print('restarted'); sys.exit(3)"
    script = f'{sys.executable} -c "{code}"'
    command = infra.restart_command(POSTGRES, configured=script)
    restart = infra.DatabaseRestart(command, logfile=tmp_path / "restart.log")

    restart.start(at_s=1.0)
    assert restart.running
    assert restart.poll(at_s=1.1) is False  # still sleeping: the loop goes on
    restart.process.wait(10)

    assert restart.poll(at_s=2.0) is True
    assert restart.as_dict()["exit_status"] == 3
    assert restart.as_dict()["finished_at_s"] == 2.0
    assert restart.output() == "restarted"
    assert restart.poll(at_s=2.1) is False  # reported once
