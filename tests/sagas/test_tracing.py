"""The saga context on log lines, and what tracing adds to a step (sagas/tracing.py)."""

from __future__ import annotations

import json
import logging

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sagas import tracing
from tests.config.test_tracing import run_python
from tests.sagas.support import act
from tests.tracing_support import traced


class Records(logging.Handler):
    """Keeps the records it sees, after the saga filter copied the context onto them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(tracing.SagaLogFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    handler = Records()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield handler.records
    root.removeHandler(handler)
    root.setLevel(level)


def context_of(record: logging.LogRecord) -> tuple[str, str, str]:
    return record.saga_id, record.step, record.trace_id


def test_log_lines_carry_the_step_while_it_runs_and_are_blank_outside(records):
    logger = logging.getLogger("tests.tracing")
    logger.info("before")
    with tracing.attempt("saga-1", "reserve_car", "action", 1):
        logger.info("inside")
    logger.info("after")

    assert [(r.getMessage(), context_of(r)) for r in records] == [
        ("before", ("", "", "")),
        ("inside", ("saga-1", "reserve_car", "")),
        ("after", ("", "", "")),
    ]


@pytest.mark.django_db
def test_a_step_logs_under_its_saga_step_and_trace(trip, make_booking, records):
    with traced() as exporter:
        _, saga = make_booking()
        act(trip, saga, "reserve_flight")
        # A second delivery of the same step: the wrapper logs that it was already done.
        act(trip, saga, "reserve_flight")
        spans = exporter.get_finished_spans()

    saga.refresh_from_db()
    trace_id = saga.trace_context.split("-")[1]
    (line,) = [r for r in records if r.name == "sagas.runtime"]
    assert line.getMessage().endswith("reserve_flight action: already done")
    assert context_of(line) == (str(saga.pk), "reserve_flight", trace_id)
    attempts = [s for s in spans if s.name == "action reserve_flight"]
    assert [s.attributes["saga.outcome"] for s in attempts] == ["succeeded", "duplicate"]
    assert {f"{s.context.trace_id:032x}" for s in attempts} == {trace_id}


@pytest.mark.django_db
def test_tracing_adds_no_statement_to_a_step(trip, make_booking):
    """The attempt's parent comes from the row the barrier's claim returns anyway."""

    def statements(step: str, saga) -> list[str]:
        with CaptureQueriesContext(connection) as queries:
            act(trip, saga, step)
        return [query["sql"].split(" ", 1)[0] for query in queries]

    _, untraced = make_booking()
    with traced() as exporter:
        _, saga = make_booking()
        assert saga.trace_context
        traced_steps = [statements(step, saga) for step in ("reserve_flight", "reserve_hotel")]
        assert len(exporter.get_finished_spans()) == 3  # the saga span and two attempts
    plain_steps = [statements(step, untraced) for step in ("reserve_flight", "reserve_hotel")]

    assert untraced.trace_context == ""
    assert traced_steps == plain_steps
    assert all(plain_steps)


def test_log_format_json_writes_one_json_object_per_line_with_the_saga_context():
    code = """
import logging, django
django.setup()
from sagas import tracing
logging.getLogger("tests.json").warning("outside")
with tracing.attempt("saga-9", "charge_payment", "action", 2):
    logging.getLogger("tests.json").warning("inside %s", "a step")
"""
    started = run_python(code, LOG_FORMAT="json")

    assert started.returncode == 0, started.stderr
    lines = [json.loads(line) for line in started.stderr.splitlines() if "tests.json" in line]
    assert [{k: v for k, v in line.items() if k != "time"} for line in lines] == [
        {
            "level": "WARNING",
            "process": "MainProcess",
            "logger": "tests.json",
            "message": "outside",
            "saga_id": "",
            "step": "",
            "trace_id": "",
        },
        {
            "level": "WARNING",
            "process": "MainProcess",
            "logger": "tests.json",
            "message": "inside a step",
            "saga_id": "saga-9",
            "step": "charge_payment",
            "trace_id": "",
        },
    ]
    assert all(line["time"] for line in lines)


def test_the_plain_format_appends_the_saga_context_inside_a_step_only():
    code = """
import logging, django
django.setup()
from sagas import tracing
logging.getLogger("tests.plain").warning("outside")
with tracing.attempt("saga-9", "charge_payment", "action", 2):
    logging.getLogger("tests.plain").warning("inside")
"""
    started = run_python(code, LOG_FORMAT="plain")

    assert started.returncode == 0, started.stderr
    lines = [line.split(" ", 2)[2] for line in started.stderr.splitlines() if "tests.plain" in line]
    assert lines == [
        "WARNING/MainProcess tests.plain outside",
        "WARNING/MainProcess tests.plain inside saga_id=saga-9 step=charge_payment trace_id=-",
    ]


@pytest.mark.django_db
def test_a_tracing_error_never_fails_the_step(trip, make_booking, monkeypatch, caplog):
    with traced() as exporter:
        _, saga = make_booking()

        def broken(*args, **kwargs):
            raise RuntimeError("exporter on fire")

        monkeypatch.setattr(tracing._tracer, "start_span", broken)
        reply = act(trip, saga, "reserve_flight")
        spans = exporter.get_finished_spans()

    assert reply["outcome"] == "succeeded"
    saga.refresh_from_db()
    assert saga.steps_done == 1
    assert [s.name for s in spans] == ["saga trip_booking"]  # no attempt span, no harm
    assert f"saga {saga.pk} reserve_flight: could not trace it" in caplog.text
