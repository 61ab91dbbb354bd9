from datetime import timedelta

import pytest
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


def log(saga, step, phase, status, minute, index=0):
    at = timezone.now().replace(microsecond=0) + timedelta(minutes=minute)
    return SagaLog.objects.create(
        saga=saga,
        step=step,
        step_index=index,
        phase=phase,
        status=status,
        started_at=at,
        finished_at=at + timedelta(milliseconds=15),
        duration_ms=15,
    )


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


def test_a_saga_is_shown_with_its_whole_log_in_order(customer, client_for):
    saga = make_saga(customer, Status.COMPENSATED, failure_reason="step reserve_car failed")
    log(saga, "release_flight", "compensation", "succeeded", 3)
    log(saga, "reserve_flight", "action", "succeeded", 1)
    log(saga, "reserve_car", "action", "failed", 2, index=2)

    response = client_for(customer).get(f"/api/sagas/{saga.id}/")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPENSATED"
    assert body["failure_reason"] == "step reserve_car failed"
    assert [(row["step"], row["phase"], row["status"]) for row in body["log"]] == [
        ("reserve_flight", "action", "succeeded"),
        ("reserve_car", "action", "failed"),
        ("release_flight", "compensation", "succeeded"),
    ]
    assert "context" not in body  # it may hold payment tokens


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
    assert note.error == "compensation retried by olga"


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
