"""The result store survives a database restart: the worker's main process writes through it."""

from __future__ import annotations

from unittest import mock

import pytest
from celery import current_app
from django.db import IntegrityError, OperationalError, connection

from sagas.results import ResilientDatabaseBackend


def test_the_configured_result_store_is_the_resilient_one():
    backend = current_app.backend
    assert isinstance(backend, ResilientDatabaseBackend)
    assert backend.always_retry is True
    assert backend.max_retries == 2


@pytest.mark.django_db(transaction=True)
def test_a_store_whose_connection_broke_is_retried_on_a_new_connection():
    backend = current_app.backend
    real = ResilientDatabaseBackend._store_result
    calls = []

    def once_broken(self, *args, **kwargs):
        calls.append(connection.connection)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        return real(self, *args, **kwargs)

    with mock.patch.object(ResilientDatabaseBackend, "_store_result", once_broken):
        backend.store_result("after-restart", {"ok": True}, "SUCCESS")

    assert len(calls) == 2
    assert backend.get_task_meta("after-restart")["status"] == "SUCCESS"


def test_other_errors_are_not_retried():
    backend = current_app.backend
    assert backend.exception_safe_to_retry(IntegrityError("duplicate key")) is False
