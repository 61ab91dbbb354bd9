"""The saga admin: list, search, the change page's timeline and log, operator actions."""

from __future__ import annotations

import re
import runpy
import uuid
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.contrib.auth.models import Permission
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_results.models import TaskResult

from sagas import admin_support
from sagas.admin_support import EstimatedCountPaginator, humanize_ms
from sagas.definitions import registry
from sagas.graph import saga_timeline
from sagas.models import Saga, SagaLog

pytestmark = pytest.mark.django_db

Status = Saga.Status
LogStatus = SagaLog.Status
ACTION = SagaLog.Phase.ACTION
COMPENSATION = SagaLog.Phase.COMPENSATION
TRIP = "trip_booking"
STEPS = ["reserve_flight", "reserve_hotel", "reserve_car", "charge_payment", "confirm_booking"]
CHANGELIST = reverse("admin:sagas_saga_changelist")
BASE_SETTINGS = django_settings.BASE_DIR / "config" / "settings" / "base.py"


def change_url(saga: Saga) -> str:
    return reverse("admin:sagas_saga_change", args=[saga.pk])


class Seeder:
    """Sagas and their log rows written straight to the database, as a worker would leave them."""

    def __init__(self) -> None:
        self.clock = timezone.now() - timedelta(minutes=5)

    def log(self, saga: Saga, step: str, phase: str, status: str, **fields) -> SagaLog:
        self.clock += timedelta(milliseconds=250)
        index = next((i for i, name in enumerate(STEPS) if name in step or step in name), 0)
        values = {
            "step_index": index,
            "attempt": 1,
            "task_id": uuid.uuid4().hex,
            "worker": "celery@test",
            "started_at": self.clock,
            "finished_at": self.clock + timedelta(milliseconds=120),
            "duration_ms": 120,
            # What a step that did its work returns (None would read "nothing to do").
            "result": {"done": step} if status == "succeeded" else None,
        }
        values.update(fields)
        return SagaLog.objects.create(saga=saga, step=step, phase=phase, status=status, **values)

    def saga(self, status: str, *, booking_id: uuid.UUID | None = None, **fields) -> Saga:
        booking_id = booking_id or uuid.uuid4()
        saga = Saga.objects.create(
            saga_type=TRIP,
            status=status,
            business_key=f"booking:{booking_id}",
            context={"booking_id": str(booking_id), "card_token": "tok_ok"},
            **fields,
        )
        history = getattr(self, f"_{status.lower()}")
        history(saga)
        return saga

    def _actions(self, saga: Saga, count: int) -> None:
        for step in STEPS[:count]:
            self.log(saga, step, ACTION, LogStatus.SUCCEEDED)

    def _pending(self, saga: Saga) -> None:
        pass

    def _running(self, saga: Saga) -> None:
        self._actions(saga, 2)
        self.log(saga, "reserve_car", ACTION, LogStatus.RETRYING, error="Timeout (retry in 0.5s)")
        Saga.objects.filter(pk=saga.pk).update(
            steps_done=2, current_step="reserve_hotel", started_at=timezone.now()
        )

    def _completed(self, saga: Saga) -> None:
        self._actions(saga, 5)
        Saga.objects.filter(pk=saga.pk).update(
            steps_done=5,
            current_step="confirm_booking",
            started_at=timezone.now() - timedelta(seconds=3),
            finished_at=timezone.now(),
            duration_ms=3_400,
        )

    def _payment_declined(self, saga: Saga) -> None:
        self._actions(saga, 3)
        for attempt in (1, 2):
            self.log(
                saga,
                "charge_payment",
                ACTION,
                LogStatus.RETRYING,
                attempt=attempt,
                error="GatewayUnavailable: try later (retry in 0.5s)",
            )
        self.log(
            saga, "charge_payment", ACTION, LogStatus.FAILED, attempt=3, error="CardDeclined: no"
        )

    def _compensating(self, saga: Saga) -> None:
        self._payment_declined(saga)
        self.log(saga, "release_car", COMPENSATION, LogStatus.SUCCEEDED)
        Saga.objects.filter(pk=saga.pk).update(
            steps_done=3,
            undo_cursor=2,
            current_step="release_car",
            started_at=timezone.now(),
            failure_reason="step charge_payment failed: CardDeclined: no",
        )

    def _compensated(self, saga: Saga) -> None:
        self._payment_declined(saga)
        for step in ("release_car", "release_hotel", "release_flight"):
            self.log(saga, step, COMPENSATION, LogStatus.SUCCEEDED)
        Saga.objects.filter(pk=saga.pk).update(
            steps_done=3,
            undo_cursor=0,
            started_at=timezone.now() - timedelta(seconds=2),
            finished_at=timezone.now(),
            duration_ms=2_100,
            failure_reason="step charge_payment failed: CardDeclined: no",
        )

    def _failed(self, saga: Saga) -> None:
        self._payment_declined(saga)
        self.log(saga, "release_car", COMPENSATION, LogStatus.SUCCEEDED)
        for attempt in range(1, 6):
            self.log(
                saga,
                "release_hotel",
                COMPENSATION,
                LogStatus.RETRYING,
                attempt=attempt,
                error="OperationalError: db down (retry in 1s)",
            )
        self.log(
            saga,
            "release_hotel",
            COMPENSATION,
            LogStatus.FAILED,
            attempt=6,
            error="OperationalError: db down",
        )
        Saga.objects.filter(pk=saga.pk).update(
            steps_done=3,
            undo_cursor=2,
            current_step="release_car",
            started_at=timezone.now() - timedelta(seconds=9),
            finished_at=timezone.now(),
            duration_ms=95_000,
            failure_reason=(
                "compensation of release_hotel exhausted its retries: OperationalError: db down"
            ),
        )


@pytest.fixture
def seed() -> Seeder:
    return Seeder()


@pytest.fixture
def every_status(seed) -> dict[str, Saga]:
    return {status: seed.saga(status) for status in Status.values}


def rows_of(response) -> list[str]:
    """The saga ids listed on a changelist page, in order."""
    return re.findall(r'name="_selected_action" value="([0-9a-f-]{36})"', response.text)


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def action(client, name: str, sagas, **extra):
    data = {"action": name, "_selected_action": [str(saga.pk) for saga in sagas], **extra}
    return client.post(CHANGELIST, data, follow=True)


# --- changelist -----------------------------------------------------------------


def test_the_changelist_shows_sagas_in_every_status_newest_first(admin_client, every_status):
    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    for saga in every_status.values():
        assert saga.get_status_display() in response.text
        assert saga.business_key in response.text
    expected = Saga.objects.order_by("-created_at").values_list("pk", flat=True)
    assert rows_of(response) == [str(pk) for pk in expected]
    assert "3.4 s" in response.text  # the COMPLETED saga's duration, human readable
    assert "1 min 35 s" in response.text  # the FAILED one's
    assert 'class="saga-badge"' in response.text


def test_the_changelist_runs_the_same_number_of_queries_for_few_or_many_sagas(
    admin_client, seed, django_assert_max_num_queries
):
    for status in Status.values:
        seed.saga(status)
    admin_client.get(CHANGELIST)  # warm the session
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(CHANGELIST).status_code == 200

    for _ in range(10):
        for status in Status.values:
            seed.saga(status)
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = admin_client.get(CHANGELIST)

    assert len(rows_of(response)) == 50  # one full page of the 66 sagas


def test_the_changelist_warns_of_sagas_whose_type_no_deployed_code_declares(admin_client, seed):
    from django.core.cache import cache

    from sagas.admin import UNKNOWN_TYPES_CACHE_KEY

    cache.delete(UNKNOWN_TYPES_CACHE_KEY)
    seed.saga(Status.COMPLETED)
    for _ in range(2):
        Saga.objects.create(saga_type="retired_type", business_key="old:x")
    Saga.objects.create(saga_type="retired_type", business_key="old:y", status=Status.COMPLETED)

    response = admin_client.get(CHANGELIST)

    [warning] = messages_of(response)
    assert "recovery skips them: retired_type (2)" in warning
    cache.delete(UNKNOWN_TYPES_CACHE_KEY)


def test_the_status_filter_lists_only_sagas_in_that_status(admin_client, every_status):
    response = admin_client.get(CHANGELIST, {"status__exact": Status.FAILED})

    assert rows_of(response) == [str(every_status[Status.FAILED].pk)]


def test_the_type_filter_offers_registered_types_and_filters_by_them(admin_client, seed):
    trip = seed.saga(Status.COMPLETED)
    other = Saga.objects.create(saga_type="booking_cancellation", business_key="booking:x")

    response = admin_client.get(CHANGELIST, {"saga_type": TRIP})

    assert rows_of(response) == [str(trip.pk)]
    assert "?saga_type=booking_cancellation" in response.text
    assert str(other.pk) in admin_client.get(CHANGELIST, {"saga_type": other.saga_type}).text


@pytest.mark.parametrize(
    ("age", "window", "listed"),
    [
        (timedelta(days=2), "today", False),
        (timedelta(days=2), "7d", True),
        (timedelta(days=10), "7d", False),
        (timedelta(days=10), "30d", True),
        (timedelta(days=40), "30d", False),
    ],
)
def test_the_created_filter_keeps_sagas_inside_the_window(admin_client, seed, age, window, listed):
    fresh = seed.saga(Status.PENDING)
    old = seed.saga(Status.COMPLETED)
    Saga.objects.filter(pk=old.pk).update(created_at=timezone.now() - age)

    ids = rows_of(admin_client.get(CHANGELIST, {"created": window}))

    assert str(fresh.pk) in ids
    assert (str(old.pk) in ids) is listed


def test_searching_a_saga_id_finds_that_saga(admin_client, every_status):
    saga = every_status[Status.COMPENSATED]

    response = admin_client.get(CHANGELIST, {"q": str(saga.pk)})

    assert rows_of(response) == [str(saga.pk)]


def test_searching_a_booking_id_finds_all_its_sagas(admin_client, seed, every_status):
    booking_id = uuid.uuid4()
    trip = seed.saga(Status.COMPLETED, booking_id=booking_id)
    cancel = Saga.objects.create(
        saga_type="booking_cancellation", business_key=f"booking:{booking_id}"
    )

    response = admin_client.get(CHANGELIST, {"q": f"  {booking_id.hex.upper()} "})

    assert set(rows_of(response)) == {str(trip.pk), str(cancel.pk)}


def test_searching_matches_business_keys_exactly_never_by_substring(admin_client, every_status):
    saga = every_status[Status.RUNNING]

    exact = admin_client.get(CHANGELIST, {"q": saga.business_key})
    partial = admin_client.get(CHANGELIST, {"q": saga.business_key[:20]})

    assert rows_of(exact) == [str(saga.pk)]
    assert rows_of(partial) == []


def test_the_changelist_search_never_runs_a_like_scan(admin_client, every_status):
    with CaptureQueriesContext(connection) as queries:
        admin_client.get(CHANGELIST, {"q": "booking:abc"})
        admin_client.get(CHANGELIST, {"q": str(uuid.uuid4())})

    assert not [q["sql"] for q in queries.captured_queries if " LIKE " in q["sql"].upper()]


# --- counting ---------------------------------------------------------------------


@pytest.mark.skipif(connection.vendor != "postgresql", reason="planner estimates are PostgreSQL's")
def test_an_unfiltered_list_is_counted_from_the_planner_estimate_on_postgresql(seed, monkeypatch):
    for status in Status.values:
        seed.saga(status)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_saga")
    monkeypatch.setattr(admin_support, "EXACT_COUNT_BELOW", 1)

    paginator = EstimatedCountPaginator(Saga.objects.order_by("-created_at"), 50)
    with CaptureQueriesContext(connection) as queries:
        count = paginator.count

    assert count == 6
    assert paginator.estimated
    assert not [q for q in queries.captured_queries if "COUNT(" in q["sql"].upper()]


def test_a_filtered_list_is_counted_exactly(seed, monkeypatch):
    for status in Status.values:
        seed.saga(status)
    monkeypatch.setattr(admin_support, "EXACT_COUNT_BELOW", 1)

    paginator = EstimatedCountPaginator(Saga.objects.filter(status=Status.FAILED), 50)

    assert paginator.count == 1
    assert not paginator.estimated


def test_a_small_or_unanalysed_table_is_counted_exactly(seed):
    seed.saga(Status.PENDING)

    paginator = EstimatedCountPaginator(Saga.objects.all(), 50)

    assert paginator.count == 1
    assert not paginator.estimated


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "\u2014"),
        (850, "850 ms"),
        (2_400, "2.4 s"),
        (192_000, "3 min 12 s"),
        (7_500_000, "2 h 5 min"),
        (97_200_000, "1 d 3 h"),
    ],
)
def test_durations_read_as_a_person_would_say_them(ms, text):
    assert humanize_ms(ms) == text


# --- change page ------------------------------------------------------------------


@pytest.mark.parametrize("status", Status.values)
def test_the_change_page_renders_read_only_for_a_saga_in_every_status(admin_client, seed, status):
    saga = seed.saga(status)

    response = admin_client.get(change_url(saga))

    assert response.status_code == 200
    assert 'id="saga-timeline"' in response.text
    assert saga.get_status_display() in response.text
    assert 'name="_save"' not in response.text
    assert 'name="_continue"' not in response.text
    assert "deletelink" not in response.text
    assert "&quot;card_token&quot;: &quot;tok_ok&quot;" in response.text  # pretty context
    inline = response.context["inline_admin_formsets"][0]
    assert not inline.has_add_permission
    assert not inline.has_change_permission
    assert not inline.has_delete_permission


def cells(response, phase: str, field: str = "state") -> dict[str, str]:
    """The graph the page draws first: each node's ``field`` by name."""
    graph = response.context["graph"]
    return {
        step[phase]["name"]: step[phase][field]
        for step in graph["steps"]
        if step[phase] is not None
    }


def test_the_timeline_of_a_failed_saga_marks_the_failing_step_and_the_failed_compensation(
    admin_client, seed
):
    saga = seed.saga(Status.FAILED)

    response = admin_client.get(change_url(saga))

    assert cells(response, ACTION) == {
        "reserve_flight": "succeeded",
        "reserve_hotel": "succeeded",
        "reserve_car": "succeeded",
        "charge_payment": "failed",
        "confirm_booking": "not_reached",
    }
    assert cells(response, COMPENSATION) == {
        "release_flight": "not_reached",
        "release_hotel": "failed",
        "release_car": "undone",
        "refund_payment": "idle",
    }
    failing = {
        name
        for phase in (ACTION, COMPENSATION)
        for name, f in cells(response, phase, "failing").items()
        if f
    }
    assert failing == {"charge_payment", "release_hotel"}
    graph = response.context["graph"]
    assert (graph["failing_action"], graph["failing_compensation"]) == (
        "charge_payment",
        "release_hotel",
    )
    assert cells(response, ACTION, "retries")["charge_payment"] == 2
    assert cells(response, COMPENSATION, "retries")["release_hotel"] == 5
    assert "error" not in graph["steps"][0]["action"]  # raw errors stay in the staff log
    assert "compensation of release_hotel exhausted its retries" in response.text


def test_the_timeline_of_a_compensated_saga_shows_every_compensation_undone_right_to_left(
    admin_client, seed
):
    saga = seed.saga(Status.COMPENSATED)

    response = admin_client.get(change_url(saga))

    assert cells(response, COMPENSATION) == {
        "release_flight": "undone",
        "release_hotel": "undone",
        "release_car": "undone",
        "refund_payment": "idle",
    }
    orders = cells(response, COMPENSATION, "order")
    assert orders == {
        "release_car": 1,
        "release_hotel": 2,
        "release_flight": 3,
        "refund_payment": 0,
    }
    graph = response.context["graph"]
    assert [step["turn"] for step in graph["steps"]] == [False, False, False, True, False]
    assert graph["steps"][4]["compensation"] is None  # confirm_booking has none
    assert graph["terminal"]
    assert response.context["graph_follow"] is False


def test_the_timeline_of_a_running_saga_shows_the_step_in_progress_and_no_compensations(
    admin_client, seed
):
    saga = seed.saga(Status.RUNNING)

    response = admin_client.get(change_url(saga))

    assert cells(response, ACTION) == {
        "reserve_flight": "succeeded",
        "reserve_hotel": "succeeded",
        "reserve_car": "retrying",
        "charge_payment": "not_reached",
        "confirm_booking": "not_reached",
    }
    graph = response.context["graph"]
    assert not graph["compensating"]
    assert graph["step_now"] == "reserve_car"
    assert re.search(r"Running now:</label>\s*<div class=\"readonly\">reserve_car<", response.text)
    assert response.context["graph_follow"] is True
    assert 'data-follow="true"' in response.text
    assert f'data-feed-url="/api/sagas/{saga.pk}/"' in response.text


def test_a_step_that_timed_out_is_compensated_too(seed):
    saga = Saga.objects.create(saga_type=TRIP, status=Status.COMPENSATED, business_key="k")
    seed.log(saga, "reserve_flight", ACTION, LogStatus.SUCCEEDED)
    seed.log(saga, "reserve_hotel", ACTION, LogStatus.TIMED_OUT, error="GatewayTimeout")
    seed.log(saga, "release_hotel", COMPENSATION, LogStatus.SKIPPED)
    seed.log(saga, "release_flight", COMPENSATION, LogStatus.SUCCEEDED)
    saga.steps_done = 1

    timeline = saga_timeline(saga, registry.get(TRIP), SagaLog.objects.filter(saga=saga))

    hotel = timeline.columns[1]
    assert (hotel.action.state, hotel.action.failing) == ("timed_out", True)
    assert (hotel.compensation.state, hotel.compensation.label) == ("skipped", "nothing to undo")
    assert hotel.turn
    assert timeline.columns[1].flows_left  # from release_hotel back to release_flight


def test_the_log_is_listed_oldest_first_with_every_column(admin_client, seed):
    saga = seed.saga(Status.FAILED)

    response = admin_client.get(change_url(saga))

    inline = response.context["inline_admin_formsets"][0]
    listed = [form.original.pk for form in inline]
    assert listed == list(
        SagaLog.objects.filter(saga=saga).order_by("started_at", "id").values_list("pk", flat=True)
    )
    assert len(listed) == 13
    html = response.text
    for header in ("Step", "Phase", "Status", "Attempt", "Task id", "Worker", "Duration", "Error"):
        assert f">{header}" in html
    assert html.index("<p>reserve_flight</p>") < html.index("<p>release_car</p>")
    assert "OperationalError: db down" in html
    assert "celery@test" in html


def test_a_log_row_links_to_its_celery_task_result_when_one_exists(admin_client, seed):
    saga = seed.saga(Status.COMPLETED)
    logged = SagaLog.objects.filter(saga=saga, step="reserve_hotel").get()
    result = TaskResult.objects.create(task_id=logged.task_id, status="SUCCESS")
    unlinked = SagaLog.objects.filter(saga=saga, step="reserve_car").get()

    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(change_url(saga))

    url = reverse("admin:django_celery_results_taskresult_change", args=[result.pk])
    link = f'<a href="{url}" title="Celery task result {logged.task_id}">{logged.task_id[:12]}'
    assert link in response.text
    assert f'<span title="{unlinked.task_id}">{unlinked.task_id[:12]}' in response.text
    assert response.text.count("Celery task result ") == 1
    task_result_queries = [
        q for q in queries.captured_queries if "django_celery_results_taskresult" in q["sql"]
    ]
    assert len(task_result_queries) == 1


def test_with_flower_url_set_every_log_row_links_to_its_task_in_flower(
    admin_client, seed, settings
):
    settings.FLOWER_URL = "http://localhost:5555"
    saga = seed.saga(Status.COMPLETED)
    logged = SagaLog.objects.filter(saga=saga, step="reserve_hotel").get()
    result = TaskResult.objects.create(task_id=logged.task_id, status="SUCCESS")

    html = admin_client.get(change_url(saga)).text

    task_ids = list(SagaLog.objects.filter(saga=saga).values_list("task_id", flat=True))
    for task_id in task_ids:
        assert (
            f'<a href="http://localhost:5555/task/{task_id}" title="Task {task_id} in Flower" '
            'target="_blank" rel="noopener">Flower</a>'
        ) in html
    assert html.count(">Flower</a>") == len(task_ids)
    # The stored result keeps its own link beside Flower's.
    url = reverse("admin:django_celery_results_taskresult_change", args=[result.pk])
    assert f'<a href="{url}" title="Celery task result {logged.task_id}">' in html
    log_list = admin_client.get(reverse("admin:sagas_sagalog_changelist")).text
    assert f'href="http://localhost:5555/task/{logged.task_id}"' in log_list


def test_without_flower_url_no_log_row_links_to_flower(admin_client, seed, settings):
    settings.FLOWER_URL = ""
    saga = seed.saga(Status.COMPLETED)

    html = admin_client.get(change_url(saga)).text

    assert "/task/" not in html
    assert ">Flower</a>" not in html


def test_a_log_row_without_a_task_id_links_nowhere(admin_client, seed, settings):
    settings.FLOWER_URL = "http://localhost:5555"
    saga = seed.saga(Status.PENDING)
    seed.log(saga, "reserve_flight", ACTION, LogStatus.STARTED, task_id="")

    html = admin_client.get(change_url(saga)).text

    assert "localhost:5555/task/" not in html


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://localhost:5555", "http://localhost:5555"),
        ("https://flower.example.com/flower/", "https://flower.example.com/flower"),
        ("", ""),
    ],
)
def test_flower_url_takes_an_http_url_without_its_trailing_slash(monkeypatch, raw, expected):
    monkeypatch.setenv("FLOWER_URL", raw)

    assert runpy.run_path(str(BASE_SETTINGS))["FLOWER_URL"] == expected


@pytest.mark.parametrize("raw", ["localhost:5555", "ftp://localhost:5555", "http://", "flower"])
def test_a_flower_url_that_is_not_http_stops_the_settings_from_loading(monkeypatch, raw):
    monkeypatch.setenv("FLOWER_URL", raw)

    with pytest.raises(ImproperlyConfigured, match=r"FLOWER_URL=.* is not an http\(s\) URL"):
        runpy.run_path(str(BASE_SETTINGS))


def test_the_change_page_runs_a_constant_number_of_queries(admin_client, seed):
    short = seed.saga(Status.COMPLETED)
    long = seed.saga(Status.FAILED)
    admin_client.get(change_url(short))
    with CaptureQueriesContext(connection) as few:
        admin_client.get(change_url(short))
    with CaptureQueriesContext(connection) as many:
        admin_client.get(change_url(long))

    assert len(many.captured_queries) == len(few.captured_queries)


def test_a_saga_cannot_be_saved_or_deleted_from_the_admin(admin_client, seed):
    saga = seed.saga(Status.FAILED)

    saved = admin_client.post(change_url(saga), {"status": Status.COMPLETED, "_save": "Save"})
    deleted = admin_client.post(reverse("admin:sagas_saga_delete", args=[saga.pk]), {"post": "yes"})
    added = admin_client.get(reverse("admin:sagas_saga_add"))

    assert (saved.status_code, deleted.status_code, added.status_code) == (403, 403, 403)
    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    assert SagaLog.objects.filter(saga=saga).count() == 13


def test_the_saga_log_cannot_be_changed_or_deleted_via_admin_urls(admin_client, seed):
    saga = seed.saga(Status.COMPLETED)
    row = SagaLog.objects.filter(saga=saga).first()

    viewed = admin_client.get(reverse("admin:sagas_sagalog_change", args=[row.pk]))
    changed = admin_client.post(
        reverse("admin:sagas_sagalog_change", args=[row.pk]),
        {"status": LogStatus.FAILED, "error": "forged"},
    )
    deleted = admin_client.post(
        reverse("admin:sagas_sagalog_delete", args=[row.pk]), {"post": "yes"}
    )
    added = admin_client.get(reverse("admin:sagas_sagalog_add"))
    bulk = admin_client.post(
        reverse("admin:sagas_sagalog_changelist"),
        {"action": "delete_selected", "_selected_action": [row.pk], "post": "yes"},
    )

    assert viewed.status_code == 200
    assert 'name="_save"' not in viewed.text
    assert (changed.status_code, deleted.status_code, added.status_code) == (403, 403, 403)
    assert bulk.status_code == 200  # the action does not exist: nothing happens
    row.refresh_from_db()
    assert (row.status, row.error) == (LogStatus.SUCCEEDED, "")
    assert SagaLog.objects.filter(saga=saga).count() == 5


def test_the_log_changelist_finds_rows_by_saga_id_or_task_id(admin_client, every_status):
    saga = every_status[Status.COMPENSATED]
    row = SagaLog.objects.filter(saga=every_status[Status.COMPLETED]).first()
    url = reverse("admin:sagas_sagalog_changelist")

    by_saga = admin_client.get(url, {"q": str(saga.pk)})
    by_task = admin_client.get(url, {"q": row.task_id})

    assert by_saga.status_code == 200
    assert len(by_saga.context["cl"].result_list) == SagaLog.objects.filter(saga=saga).count()
    assert list(by_task.context["cl"].result_list) == [row]


def test_staff_who_may_only_view_sagas_read_them_but_get_no_operator_actions(
    client, django_user_model, seed
):
    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_saga"))
    client.force_login(viewer)
    saga = seed.saga(Status.FAILED)

    page = client.get(change_url(saga))
    listing = client.get(CHANGELIST)
    retry = client.post(reverse("admin:sagas_saga_retry_compensation", args=[saga.pk]))

    assert page.status_code == 200
    assert "OperationalError: db down" in page.text  # the log inline is visible to viewers
    assert "Retry compensation" not in page.text
    assert "retry_compensation" not in listing.text
    assert retry.status_code == 403
    saga.refresh_from_db()
    assert saga.status == Status.FAILED


# --- retry compensation -------------------------------------------------------------


def test_retry_compensation_moves_a_failed_saga_to_compensating_and_logs_the_operator(
    admin_client, seed, django_capture_on_commit_callbacks
):
    saga = seed.saga(Status.FAILED)

    with django_capture_on_commit_callbacks(execute=False) as publishes:
        response = action(admin_client, "retry_compensation", [saga])

    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    assert len(publishes) == 1  # the compensation chain, published after commit
    note = SagaLog.objects.filter(saga=saga, phase=SagaLog.Phase.OPERATOR).get()
    assert note.status == LogStatus.NOTE
    assert note.error == "compensation retried by admin (round 1)"
    assert messages_of(response) == [f"Compensation retried for 1 saga(s): {str(saga.pk)[:8]}."]


def test_retry_compensation_leaves_sagas_that_are_not_failed_untouched_with_a_warning(
    admin_client, seed, django_capture_on_commit_callbacks
):
    completed = seed.saga(Status.COMPLETED)
    failed = seed.saga(Status.FAILED)

    with django_capture_on_commit_callbacks(execute=False) as publishes:
        response = action(admin_client, "retry_compensation", [completed, failed])

    completed.refresh_from_db()
    failed.refresh_from_db()
    assert completed.status == Status.COMPLETED
    assert failed.status == Status.COMPENSATING
    assert len(publishes) == 1
    assert not SagaLog.objects.filter(saga=completed, phase=SagaLog.Phase.OPERATOR).exists()
    warning = messages_of(response)[-1]
    assert warning == (
        "Only FAILED sagas can retry compensation; 1 selected saga(s) left untouched: "
        f"{str(completed.pk)[:8]} (COMPLETED)."
    )


def test_retry_compensation_reports_the_service_refusal_for_a_resolved_saga(admin_client, seed):
    saga = seed.saga(Status.FAILED, resolved_at=timezone.now(), resolved_by="bob")

    response = action(admin_client, "retry_compensation", [saga])

    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    assert messages_of(response) == [f"Saga {saga.pk}: saga was already resolved by hand by bob"]


def test_the_change_page_offers_retry_compensation_as_a_button(
    admin_client, seed, django_capture_on_commit_callbacks
):
    saga = seed.saga(Status.FAILED)
    button_url = reverse("admin:sagas_saga_retry_compensation", args=[saga.pk])
    assert f'action="{button_url}"' in admin_client.get(change_url(saga)).text

    with django_capture_on_commit_callbacks(execute=False):
        response = admin_client.post(button_url, follow=True)

    saga.refresh_from_db()
    assert saga.status == Status.COMPENSATING
    assert response.redirect_chain[-1][0] == change_url(saga)
    assert "Compensation retried." in messages_of(response)
    assert admin_client.get(button_url).status_code == 405  # only a POST changes anything


def test_the_change_page_button_reports_an_error_when_the_saga_is_not_failed(admin_client, seed):
    saga = seed.saga(Status.COMPLETED)

    response = admin_client.post(
        reverse("admin:sagas_saga_retry_compensation", args=[saga.pk]), follow=True
    )

    assert messages_of(response) == [
        f"Saga {saga.pk}: only FAILED sagas can retry compensation; this one is COMPLETED"
    ]
    saga.refresh_from_db()
    assert saga.status == Status.COMPLETED


# --- mark resolved --------------------------------------------------------------


def test_mark_resolved_first_asks_for_a_reason(admin_client, seed):
    saga = seed.saga(Status.FAILED)

    response = action(admin_client, "mark_resolved", [saga])

    assert response.status_code == 200
    assert response.templates[0].name == "admin/sagas/saga/mark_resolved.html"
    assert '<textarea name="reason"' in response.text
    assert f'name="_selected_action" value="{saga.pk}"' in response.text
    assert 'name="action" value="mark_resolved"' in response.text
    assert 'name="apply"' in response.text
    saga.refresh_from_db()
    assert not saga.is_resolved


def test_mark_resolved_refuses_an_empty_reason_and_changes_nothing(admin_client, seed):
    saga = seed.saga(Status.FAILED)

    response = action(admin_client, "mark_resolved", [saga], apply="1", reason="   ")

    assert response.status_code == 200
    assert "A reason is required to mark a saga resolved." in response.text
    saga.refresh_from_db()
    assert (saga.resolved_at, saga.resolved_by, saga.resolution) == (None, "", "")
    assert not SagaLog.objects.filter(saga=saga, phase=SagaLog.Phase.OPERATOR).exists()


def test_mark_resolved_with_a_reason_records_who_and_why_and_logs_it(admin_client, seed):
    saga = seed.saga(Status.FAILED)
    running = seed.saga(Status.RUNNING)

    response = action(
        admin_client,
        "mark_resolved",
        [saga, running],
        apply="1",
        reason="Hotel released by phone with the supplier.",
    )

    saga.refresh_from_db()
    assert saga.status == Status.FAILED
    assert saga.resolved_by == "admin"
    assert saga.resolution == "Hotel released by phone with the supplier."
    assert saga.resolved_at is not None
    note = SagaLog.objects.filter(saga=saga, phase=SagaLog.Phase.OPERATOR).get()
    assert note.error == "marked resolved by admin: Hotel released by phone with the supplier."
    running.refresh_from_db()
    assert not running.is_resolved
    assert messages_of(response) == [
        f"Marked 1 saga(s) resolved: {str(saga.pk)[:8]}.",
        "Only FAILED sagas can be marked resolved; 1 selected saga(s) left untouched: "
        f"{str(running.pk)[:8]} (RUNNING).",
    ]
    page = admin_client.get(change_url(saga)).text
    assert "Resolved by admin" in page
    assert "FAILED \u00b7 resolved" in page or "Failed \u00b7 resolved" in page


def test_mark_resolved_from_the_change_page(admin_client, seed):
    saga = seed.saga(Status.FAILED)
    url = reverse("admin:sagas_saga_mark_resolved", args=[saga.pk])
    assert f'href="{url}"' in admin_client.get(change_url(saga)).text

    form = admin_client.get(url)
    refused = admin_client.post(url, {"reason": ""})
    done = admin_client.post(url, {"reason": "refunded by hand"}, follow=True)

    assert '<textarea name="reason"' in form.text
    assert "A reason is required to mark a saga resolved." in refused.text
    assert done.redirect_chain[-1][0] == change_url(saga)
    assert "Saga marked resolved." in messages_of(done)
    saga.refresh_from_db()
    assert (saga.resolved_by, saga.resolution) == ("admin", "refunded by hand")


def test_mark_resolved_reports_a_saga_that_was_already_resolved(admin_client, seed):
    saga = seed.saga(Status.FAILED, resolved_at=timezone.now(), resolved_by="bob")

    response = action(admin_client, "mark_resolved", [saga], apply="1", reason="again")

    assert messages_of(response) == [f"Saga {saga.pk}: saga was already resolved by hand by bob"]
    saga.refresh_from_db()
    assert saga.resolved_by == "bob"


def test_the_saga_page_shows_times_to_the_second(admin_client, seed):
    saga = seed.saga(Status.COMPLETED)
    Saga.objects.filter(pk=saga.pk).update(
        finished_at=timezone.make_aware(timezone.datetime(2026, 12, 2, 12, 7, 31))
    )

    response = admin_client.get(change_url(saga))

    assert "2026-12-02 12:07:31" in response.text
