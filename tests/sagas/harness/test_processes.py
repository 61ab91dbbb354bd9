"""Worker subprocesses of the harness: the database and broker they are pointed at."""

import pytest

from sagas.harness.plugin import _names_saga
from sagas.harness.processes import database_url, describe_backends

# --- worker processes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "inherited", "expected"),
    [
        (
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "test_app",
                "USER": "app",
                "PASSWORD": "p@ss/word",
                "HOST": "db",
                "PORT": 5432,
            },
            "postgres://app@db:5432/app",
            "postgres://app:p%40ss%2Fword@db:5432/test_app",
        ),
        (
            {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": "app",
                "USER": "app",
                "HOST": "db",
                "PORT": 5432,
            },
            "postgres://app@db:5432/app?sslmode=require",
            "postgres://app@db:5432/app?sslmode=require",
        ),
        (
            {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app/test.sqlite3"},
            "",
            "sqlite:////srv/app/test.sqlite3",
        ),
    ],
)
def test_workers_get_the_database_this_process_uses(monkeypatch, database, inherited, expected):
    monkeypatch.setenv("DATABASE_URL", inherited)

    assert database_url(database) == expected


def test_a_run_names_its_database_and_broker_without_passwords():
    database = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "shop",
        "HOST": "db.internal",
        "PORT": 5433,
        "PASSWORD": "secret",
    }

    described = describe_backends(broker_url="redis://:hunter2@cache:6379/1", database=database)

    assert described == (
        "postgresql database 'shop' on db.internal:5433; broker redis://:***@cache:6379/1"
    )
    assert "secret" not in described


@pytest.mark.parametrize(
    "stored",
    [
        "\"{'saga_id': '0c6b1d2e-6a4f-4a8e-9a4b-1f2e3d4c5b6a'}\"",
        '{"saga_id": "0c6b1d2e-6a4f-4a8e-9a4b-1f2e3d4c5b6a"}',
    ],
)
def test_a_stored_result_is_traced_to_its_saga_whatever_the_kwargs_format(stored):
    assert _names_saga(stored, {"0c6b1d2e-6a4f-4a8e-9a4b-1f2e3d4c5b6a"})
    assert not _names_saga(stored, {"11111111-1111-1111-1111-111111111111"})
