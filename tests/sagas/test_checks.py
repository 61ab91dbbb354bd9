"""System checks of the engine: leases, deadlines and bounded database sessions."""

from __future__ import annotations

from unittest import mock

import pytest

from sagas import checks
from sagas.definitions import RetryPolicy, SagaDefinition, Step


def noop(saga) -> dict:
    return {}


def test_a_deadline_shorter_than_the_steps_worst_case_is_refused(scratch_registry, settings):
    settings.SAGA_MAX_RETRY_DELAY_S = 30
    hasty = SagaDefinition(
        "hasty",
        steps=[Step("one", noop, noop, retry=RetryPolicy(max_retries=3), timeout_s=10)],
        deadline_s=30,
        compensation_deadline_s=60,
    )
    # 4 attempts at 15 s plus 0.5 + 1 + 2 s of backoff; compensation: 6 attempts plus 15.5 s.
    assert hasty.worst_case_s("action") == 63.5
    assert hasty.worst_case_s("compensation") == 105.5

    errors = [e for e in checks.check_saga_deadlines(None) if e.obj == "hasty"]

    assert [e.id for e in errors] == ["sagas.E003", "sagas.E003"]
    assert "deadline_s=30s is shorter than its actions' worst case (64s" in errors[0].msg
    assert "compensation_deadline_s=60s" in errors[1].msg
    assert "at least 106s" in errors[1].hint


def test_a_saga_type_without_deadlines_gets_its_worst_case_and_passes(scratch_registry, settings):
    settings.SAGA_STALL_GRACE_S = 10
    calm = SagaDefinition("calm", steps=[Step("one", noop, noop, timeout_s=10)])

    assert calm.deadline_s == 74  # ceil(63.5 + 10)
    assert calm.compensation_deadline_s == 116
    assert not [e for e in checks.check_saga_deadlines(None) if e.obj == "calm"]


def test_every_declared_saga_type_passes_the_deadline_check():
    assert checks.check_saga_deadlines(None) == []


@pytest.mark.parametrize(
    ("options", "missing"),
    [
        ({"options": "-c lock_timeout=0 -c statement_timeout=1", "keepalives": 1}, "lock_timeout"),
        ({"options": "-c lock_timeout=5", "keepalives": 1}, "statement_timeout"),
        (
            {
                "options": "-c lock_timeout=5 -c statement_timeout=5 "
                "-c idle_in_transaction_session_timeout=5"
            },
            "keepalives",
        ),
    ],
)
def test_production_refuses_database_sessions_that_wait_without_bound(options, missing):
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": "x", "OPTIONS": options}

    assert missing in checks.unbounded_waits(database)
    with mock.patch.object(checks.settings, "DATABASES", {"default": database}):
        [error] = checks.check_database_waits_bounded(None)
    assert error.id == "sagas.E004"
    assert missing in error.msg


def test_the_default_database_sessions_are_bounded():
    from config.settings.base import database_from_env

    database = database_from_env("postgres://u@db.example:5432/app")

    assert checks.unbounded_waits(database) == []
    options = database["OPTIONS"]
    assert options["options"].split() == [
        "-c",
        "lock_timeout=5000",
        "-c",
        "statement_timeout=60000",
        "-c",
        "idle_in_transaction_session_timeout=20000",
        "-c",
        "tcp_keepalives_idle=10",
        "-c",
        "tcp_keepalives_interval=5",
        "-c",
        "tcp_keepalives_count=3",
    ]
    assert (options["keepalives"], options["connect_timeout"], options["tcp_user_timeout"]) == (
        1,
        5,
        30000,
    )


def test_a_visibility_timeout_shorter_than_three_lease_renewals_is_refused(settings):
    settings.SAGA_LEASE_RENEW_S = 5
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 10}

    [error] = checks.check_visibility_timeout(None)

    assert error.id == "sagas.E002"
    assert "at least three lease renewals" in error.msg
