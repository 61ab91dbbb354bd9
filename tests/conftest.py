"""Shared fixtures. Saga tests use a real Celery worker on the real broker and DB."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import redis

QUEUES = ["sagas", "bookings", "inventory", "payments", "toy", "maintenance"]


def purge_broker(app) -> None:
    """Drop messages left by an earlier run, including unacknowledged ones."""
    client = redis.Redis.from_url(app.conf.broker_url)
    client.delete(*QUEUES, "unacked", "unacked_index", "unacked_mutex")


@pytest.fixture(scope="session")
def celery_worker(django_db_setup, django_db_blocker):
    """One embedded worker for the session, consuming every context queue.

    Started once, before any test transaction: a function-scoped worker broke
    the test's DB connection (Celery's Django fixup closes it on start).
    """
    from celery.contrib.testing.worker import start_worker
    from django.db import connections

    from config.celery_app import app

    closed = threading.Event()

    @app.task(name="tests.close_worker_connections", ignore_result=True)
    def close_worker_connections():
        # Runs in the worker thread: its reused connection would otherwise keep
        # the test database open and stop pytest-django from dropping it.
        connections.close_all()
        closed.set()

    purge_broker(app)
    with (
        django_db_blocker.unblock(),
        start_worker(
            app,
            pool="solo",
            concurrency=1,
            queues=QUEUES,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as worker,
    ):
        yield worker
        close_worker_connections.apply_async(queue="sagas")
        assert closed.wait(30), "the worker did not close its database connections"


@pytest.fixture
def customer(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-password")


@pytest.fixture
def trip_items():
    """One flight, one hotel and one car, with room for a few bookings."""
    from inventory import services

    return {
        "flight": services.item_create(
            sku="FL-TEST",
            kind="flight_seat",
            name="Test flight",
            capacity=5,
            price=Decimal("200.00"),
            currency="EUR",
        ),
        "hotel": services.item_create(
            sku="HT-TEST",
            kind="hotel_room",
            name="Test hotel",
            capacity=5,
            price=Decimal("120.00"),
            currency="EUR",
        ),
        "car": services.item_create(
            sku="CR-TEST",
            kind="car",
            name="Test car",
            capacity=5,
            price=Decimal("40.00"),
            currency="EUR",
        ),
    }


def wait_for(predicate, *, timeout: float = 30.0, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


@pytest.fixture
def other_customer(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-password")


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_user(
        username="olga", password="olga-password", is_staff=True
    )


@pytest.fixture
def client_for():
    """An API client authenticated with the user's token, as a real client would be."""
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    def make(user=None):
        client = APIClient()
        if user is not None:
            token, _ = Token.objects.get_or_create(user=user)
            client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
        return client

    return make


@pytest.fixture
def scratch_registry():
    """Declarations made by a test leave the global registry as it was."""
    from celery import current_app

    from sagas import tasks
    from sagas.definitions import registry

    saved = dict(registry._definitions)
    made = set(tasks._registered)
    yield registry
    registry._definitions.clear()
    registry._definitions.update(saved)
    for name in tasks._registered - made:
        current_app.tasks.pop(name, None)
    tasks._registered.intersection_update(made)
