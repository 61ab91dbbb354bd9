"""One trace per saga, on the real worker: request -> saga span -> every attempt's span."""

from __future__ import annotations

import pytest

from sagas.models import Saga
from tests.conftest import wait_for
from tests.functional.support import trip_body, wait_terminal
from tests.tracing_support import traced

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

# The hotel fails once and heals on its retry; the car fails for good.
TRIP_BODY = trip_body(chaos={"transient": {"reserve_hotel": 1}, "fail": ["reserve_car"]})


@pytest.fixture(autouse=True)
def _worker(celery_worker):
    return celery_worker


def saga_spans(spans, saga_id: str) -> list:
    """The engine's spans of one saga (attempts and saga-level moments), by start time."""
    mine = [s for s in spans if s.attributes.get("saga.id") == saga_id]
    return sorted(mine, key=lambda span: span.start_time)


def test_a_compensated_trip_is_one_trace_from_the_request_to_its_last_compensation(
    customer, client_for, trip_items
):
    with traced(django=True) as exporter:
        response = client_for(customer).post("/api/bookings/", TRIP_BODY, format="json")
        assert response.status_code == 202
        saga_id = response.json()["saga_id"]
        saga = wait_terminal(saga_id)
        wait_for(
            lambda: any(s.name == "finish compensation" for s in exporter.get_finished_spans()),
            message="the finish span",
        )
        spans = exporter.get_finished_spans()

    assert saga.status == Saga.Status.COMPENSATED
    (request,) = [s for s in spans if s.attributes.get("http.route") == "api/bookings/"]
    (saga_span,) = [s for s in spans if s.name == "saga trip_booking"]
    trace_id = request.context.trace_id
    # The saga span is the request's child, and the row keeps its traceparent.
    assert saga_span.parent.span_id == request.context.span_id
    assert saga_span.context.trace_id == trace_id
    assert saga_span.attributes["saga.type"] == "trip_booking"
    flags = int(saga_span.context.trace_flags)
    assert flags & 1  # sampled
    assert saga.trace_context == f"00-{trace_id:032x}-{saga_span.context.span_id:016x}-{flags:02x}"

    attempts = [s for s in saga_spans(spans, saga_id) if s is not saga_span]
    assert [
        (
            s.name,
            s.attributes.get("saga.phase"),
            s.attributes.get("saga.attempt"),
            s.attributes.get("saga.outcome"),
        )
        for s in attempts
    ] == [
        ("action reserve_flight", "action", 1, "succeeded"),
        ("action reserve_hotel", "action", 1, "retrying"),
        ("action reserve_hotel", "action", 2, "succeeded"),
        ("action reserve_car", "action", 1, "failed"),
        ("begin compensation", None, None, "compensating"),
        ("compensation release_hotel", "compensation", 1, "succeeded"),
        ("compensation release_flight", "compensation", 1, "succeeded"),
        ("finish compensation", None, None, "compensated"),
    ]
    # Every one in the request's trace, a child of the saga span, whatever process ran it.
    for span in attempts:
        assert span.context.trace_id == trace_id, span.name
        assert span.parent.span_id == saga_span.context.span_id, span.name
        assert span.attributes["saga.id"] == saga_id
        assert span.attributes["saga.type"] == "trip_booking"
    assert [s.attributes.get("saga.step") for s in attempts if "saga.step" in s.attributes] == [
        "reserve_flight",
        "reserve_hotel",
        "reserve_hotel",
        "reserve_car",
        "release_hotel",
        "release_flight",
    ]
    assert all(s.attributes["saga.round"] == 1 for s in attempts if "compensation " in s.name)

    # Errors are recorded on the attempts that failed, and only there.
    by_outcome = {(s.name, s.attributes.get("saga.attempt")): s for s in attempts}
    failed = by_outcome[("action reserve_car", 1)]
    assert failed.status.status_code.name == "ERROR"
    assert failed.status.description == "ChaosFailure: chaos: reserve_car fails"
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "sagas.errors.ChaosFailure"
    retried = by_outcome[("action reserve_hotel", 1)]
    assert retried.status.status_code.name == "ERROR"
    assert retried.events[0].attributes["exception.type"] == "sagas.errors.ChaosTransientError"
    healthy = [s for s in attempts if s not in (failed, retried)]
    assert all(s.status.status_code.name == "UNSET" and not s.events for s in healthy)

    # Celery's own spans of the steps are in the same trace: the chain carried the context.
    runs = [s for s in spans if s.name.startswith("run/trip_booking.")]
    assert {s.context.trace_id for s in runs} == {trace_id}
    assert sorted(s.name.split(".")[1] for s in runs) == [
        "release_flight",
        "release_hotel",
        "reserve_car",
        "reserve_flight",
        "reserve_hotel",
        "reserve_hotel",
    ]


def test_with_tracing_off_a_saga_stores_no_trace_context_and_makes_no_span(customer, trip_items):
    from sagas import tracing
    from tests.functional.support import book_trip

    assert not tracing.active()
    booking = book_trip(customer, trip_items)

    saga = wait_terminal(booking.saga_id)
    assert saga.status == Saga.Status.COMPLETED
    assert saga.trace_context == ""


def test_a_chain_published_without_trace_context_still_joins_the_saga_trace(customer, trip_items):
    """As a sweeper's re-publish or the reconciler's publish: the row carries the trace."""
    from unittest import mock

    from bookings.saga_steps import trip_booking
    from sagas.canvas import action_chain
    from tests.functional.support import book_trip

    with traced() as exporter:
        from opentelemetry.sdk.trace import TracerProvider

        caller_tracer = TracerProvider().get_tracer("test")  # a caller outside our provider
        with (
            caller_tracer.start_as_current_span("caller") as caller,
            mock.patch("sagas.services.transaction.on_commit"),  # never published here
        ):
            booking = book_trip(customer, trip_items)
        saga_id = str(booking.saga_id)
        # Published from no span at all: Celery's spans start a trace of their own.
        action_chain(trip_booking, saga_id).apply_async()
        saga = wait_terminal(saga_id)
        spans = exporter.get_finished_spans()

    assert saga.status == Saga.Status.COMPLETED
    (saga_span,) = [s for s in spans if s.name == "saga trip_booking"]
    assert saga_span.parent.span_id == caller.get_span_context().span_id
    steps = [s for s in saga_spans(spans, saga_id) if s.name.startswith("action ")]
    assert [s.attributes["saga.step"] for s in steps] == [
        "reserve_flight",
        "reserve_hotel",
        "reserve_car",
        "charge_payment",
        "confirm_booking",
    ]
    runs = {s.context.span_id: s for s in spans if s.name.startswith("run/trip_booking.")}
    for step in steps:
        assert step.context.trace_id == caller.get_span_context().trace_id
        assert step.parent.span_id == saga_span.context.span_id
        # ... linked to the Celery span it ran under, which is in another trace.
        (link,) = step.links
        run = runs[link.context.span_id]
        assert run.context.trace_id != step.context.trace_id
        assert run.name == f"run/trip_booking.{step.attributes['saga.step']}"
