"""Watching sagas in a real browser: the saga page's graph and the live operations page.

The trip runs on the real worker (real Redis, real database); the page is
never reloaded: a marker set on ``window`` at the start must still be there
at the end.
"""

from __future__ import annotations

import pytest

from sagas.models import Saga
from tests.functional.support import book_trip, wait_terminal

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

WAIT_MS = 20_000
SLOW_MS = 4_000


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def node(phase: str, step: str, state: str | None = None) -> str:
    selector = f'.tl-cell[data-phase="{phase}"][data-step="{step}"]'
    return selector + (f'[data-state="{state}"]' if state else "")


def snap(page, artifacts, stage: str) -> None:
    """The whole page, and the graph alone (the README shows those)."""
    page.screenshot(path=str(artifacts / f"{stage}.png"), full_page=True)
    page.locator("#saga-timeline").screenshot(path=str(artifacts / f"{stage}-graph.png"))


def states(page, phase: str) -> dict[str, str]:
    return page.eval_on_selector_all(
        f'.tl-cell[data-phase="{phase}"]',
        "cells => Object.fromEntries(cells.map(c => [c.dataset.step, c.dataset.state]))",
    )


def test_a_trip_is_watched_from_running_through_compensating_to_compensated(
    staff_page, live_server, customer, trip_items, artifacts
):
    page = staff_page
    booking = book_trip(
        customer,
        trip_items,
        chaos={
            "delay_ms": {"reserve_hotel": SLOW_MS, "release_hotel": SLOW_MS},
            "fail": ["charge_payment"],
        },
    )
    page.goto(f"{live_server.url}/admin/sagas/saga/{booking.saga_id}/change/")
    page.evaluate("window.__sameDocument = 42")

    # Running: the hotel is being held, the flight is done, the rest waits.
    page.wait_for_selector(node("action", "reserve_hotel", "running"), timeout=WAIT_MS)
    assert page.get_attribute("#saga-timeline", "data-live") == "true"
    assert states(page, "action") == {
        "reserve_flight": "succeeded",
        "reserve_hotel": "running",
        "reserve_car": "not_reached",
        "charge_payment": "not_reached",
        "confirm_booking": "not_reached",
    }
    assert page.text_content(".live-now") == "now: reserve_hotel"
    snap(page, artifacts, "1-running")

    # Compensating: the charge failed, the car is released, the hotel is next (slow).
    page.wait_for_selector('#saga-timeline[data-status="COMPENSATING"]', timeout=WAIT_MS)
    page.wait_for_selector(node("compensation", "release_car", "undone"), timeout=WAIT_MS)
    assert page.get_attribute(node("action", "charge_payment"), "data-failing") == "true"
    assert states(page, "compensation")["release_hotel"] == "pending"
    assert states(page, "compensation")["release_flight"] == "pending"
    snap(page, artifacts, "2-compensating")

    # Compensated: every step done is undone, newest first; the page stops polling.
    page.wait_for_selector('#saga-timeline[data-status="COMPENSATED"]', timeout=WAIT_MS)
    assert states(page, "compensation") == {
        "release_flight": "undone",
        "release_hotel": "undone",
        "release_car": "undone",
        "refund_payment": "idle",
    }
    orders = page.eval_on_selector_all(
        '.tl-cell[data-phase="compensation"][data-state="undone"] .tl-name',
        "names => names.map(n => n.textContent)",
    )
    assert orders == ["#3 release_flight", "#2 release_hotel", "#1 release_car"]
    assert page.get_attribute("#saga-timeline", "data-live") == "false"
    assert page.text_content("h2 [data-live-status]") == "COMPENSATED"  # the title follows
    polls = page.get_attribute("#saga-timeline", "data-polls")
    page.wait_for_timeout(1500)
    assert page.get_attribute("#saga-timeline", "data-polls") == polls  # stopped
    assert page.evaluate("window.__sameDocument") == 42  # never reloaded
    assert Saga.objects.get(pk=booking.saga_id).status == Saga.Status.COMPENSATED
    snap(page, artifacts, "3-compensated")


def test_the_live_operations_page_shows_transitions_as_they_happen(
    staff_page, live_server, customer, trip_items, artifacts
):
    page = staff_page
    page.goto(f"{live_server.url}/admin/sagas/saga/live/")
    page.wait_for_selector('#saga-live-page[data-live="true"]', timeout=WAIT_MS)
    page.evaluate("window.__sameDocument = 42")

    slow = book_trip(customer, trip_items, chaos={"delay_ms": {"reserve_hotel": SLOW_MS}})
    page.wait_for_selector("#live-in-flight tbody tr:has-text('reserve_hotel')", timeout=WAIT_MS)
    page.screenshot(path=str(artifacts / "1-in-flight.png"), full_page=True)
    failing = book_trip(customer, trip_items, chaos={"fail": ["reserve_car"]})
    for saga_id in (slow.saga_id, failing.saga_id):
        wait_terminal(saga_id)

    def event(saga_id, kind: str) -> str:
        return f'#live-events li[data-saga-id="{saga_id}"][data-kind="{kind}"]'

    for selector in (
        event(slow.saga_id, "started"),
        event(slow.saga_id, "step_done"),
        event(slow.saga_id, "completed"),
        event(failing.saga_id, "started"),
        event(failing.saga_id, "compensating"),
        event(failing.saga_id, "compensated"),
    ):
        page.wait_for_selector(selector, timeout=WAIT_MS)
    page.wait_for_selector("#live-in-flight tr.live-empty", timeout=WAIT_MS)
    ids = page.eval_on_selector_all("#live-events li", "items => items.map(i => i.outerHTML)")
    assert len(ids) == len(set(ids))  # each transition once, though the feed repeats fresh rows
    rates = page.text_content("#live-rates tbody")
    assert "trip_booking" in rates
    assert page.evaluate("window.__sameDocument") == 42
    page.screenshot(path=str(artifacts / "2-transitions.png"), full_page=True)
