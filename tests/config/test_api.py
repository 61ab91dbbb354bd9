import pytest
import schemathesis
from django.core.handlers.wsgi import WSGIHandler
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from config.api import flatten_errors


@pytest.mark.django_db
def test_a_token_is_exchanged_for_a_username_and_password(customer, client_for):
    response = client_for().post(
        "/api/auth/token/", {"username": "alice", "password": "alice-password"}, format="json"
    )

    assert response.status_code == 200
    token = response.json()["token"]
    authed = client_for()
    authed.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert authed.get("/api/bookings/").status_code == 200


@pytest.mark.django_db
def test_a_wrong_password_gets_no_token(customer, client_for):
    response = client_for().post(
        "/api/auth/token/", {"username": "alice", "password": "wrong"}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["code"] == "invalid"
    assert "Unable to log in" in response.json()["detail"]


@pytest.mark.django_db
def test_token_requests_are_throttled(customer, client_for):
    from unittest import mock

    from django.core.cache import cache
    from rest_framework.throttling import ScopedRateThrottle

    cache.clear()  # throttle history lives in the cache
    client = client_for()
    with mock.patch.object(ScopedRateThrottle, "THROTTLE_RATES", {"auth": "2/minute"}):
        statuses = [
            client.post(
                "/api/auth/token/", {"username": "alice", "password": "x"}, format="json"
            ).status_code
            for _ in range(3)
        ]
    cache.clear()
    assert statuses == [400, 400, 429]


def test_nested_errors_flatten_to_dotted_paths():
    detail = {
        "lines": [{}, {"sku": ["unknown"]}],
        "payment": {"amount": ["bad"]},
        "customer": {"non_field_errors": ["incomplete"]},
    }

    assert flatten_errors(detail) == {
        "lines.1.sku": ["unknown"],
        "payment.amount": ["bad"],
        "customer": ["incomplete"],
    }


@pytest.mark.django_db
def test_the_openapi_schema_and_the_docs_are_served_without_external_assets(client_for):
    schema = client_for().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    docs = client_for().get("/api/docs/")

    assert schema.status_code == 200
    paths = schema.json()["paths"]
    assert set(paths) == {
        "/api/",
        "/api/auth/token/",
        "/api/bookings/",
        "/api/bookings/{booking_id}/",
        "/api/bookings/{booking_id}/cancel/",
        "/api/inventory/items/",
        "/api/sagas/",
        "/api/sagas/{saga_id}/",
        "/api/sagas/{saga_id}/retry-compensation/",
        "/api/sagas/stats/",
        "/api/sagas/live/",
        "/healthz",
    }
    create = paths["/api/bookings/"]["post"]["responses"]
    assert set(create) == {"202", "400", "401", "403", "415", "422"}
    assert create["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert docs.status_code == 200
    assert b"cdn." not in docs.content


@pytest.fixture
def wsgi_in_test_transaction(db, operator, trip_items):
    """Serve generated requests inside the test transaction, with data to find.

    Like Django's test client, keep the request signals from closing the
    test's database connection.
    """
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def staff_headers(operator):
    from rest_framework.authtoken.models import Token

    token, _ = Token.objects.get_or_create(user=operator)
    return {"Authorization": f"Token {token.key}"}


# Loaded when the module is collected (the schema view reads no data); schemathesis'
# lazy from_fixture loader does not run on pytest 9.
schema = schemathesis.openapi.from_wsgi("/api/schema/", WSGIHandler())


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_api_answers_every_generated_request_within_its_schema(
    case, staff_headers, wsgi_in_test_transaction
):
    """No 5xx, and every response (status and body) is one the schema describes."""
    case.call_and_validate(
        headers=staff_headers,
        checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
    )


# --- the API's root, and every other /api/ path --------------------------------------


@pytest.mark.django_db
def test_the_api_root_lists_the_docs_and_every_collection(client_for):
    response = client_for().get("/api/", HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    index = response.json()
    assert index["docs"] == "http://testserver/api/docs/"
    assert index["schema"] == "http://testserver/api/schema/"
    assert index["health"] == "http://testserver/healthz"
    assert index["bookings"] == "http://testserver/api/bookings/"
    assert index["sagas"] == "http://testserver/api/sagas/"
    for url in index.values():
        assert client_for().get(url).status_code != 404, url


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("/api/nothing-here/", "no API endpoint at /api/nothing-here/; GET /api/ lists them"),
        ("/api/sagas/not-a-uuid/", "no API endpoint at /api/sagas/not-a-uuid/; GET /api/"),
        ("/api/sagas", "no API endpoint at /api/sagas; did you mean /api/sagas/ ?"),
    ],
)
@pytest.mark.parametrize("debug", [True, False])
def test_any_other_api_path_answers_the_json_error_body_not_html(
    client_for, settings, path, detail, debug
):
    settings.DEBUG = debug  # DEBUG's 404 page is HTML: it must not reach /api/

    for method in ("get", "post", "delete"):
        response = getattr(client_for(), method)(path, HTTP_ACCEPT="text/html")

        assert response.status_code == 404, (method, path)
        assert response["Content-Type"] == "application/json"
        body = response.json()
        assert body["code"] == "not_found"
        assert body["detail"].startswith(detail)
        assert set(body) == {"code", "detail", "errors"}


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.django_db
@pytest.mark.parametrize(("path", "status"), [("/api/", 200), ("/api/sagas/", 401)])
def test_a_browser_gets_json_from_the_api_too(client, path, status):
    response = client.get(path, HTTP_ACCEPT=BROWSER_ACCEPT)

    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert response.json()


@pytest.mark.django_db
def test_the_schema_describes_the_root_and_not_the_catch_all(client_for):
    schema = client_for().get("/api/schema/", HTTP_ACCEPT="application/json").json()

    assert "/api/" in schema["paths"]
    assert not [path for path in schema["paths"] if "^" in path or "nothing" in path]
