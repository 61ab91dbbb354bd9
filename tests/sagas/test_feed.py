"""The live feed: a saga's graph and log since a cursor, and the fleet's transitions."""

import re
import time
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone

from sagas import feed
from sagas.models import Saga, SagaLog
from tests.sagas.test_apis import failed_refund_saga, log, make_saga

pytestmark = pytest.mark.django_db

Status = Saga.Status


@pytest.fixture(autouse=True)
def _fresh_summary():
    """The live summary is cached for a second per process: each test reads its own rows."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture
def settled(settings):
    """Rows count as settled at once: the cursor is not held back behind them."""
    settings.SAGA_FEED_SETTLE_S = -3600


def running_saga(owner):
    saga = make_saga(owner, Status.RUNNING, steps_done=2)
    log(saga, "reserve_flight", "action", "succeeded", -3, index=0, result={"held": ["h1"]})
    log(saga, "reserve_hotel", "action", "succeeded", -2, index=1, result={"held": ["h2"]})
    log(saga, "reserve_car", "action", "retrying", -1, index=2, error="car desk down")
    return saga


def test_the_detail_carries_the_graph_and_a_cursor_past_every_settled_row(
    customer, client_for, settled
):
    saga = running_saga(customer)

    answer = client_for(customer).get(f"/api/sagas/{saga.id}/").json()

    rows = list(SagaLog.objects.filter(saga=saga).order_by("id"))
    assert answer["cursor"] == str(rows[-1].id)
    assert [row["id"] for row in answer["log"]] == [row.id for row in rows]
    graph = answer["graph"]
    assert graph["status"] == "RUNNING"
    assert not graph["terminal"]
    assert graph["step_now"] == "reserve_car"
    states = [step["action"]["state"] for step in graph["steps"]]
    assert states == ["succeeded", "succeeded", "retrying", "not_reached", "not_reached"]
    assert graph["steps"][2]["action"]["label"] == "failed, retrying (attempt 2)"
    assert "error" not in graph["steps"][2]["action"]


def test_after_a_cursor_only_newer_rows_come_and_the_graph_moves_on(customer, client_for, settled):
    saga = running_saga(customer)
    client = client_for(customer)
    first = client.get(f"/api/sagas/{saga.id}/").json()

    car = log(saga, "reserve_car", "action", "succeeded", 0, index=2, result={"held": []})
    Saga.objects.filter(pk=saga.pk).update(steps_done=3)
    answer = client.get(f"/api/sagas/{saga.id}/", {"after": first["cursor"]}).json()

    assert [row["id"] for row in answer["log"]] == [car.id]
    assert answer["cursor"] == str(car.id)
    car_node = answer["graph"]["steps"][2]["action"]
    assert (car_node["state"], car_node["label"]) == ("nothing", "nothing to do")
    assert answer["graph"]["step_now"] == "charge_payment"


def test_rows_that_just_finished_hold_the_cursor_back_so_a_late_commit_is_not_skipped(
    customer, client_for
):
    saga = make_saga(customer, Status.RUNNING)
    old = log(saga, "reserve_flight", "action", "succeeded", -5, index=0)
    fresh = log(saga, "reserve_hotel", "action", "succeeded", 0, index=1)

    answer = client_for(customer).get(f"/api/sagas/{saga.id}/", {"after": 0}).json()

    # Both rows are listed, but the cursor stays on the settled one: a row with an id
    # between them that commits late still comes on the next poll.
    assert [row["id"] for row in answer["log"]] == [old.id, fresh.id]
    assert answer["cursor"] == str(old.id)


@pytest.mark.parametrize("after", ["-1", "abc", "1.5"])
def test_a_bad_cursor_is_refused_naming_the_parameter(customer, client_for, after):
    saga = running_saga(customer)

    response = client_for(customer).get(f"/api/sagas/{saga.id}/", {"after": after})

    assert response.status_code == 400
    assert "after" in response.json()["errors"]


def test_the_graph_marks_duplicates_and_a_compensation_healed_by_an_operator_retry(
    customer, client_for
):
    saga = failed_refund_saga(customer)
    log(saga, "reserve_hotel", "action", "duplicate", 6, index=1)
    log(saga, "refund_payment", "compensation", "succeeded", 7, index=3, result={"r": 1})
    Saga.objects.filter(pk=saga.pk).update(status=Status.COMPENSATED, undo_cursor=0)

    graph = client_for(customer).get(f"/api/sagas/{saga.id}/").json()["graph"]

    hotel = graph["steps"][1]["action"]
    assert (hotel["state"], hotel["duplicates"]) == ("succeeded", 1)
    refund = graph["steps"][3]["compensation"]
    assert (refund["state"], refund["healed"]) == ("undone", True)
    assert refund["label"] == "undone after an operator's retry"
    assert graph["terminal"]


@pytest.mark.parametrize(
    ("result", "state"),
    [
        ({"held": []}, "nothing"),
        (None, "nothing"),
        ({"amount": 0}, "succeeded"),
        ({"held": ["h1"]}, "succeeded"),
    ],
)
def test_an_action_that_found_no_work_reads_nothing_to_do(customer, result, state):
    saga = make_saga(customer, Status.RUNNING, steps_done=1)
    row = log(saga, "reserve_flight", "action", "succeeded", 0, index=0, result=result)

    graph = feed.graph_data(saga, [row])

    assert graph["steps"][0]["action"]["state"] == state


def test_a_redelivery_after_a_lost_worker_is_counted_apart_and_reads_in_progress(customer):
    saga = make_saga(customer, Status.RUNNING, steps_done=1)
    rows = [
        log(saga, "reserve_flight", "action", "succeeded", -1, index=0),
        log(saga, "reserve_hotel", "action", "lost", 0, index=1, may_have_effect=True),
    ]

    hotel = feed.graph_data(saga, rows)["steps"][1]["action"]

    assert (hotel["state"], hotel["label"]) == ("running", "in progress")
    assert (hotel["redelivered"], hotel["duplicates"]) == (1, 0)


def test_a_call_that_failed_after_going_out_is_due_for_undoing(customer):
    saga = make_saga(customer, Status.COMPENSATING, steps_done=3, undo_cursor=4)
    rows = [
        log(saga, "charge_payment", "action", "failed", 0, index=3, may_have_effect=True),
    ]

    refund = feed.graph_data(saga, rows)["steps"][3]["compensation"]

    assert (refund["state"], refund["label"]) == ("pending", "to undo")


def test_a_saga_of_an_undeclared_type_has_no_graph_but_its_log(customer, client_for):
    saga = make_saga(customer, Status.RUNNING, saga_type="retired_type")
    log(saga, "old_step", "action", "succeeded", 0)

    answer = client_for(customer).get(f"/api/sagas/{saga.id}/").json()

    assert answer["graph"] is None
    assert len(answer["log"]) == 1


# --- the fleet feed -----------------------------------------------------------------------


def test_the_live_feed_lists_transitions_in_order_with_what_they_mean(
    operator, customer, client_for, settled
):
    saga = failed_refund_saga(customer)
    done = make_saga(customer, Status.COMPLETED, steps_done=5)
    for index, step in enumerate(
        ["reserve_flight", "reserve_hotel", "reserve_car", "charge_payment", "confirm_booking"]
    ):
        log(done, step, "action", "succeeded", 10 + index, index=index)

    answer = client_for(operator).get("/api/sagas/live/").json()

    kinds = [(event["saga_id"], event["step"], event["kind"]) for event in answer["events"]]
    ids = [event["id"] for event in answer["events"]]
    assert ids == sorted(ids)
    assert (str(saga.id), "reserve_flight", "started") in kinds
    assert (str(saga.id), "charge_payment", "compensating") in kinds
    assert (str(saga.id), "refund_payment", "retrying") in kinds
    assert (str(saga.id), "refund_payment", "failed") in kinds
    assert (str(done.id), "reserve_hotel", "step_done") in kinds
    assert (str(done.id), "confirm_booking", "completed") in kinds
    assert feed.FleetCursor.parse(answer["cursor"]).high == ids[-1]
    assert answer["awaiting_operator"]["count"] == 1
    assert answer["awaiting_operator"]["sagas"][0]["id"] == str(saga.id)
    assert "failure_reason" in answer["awaiting_operator"]["sagas"][0]  # staff

    again = client_for(operator).get("/api/sagas/live/", {"after": answer["cursor"]}).json()
    assert again["events"] == []
    assert feed.FleetCursor.parse(again["cursor"]).high == ids[-1]


def test_the_live_feed_counts_sagas_in_flight_by_the_step_running_now(
    operator, customer, client_for
):
    running_saga(customer)
    running_saga(customer)
    undoing = make_saga(customer, Status.COMPENSATING, steps_done=3, undo_cursor=3)
    log(undoing, "charge_payment", "action", "failed", 0, index=3)

    answer = client_for(operator).get("/api/sagas/live/").json()

    assert answer["in_flight"] == [
        {"saga_type": "trip_booking", "status": "COMPENSATING", "step": "release_car", "count": 1},
        {"saga_type": "trip_booking", "status": "RUNNING", "step": "reserve_car", "count": 2},
    ]


def test_the_live_feed_rates_count_the_last_minute_only(operator, customer, client_for):
    make_saga(customer, Status.RUNNING)
    make_saga(customer, Status.RUNNING, age_s=600)
    ended = make_saga(customer, Status.COMPENSATED)
    Saga.objects.filter(pk=ended.pk).update(finished_at=timezone.now())
    old = make_saga(customer, Status.COMPLETED, age_s=900)
    Saga.objects.filter(pk=old.pk).update(finished_at=timezone.now() - timedelta(minutes=5))

    rates = client_for(operator).get("/api/sagas/live/").json()["rates_per_minute"]

    assert rates["trip_booking"] == {"started": 2, "completed": 0, "compensated": 1, "failed": 0}


def test_customers_follow_only_their_own_sagas_and_never_see_internals(
    customer, other_customer, client_for, settled
):
    mine = failed_refund_saga(customer)
    theirs = running_saga(other_customer)

    answer = client_for(customer).get("/api/sagas/live/").json()

    assert {event["saga_id"] for event in answer["events"]} == {str(mine.id)}
    assert answer["in_flight"] == []
    assert "failure_reason" not in answer["awaiting_operator"]["sagas"][0]
    assert str(theirs.id) not in str(answer)
    assert client_for(other_customer).get(f"/api/sagas/{mine.id}/").status_code == 404


def live(client, cursor=None) -> dict:
    answer = client.get("/api/sagas/live/", {} if cursor is None else {"after": cursor})
    assert answer.status_code == 200, answer.content
    return answer.json()


def test_a_row_that_commits_after_a_newer_one_comes_once_when_it_appears(
    operator, customer, client_for
):
    client = client_for(operator)
    saga = make_saga(customer, Status.RUNNING)
    first = log(saga, "reserve_flight", "action", "succeeded", 0, index=0)
    cursor = live(client)["cursor"]
    # The next id is taken by a transaction that has not committed yet; a newer row commits.
    late_id, newer_id = first.id + 1, first.id + 2
    log(saga, "reserve_car", "action", "succeeded", 0, index=2, id=newer_id)

    answer = live(client, cursor)
    assert [event["id"] for event in answer["events"]] == [newer_id]
    waiting = feed.FleetCursor.parse(answer["cursor"])
    assert waiting.high == newer_id
    assert late_id in dict(waiting.gaps)

    log(saga, "reserve_hotel", "action", "succeeded", 0, index=1, id=late_id)
    again = live(client, answer["cursor"])
    assert [event["id"] for event in again["events"]] == [late_id]
    assert late_id not in dict(feed.FleetCursor.parse(again["cursor"]).gaps)
    assert live(client, again["cursor"])["events"] == []


def test_a_gap_that_never_fills_is_dropped_after_the_settle_time(operator, customer, client_for):
    saga = make_saga(customer, Status.RUNNING)
    row = log(saga, "reserve_flight", "action", "succeeded", 0, index=0)
    stale = int(time.time()) - 60

    answer = live(client_for(operator), f"{row.id}~{row.id - 1}.{stale}")

    assert answer["cursor"] == str(row.id)


def test_a_burst_larger_than_a_page_is_read_page_by_page_never_twice(
    operator, customer, client_for
):
    client = client_for(operator)
    cursor = live(client)["cursor"]
    saga = make_saga(customer, Status.RUNNING)
    now = timezone.now()
    SagaLog.objects.bulk_create(
        SagaLog(
            saga=saga,
            step="reserve_flight",
            step_index=0,
            phase="action",
            status="duplicate",
            started_at=now,
            finished_at=now,
        )
        for _ in range(feed.EVENTS_PAGE * 2 + 50)
    )

    seen: list[int] = []
    for _ in range(3):
        answer = live(client, cursor)
        seen += [event["id"] for event in answer["events"]]
        cursor = answer["cursor"]

    assert len(seen) == len(set(seen)) == feed.EVENTS_PAGE * 2 + 50
    assert feed.FleetCursor.parse(cursor).high == max(seen)


def test_other_owners_rows_move_a_customers_cursor_on_without_showing_them(
    customer, other_customer, client_for
):
    client = client_for(customer)
    cursor = live(client)["cursor"]
    theirs = running_saga(other_customer)
    mine = make_saga(customer, Status.RUNNING)
    row = log(mine, "reserve_flight", "action", "succeeded", 0, index=0)

    answer = live(client, cursor)

    assert [event["id"] for event in answer["events"]] == [row.id]
    # Past their rows too (ids the test database's rolled-back tests used stay gaps a while).
    assert feed.FleetCursor.parse(answer["cursor"]).high == row.id
    assert str(theirs.id) not in str(answer)


@pytest.mark.parametrize("after", ["-1", "abc", "5~", "5~6", "5~6.x", "1" * 19])
def test_a_bad_fleet_cursor_is_refused_naming_the_parameter(operator, client_for, after):
    response = client_for(operator).get("/api/sagas/live/", {"after": after})

    assert response.status_code == 400
    assert "after" in response.json()["errors"]


def test_a_called_out_step_comes_again_when_its_outcome_is_written_into_its_row(
    operator, customer, client_for
):
    client = client_for(operator)
    saga = make_saga(customer, Status.RUNNING, steps_done=3)
    cursor = live(client)["cursor"]
    charge = log(saga, "charge_payment", "action", "started", 0, index=3)

    first = live(client, cursor)
    assert [(e["id"], e["kind"]) for e in first["events"]] == [(charge.id, "called_out")]
    assert f"!{charge.id}." in first["cursor"]
    assert live(client, first["cursor"])["events"] == []  # still out: nothing new

    SagaLog.objects.filter(pk=charge.pk).update(status="failed")  # barrier.close_call
    closed = live(client, first["cursor"])
    assert [(e["id"], e["kind"]) for e in closed["events"]] == [(charge.id, "compensating")]
    assert "!" not in closed["cursor"]
    assert live(client, closed["cursor"])["events"] == []


def test_one_sagas_cursor_waits_on_a_called_out_row_until_its_outcome(
    customer, client_for, settled
):
    client = client_for(customer)
    saga = make_saga(customer, Status.RUNNING, steps_done=3)
    done = log(saga, "reserve_car", "action", "succeeded", -1, index=2)
    charge = log(saga, "charge_payment", "action", "started", -1, index=3)

    answer = client.get(f"/api/sagas/{saga.id}/", {"after": 0}).json()
    assert answer["cursor"] == str(done.id)

    SagaLog.objects.filter(pk=charge.pk).update(status="succeeded")
    again = client.get(f"/api/sagas/{saga.id}/", {"after": answer["cursor"]}).json()
    assert [(row["id"], row["status"]) for row in again["log"]] == [(charge.id, "succeeded")]
    assert again["cursor"] == str(charge.id)


@pytest.mark.parametrize(
    ("phase", "index", "status", "attempt", "kind"),
    [
        ("action", 0, "retrying", 1, "retrying"),
        ("action", 0, "succeeded", 1, "started"),
        ("action", 4, "succeeded", 1, "completed"),
        ("action", 3, "started", 1, "called_out"),
        ("action", 1, "lost", 1, "redelivered"),
        ("compensation", 1, "timed_out", 1, "retrying"),
        ("compensation", 0, "succeeded", 1, "compensated"),
        ("compensation", 2, "skipped", 1, "undone"),
        ("compensation", 2, "failed", 3, "failed"),
    ],
)
def test_each_log_row_reads_as_the_transition_it_is(customer, phase, index, status, attempt, kind):
    saga = make_saga(customer, Status.RUNNING)
    row = log(saga, "a_step", phase, status, 0, index=index, attempt=attempt)

    assert feed._kind(SagaLog.objects.select_related("saga").get(pk=row.pk)) == kind


def test_the_fleet_summary_is_read_once_a_second_however_many_pages_poll(operator, client_for):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    client = client_for(operator)
    with CaptureQueriesContext(connection) as first:
        cursor = live(client)["cursor"]
    with CaptureQueriesContext(connection) as second:
        live(client, cursor)

    summary_tables = [q for q in first.captured_queries if '"sagas_saga"' in q["sql"]]
    assert summary_tables
    assert not [q for q in second.captured_queries if 'FROM "sagas_saga"' in q["sql"]]


def test_the_live_feed_needs_a_login(client):
    assert client.get("/api/sagas/live/").status_code in (401, 403)


def test_next_cursor_never_moves_backwards():
    now = timezone.now()
    rows = [SagaLog(id=7, finished_at=now), SagaLog(id=9, finished_at=now)]

    assert feed.next_cursor(rows, 12) == 12
    assert feed.next_cursor([], 5) == 5


# --- the admin pages ----------------------------------------------------------------------


def test_the_live_operations_page_is_linked_from_the_list_and_served_to_staff(admin_client):
    listing = admin_client.get("/admin/sagas/saga/")
    page = admin_client.get("/admin/sagas/saga/live/")

    assert 'href="/admin/sagas/saga/live/"' in listing.text
    assert page.status_code == 200
    assert 'data-feed-url="/api/sagas/live/"' in page.text
    assert "/static/sagas/saga_live.js" in page.text
    scripts = re.findall(r'<(?:script|link)[^>]+(?:src|href)="([^"]+)"', page.text)
    assert scripts
    assert all(url.startswith("/") for url in scripts), scripts  # served here, no CDN


def test_the_live_page_needs_permission_to_view_sagas(django_user_model, client):
    staff = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    client.force_login(staff)

    assert client.get("/admin/sagas/saga/live/").status_code == 403

    staff.user_permissions.add(Permission.objects.get(codename="view_saga"))
    assert client.get("/admin/sagas/saga/live/").status_code == 200


def test_every_registered_saga_type_gets_a_graph_from_its_definition(customer):
    from sagas.definitions import registry

    for name in registry.names():
        definition = registry.get(name)
        saga = make_saga(customer, Status.RUNNING, saga_type=name)

        graph = feed.graph_data(saga, [])

        assert [step["action"]["name"] for step in graph["steps"]] == definition.action_names
        assert graph["step_now"] == definition.steps[0].name
        assert graph["steps"][0]["action"]["state"] == "running"


def test_the_first_poll_follows_rows_just_below_the_newest_that_commit_late(
    operator, customer, client_for
):
    client = client_for(operator)
    saga = make_saga(customer, Status.RUNNING)
    first = log(saga, "reserve_flight", "action", "succeeded", 0, index=0)
    newest = log(saga, "reserve_car", "action", "succeeded", 0, index=2, id=first.id + 2)

    opened = live(client)
    assert [e["id"] for e in opened["events"]][-1] == newest.id

    late = log(saga, "reserve_hotel", "action", "succeeded", 0, index=1, id=first.id + 1)
    assert [e["id"] for e in live(client, opened["cursor"])["events"]] == [late.id]


def test_the_saga_page_lists_only_rows_it_has_not_shown(admin_client, customer):
    saga = make_saga(customer, Status.RUNNING)
    fresh = log(saga, "reserve_flight", "action", "succeeded", 0, index=0)

    page = admin_client.get(f"/admin/sagas/saga/{saga.pk}/change/")

    assert page.context["graph_cursor"] < fresh.id  # held back: it just finished
    assert f'data-seen="{fresh.id}:succeeded"' in page.text
