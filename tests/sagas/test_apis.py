from datetime import timedelta

import pytest
import requests
import schemathesis
from django.utils import timezone

from sagas.models import Saga, SagaLog

pytestmark = pytest.mark.django_db

Status = Saga.Status


def make_saga(
    owner, status=Status.COMPLETED, *, saga_type="trip_booking", duration_ms=None, age_s=0, **extra
):
    saga = Saga.objects.create(
        saga_type=saga_type,
        status=status,
        business_key=f"booking:{owner.username}",
        owner=owner,
        duration_ms=duration_ms,
        **extra,
    )
    if age_s:
        Saga.objects.filter(pk=saga.pk).update(created_at=timezone.now() - timedelta(seconds=age_s))
        saga.refresh_from_db()
    return saga


def log(saga, step, phase, status, minute, index=0, **extra):
    at = timezone.now().replace(microsecond=0) + timedelta(minutes=minute)
    if status == "succeeded":
        extra.setdefault("result", {"done": step})  # None would read "nothing to do"
    return SagaLog.objects.create(
        saga=saga,
        step=step,
        step_index=index,
        phase=phase,
        status=status,
        started_at=at,
        finished_at=at + timedelta(milliseconds=15),
        duration_ms=15,
        **extra,
    )


GATEWAY_TIMEOUT = "GatewayTimeout: Gateway timed out (attempt 1 for key 'saga:{id}:charge_payment')"
STAFF_SAGA_FIELDS = {"failure_reason", "resolved_by", "resolution"}
STAFF_LOG_FIELDS = {"task_id", "worker", "error"}


def failed_refund_saga(owner, **extra):
    """The payment gateway timed out on the charge, then on every refund of it."""
    saga = make_saga(owner, Status.FAILED, steps_done=3, undo_cursor=4, **extra)
    error = GATEWAY_TIMEOUT.format(id=saga.id)
    Saga.objects.filter(pk=saga.pk).update(
        failure_reason=f"compensation of refund_payment exhausted its retries: {error}"
    )
    for index, step in enumerate(["reserve_flight", "reserve_hotel", "reserve_car"]):
        log(saga, step, "action", "succeeded", index, index=index, task_id=f"task-{index}")
    internals = {"task_id": "task-charge-1", "worker": "celery@host1", "error": error}
    log(saga, "charge_payment", "action", "timed_out", 3, index=3, **internals)
    log(saga, "refund_payment", "compensation", "retrying", 4, index=3, **internals)
    log(saga, "refund_payment", "compensation", "failed", 5, index=3, **internals)
    saga.refresh_from_db()
    return saga


def test_customers_see_only_their_own_sagas(customer, other_customer, client_for):
    mine = make_saga(customer)
    make_saga(other_customer)

    response = client_for(customer).get("/api/sagas/")

    assert response.status_code == 200
    assert [saga["id"] for saga in response.json()["results"]] == [str(mine.id)]


def test_staff_see_every_saga(customer, other_customer, operator, client_for):
    make_saga(customer)
    make_saga(other_customer)

    assert len(client_for(operator).get("/api/sagas/").json()["results"]) == 2


def test_sagas_filter_by_status_type_and_creation_window(customer, client_for):
    failed = make_saga(customer, Status.FAILED, age_s=3600)
    make_saga(customer, Status.COMPLETED, age_s=3600)
    recent_cancel = make_saga(customer, Status.COMPLETED, saga_type="booking_cancellation")
    client = client_for(customer)
    half_an_hour_ago = (timezone.now() - timedelta(minutes=30)).isoformat()

    def ids(query):
        response = client.get("/api/sagas/", query)
        assert response.status_code == 200, response.json()
        return [saga["id"] for saga in response.json()["results"]]

    assert ids({"status": "FAILED"}) == [str(failed.id)]
    # Statuses read as the API writes them (FAILED), in any case.
    assert ids({"status": "failed"}) == ids({"status": "Failed"}) == [str(failed.id)]
    assert ids({"saga_type": "booking_cancellation"}) == [str(recent_cancel.id)]
    assert ids({"created_after": half_an_hour_ago}) == [str(recent_cancel.id)]
    assert len(ids({"created_before": half_an_hour_ago})) == 2


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ({"status": "EXPLODED"}, "status"),
        ({"saga_type": "moon_landing"}, "saga_type"),
        ({"created_after": "yesterday"}, "created_after"),
    ],
)
def test_a_bad_filter_is_a_400_naming_it(customer, client_for, query, field):
    response = client_for(customer).get("/api/sagas/", query)

    assert response.status_code == 400
    assert field in response.json()["errors"]


def test_the_saga_list_pages_with_a_cursor(customer, client_for):
    for age in range(5):
        make_saga(customer, age_s=age + 1)
    client = client_for(customer)

    first = client.get("/api/sagas/", {"page_size": 2}).json()
    second = client.get(first["next"]).json()

    assert len(first["results"]) == len(second["results"]) == 2
    assert not {s["id"] for s in first["results"]} & {s["id"] for s in second["results"]}
    assert first["results"][0]["created_at"] > second["results"][0]["created_at"]


def test_a_saga_is_shown_with_its_whole_log_in_the_order_it_was_recorded(customer, client_for):
    saga = make_saga(
        customer, Status.COMPENSATED, steps_done=2, failure_reason="step reserve_car failed"
    )
    log(saga, "reserve_flight", "action", "succeeded", 1)
    log(saga, "reserve_car", "action", "failed", 3, index=2)
    # Recorded last, by a worker whose clock runs two minutes behind: the
    # database's order stands, not the workers' clocks.
    log(saga, "release_flight", "compensation", "succeeded", 1)

    response = client_for(customer).get(f"/api/sagas/{saga.id}/")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPENSATED"
    assert (
        body["reason"] == "reserve_car could not be completed; every step already done was undone"
    )
    assert [(row["step"], row["phase"], row["status"]) for row in body["log"]] == [
        ("reserve_flight", "action", "succeeded"),
        ("reserve_car", "action", "failed"),
        ("release_flight", "compensation", "succeeded"),
    ]
    assert "context" not in body  # it may hold payment tokens


def test_customers_see_their_sagas_story_without_workers_task_ids_or_raw_errors(
    customer, client_for
):
    saga = failed_refund_saga(customer)

    response = client_for(customer).get(f"/api/sagas/{saga.id}/")

    assert response.status_code == 200
    body = response.json()
    assert not STAFF_SAGA_FIELDS & set(body)
    assert body["reason"] == "undoing charge_payment failed; our team has been alerted"
    assert [
        (row["step"], row["phase"], row["status"], row["attempt"], row["reason"])
        for row in body["log"]
    ] == [
        ("reserve_flight", "action", "succeeded", 1, ""),
        ("reserve_hotel", "action", "succeeded", 1, ""),
        ("reserve_car", "action", "succeeded", 1, ""),
        ("charge_payment", "action", "timed_out", 1, "no answer in time; undone to be safe"),
        ("refund_payment", "compensation", "retrying", 1, "temporary problem; tried again"),
        ("refund_payment", "compensation", "failed", 1, "could not be completed"),
    ]
    for row in body["log"]:
        assert not STAFF_LOG_FIELDS & set(row)
        assert {"started_at", "finished_at", "duration_ms"} <= set(row)
    for internal in (
        "GatewayTimeout",
        "celery@host1",
        "task-charge-1",
        "task-0",
        f"saga:{saga.id}:",
    ):
        assert internal not in response.content.decode()


def test_staff_see_every_field_of_a_saga_and_its_log_and_the_public_reasons_too(
    customer, operator, client_for
):
    saga = failed_refund_saga(customer)

    response = client_for(operator).get(f"/api/sagas/{saga.id}/")

    assert response.status_code == 200
    body = response.json()
    assert body["failure_reason"].startswith("compensation of refund_payment exhausted its retries")
    assert body["resolved_by"] == body["resolution"] == ""
    assert body["reason"] == "undoing charge_payment failed; our team has been alerted"
    charge = body["log"][3]
    assert charge["worker"] == "celery@host1"
    assert charge["task_id"] == "task-charge-1"
    assert charge["error"] == GATEWAY_TIMEOUT.format(id=saga.id)
    assert charge["reason"] == "no answer in time; undone to be safe"
    assert all(set(row) >= STAFF_LOG_FIELDS for row in body["log"])
    assert "GatewayTimeout" in response.content.decode()


def test_the_saga_list_keeps_raw_failures_and_operators_for_staff(customer, operator, client_for):
    failed_refund_saga(customer)

    mine = client_for(customer).get("/api/sagas/")
    everyone = client_for(operator).get("/api/sagas/")

    [seen] = mine.json()["results"]
    assert not STAFF_SAGA_FIELDS & set(seen)
    assert seen["reason"] == "undoing charge_payment failed; our team has been alerted"
    assert "GatewayTimeout" not in mine.content.decode()
    [full] = everyone.json()["results"]
    assert set(full) >= STAFF_SAGA_FIELDS
    assert "GatewayTimeout" in full["failure_reason"]
    assert full["reason"] == seen["reason"]


def test_a_saga_settled_by_hand_says_so_without_naming_the_operator(customer, operator, client_for):
    saga = failed_refund_saga(
        customer,
        resolved_at=timezone.now(),
        resolved_by="olga",
        resolution="refunded by bank transfer",
    )
    log(saga, "refund_payment", "operator", "note", 6, error="marked resolved by olga: refunded")

    seen = client_for(customer).get(f"/api/sagas/{saga.id}/")
    full = client_for(operator).get(f"/api/sagas/{saga.id}/").json()

    body = seen.json()
    assert body["reason"] == "undoing charge_payment failed; settled by our team"
    assert body["resolved_at"] is not None
    assert body["log"][-1]["reason"] == "reviewed by our team"
    assert "olga" not in seen.content.decode()
    assert "bank transfer" not in seen.content.decode()
    assert (full["resolved_by"], full["resolution"]) == ("olga", "refunded by bank transfer")
    assert full["log"][-1]["error"] == "marked resolved by olga: refunded"


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (Status.PENDING, ""),
        (Status.RUNNING, ""),
        (Status.COMPLETED, ""),
        (Status.COMPENSATING, "reserve_car could not be completed; undoing the steps already done"),
        (
            Status.COMPENSATED,
            "reserve_car could not be completed; every step already done was undone",
        ),
        (Status.FAILED, "undoing reserve_hotel failed; our team has been alerted"),
    ],
)
def test_a_sagas_public_reason_comes_from_its_status_and_step_names(
    customer, client_for, status, reason
):
    saga = make_saga(
        customer, status, steps_done=2, undo_cursor=2, failure_reason="KeyError: 'card_token'"
    )

    body = client_for(customer).get(f"/api/sagas/{saga.id}/").json()

    assert body["reason"] == reason


def test_a_saga_of_a_type_no_longer_declared_still_gets_a_reason(customer, client_for):
    saga = make_saga(customer, Status.COMPENSATED, saga_type="retired_type", steps_done=1)

    body = client_for(customer).get(f"/api/sagas/{saga.id}/").json()

    assert body["reason"] == "a step could not be completed; every step already done was undone"


def test_every_log_row_gets_a_public_reason_from_its_status_and_phase(customer, client_for):
    saga = make_saga(customer, Status.COMPENSATED, steps_done=1)
    rows = [
        ("reserve_flight", "action", "succeeded", ""),
        ("reserve_flight", "action", "duplicate", "repeated delivery; ignored"),
        ("reserve_hotel", "action", "ignored", "arrived out of turn; ignored"),
        ("reserve_hotel", "action", "failed", "could not be completed"),
        ("release_hotel", "compensation", "skipped", "nothing to undo"),
        ("release_flight", "compensation", "timed_out", "no answer in time"),
        ("release_flight", "compensation", "succeeded", ""),
        ("-", "operator", "note", "reviewed by our team"),
    ]
    for minute, (step, phase, status, _) in enumerate(rows):
        log(saga, step, phase, status, minute, error="internal detail")

    body = client_for(customer).get(f"/api/sagas/{saga.id}/").json()

    assert [
        (row["step"], row["phase"], row["status"], row["reason"]) for row in body["log"]
    ] == rows


def test_the_schema_documents_staff_only_fields_as_optional(client_for):
    schema = client_for().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    components = schema.json()["components"]["schemas"]
    for name, staff_fields in [
        ("SagaOutput", STAFF_SAGA_FIELDS),
        ("SagaDetailApiOutput", STAFF_SAGA_FIELDS),
        ("SagaDetailApiOutputLog", STAFF_LOG_FIELDS),
    ]:
        component = components[name]
        assert "reason" in component["required"]
        assert not staff_fields & set(component["required"])
        for field in staff_fields:
            assert component["properties"][field]["description"].startswith("Staff only")


@pytest.mark.parametrize("staff", [False, True], ids=["customer", "staff"])
def test_both_shapes_of_a_saga_conform_to_the_documented_schema(
    customer, operator, client_for, staff
):
    saga = failed_refund_saga(customer)
    client = client_for(operator if staff else customer)
    schema = schemathesis.openapi.from_dict(
        client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    )

    for path, template in [
        ("/api/sagas/", "/api/sagas/"),
        (f"/api/sagas/{saga.id}/", "/api/sagas/{saga_id}/"),
    ]:
        response = client.get(path)
        assert response.status_code == 200
        schema[template]["GET"].validate_response(
            schemathesis.Response(
                status_code=response.status_code,
                headers={name: [value] for name, value in response.headers.items()},
                content=response.content,
                request=requests.Request("GET", f"http://testserver{path}").prepare(),
                elapsed=0.0,
                verify=False,
            )
        )


def test_another_users_saga_is_a_404(customer, other_customer, client_for):
    theirs = make_saga(other_customer)

    response = client_for(customer).get(f"/api/sagas/{theirs.id}/")

    assert response.status_code == 404
    assert response.json()["code"] == "saga_not_found"


def test_stats_count_by_status_and_type_with_rates_and_percentiles(customer, client_for):
    for duration in (100, 200, 300, 400):
        make_saga(customer, Status.COMPLETED, duration_ms=duration)
    make_saga(customer, Status.COMPENSATED, duration_ms=900)
    make_saga(customer, Status.RUNNING)
    make_saga(customer, Status.COMPLETED, saga_type="booking_cancellation", duration_ms=50)

    body = client_for(customer).get("/api/sagas/stats/").json()

    assert body["total"] == 7
    assert body["by_status"]["COMPLETED"] == 5
    assert body["by_status"]["RUNNING"] == 1
    assert body["success_rate"] == round(5 / 6, 4)
    assert body["compensation_rate"] == round(1 / 6, 4)
    trip = body["by_type"]["trip_booking"]
    assert trip["total"] == 6
    assert trip["success_rate"] == 0.8
    assert trip["compensation_rate"] == 0.2
    assert trip["duration_ms"] == {"p50": 300.0, "p95": 800.0}
    assert body["by_type"]["booking_cancellation"]["duration_ms"] == {"p50": 50.0, "p95": 50.0}


def test_stats_honour_the_window_and_the_owner(customer, other_customer, client_for):
    make_saga(customer, Status.COMPLETED, duration_ms=10, age_s=7200)
    make_saga(customer, Status.FAILED, duration_ms=20)
    make_saga(other_customer, Status.COMPLETED, duration_ms=30)
    an_hour_ago = (timezone.now() - timedelta(hours=1)).isoformat()

    body = client_for(customer).get("/api/sagas/stats/", {"created_after": an_hour_ago}).json()

    assert body["total"] == 1
    assert body["by_status"]["FAILED"] == 1
    assert body["success_rate"] == 0.0


def test_stats_refuse_a_window_that_ends_before_it_starts(customer, client_for):
    now = timezone.now()
    query = {
        "created_after": now.isoformat(),
        "created_before": (now - timedelta(hours=1)).isoformat(),
    }

    response = client_for(customer).get("/api/sagas/stats/", query)

    assert response.status_code == 400
    assert response.json()["errors"] == {"created_before": ["must be later than created_after"]}


def test_staff_retry_the_compensation_of_a_failed_saga(
    operator, customer, client_for, django_capture_on_commit_callbacks
):
    saga = make_saga(customer, Status.FAILED, undo_cursor=2, failure_reason="compensation failed")

    with django_capture_on_commit_callbacks() as published:
        response = client_for(operator).post(f"/api/sagas/{saga.id}/retry-compensation/")

    assert response.status_code == 202
    assert response.json()["status"] == "COMPENSATING"
    assert len(published) == 1  # the compensation chain, sent after commit
    note = SagaLog.objects.get(saga=saga, status=SagaLog.Status.NOTE)
    assert note.error.startswith("compensation retried by olga")


def test_retrying_the_compensation_of_a_saga_that_is_not_failed_is_a_409(
    operator, customer, client_for
):
    saga = make_saga(customer, Status.COMPLETED)

    response = client_for(operator).post(f"/api/sagas/{saga.id}/retry-compensation/")

    assert response.status_code == 409
    assert "this one is COMPLETED" in response.json()["detail"]


def test_customers_may_not_retry_compensations(customer, client_for):
    saga = make_saga(customer, Status.FAILED)

    response = client_for(customer).post(f"/api/sagas/{saga.id}/retry-compensation/")

    assert response.status_code == 403
    saga.refresh_from_db()
    assert saga.status == Status.FAILED


def test_retrying_an_unknown_saga_is_a_404(operator, client_for):
    response = client_for(operator).post(
        "/api/sagas/00000000-0000-0000-0000-000000000000/retry-compensation/"
    )

    assert response.status_code == 404


@pytest.mark.parametrize(
    "path", ["/api/sagas/", "/api/sagas/stats/", "/api/sagas/00000000-0000-0000-0000-000000000000/"]
)
def test_anonymous_saga_requests_get_401(client_for, path):
    assert client_for().get(path).status_code == 401
