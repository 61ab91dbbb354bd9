import pytest
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_healthz_answers_200_when_database_and_broker_answer():
    response = APIClient().get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "broker": "ok"}}


def test_healthz_answers_503_naming_the_broker_when_it_is_down(settings):
    from config.celery_app import app

    previous = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    try:
        response = APIClient().get("/healthz")
    finally:
        app.conf.broker_url = previous

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["broker"].startswith("error: ")
