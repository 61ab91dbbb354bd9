"""One trace per saga, and the saga's context on every log line of its steps.

The process that creates a saga opens the **saga span** (a child of the
caller's span: the HTTP request, a shell user's span) around the saga's
INSERT, stores its W3C ``traceparent`` on the row (``Saga.trace_context``, in
the same INSERT) and ends it there. A span is ended by the process that
started it, and no process lives as long as a saga, so the saga span stands
for the saga's creation; the saga's whole duration is its trace's.

Every step attempt and compensation attempt, in whichever worker, retry,
re-published copy or errback it runs, opens an **attempt span** whose parent
is read from that column: of the saga row the step loads anyway (the
barrier's claim returns the whole row), so no statement is added. Celery's
own spans (the instrumentation's ``run/<task>``) follow the messages, which
a sweeper's re-publish or an errback's new chain start afresh; an attempt
span links to the Celery span it ran under when that one is another trace.

With tracing off (no :func:`activate`, the default) this module imports no
OpenTelemetry and a step pays two ``ContextVar`` sets and resets and one
``is None`` test per attempt: the log context below is kept either way.

Log context: while an attempt runs, ``saga_id``, ``step`` and ``trace_id``
are held in context variables that :class:`SagaLogFilter` copies onto every
log record; outside an attempt they are blank.

This module imports nothing of the engine (it sits below its models in the
layers contract), so settings' LOGGING can name its filter.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Any

saga_id_var: ContextVar[str] = ContextVar("saga_id", default="")
step_var: ContextVar[str] = ContextVar("saga_step", default="")
trace_id_var: ContextVar[str] = ContextVar("trace_id", default="")

logger = logging.getLogger(__name__)

# The engine's tracer, set by activate(); None means tracing is off.
_tracer = None
TRACER_NAME = "backtrack.sagas"


def activate(tracer_provider) -> None:
    """Trace sagas with ``tracer_provider`` from now on (``config.tracing`` calls it)."""
    global _tracer
    _tracer = tracer_provider.get_tracer(TRACER_NAME)


def deactivate() -> None:
    global _tracer
    _tracer = None


def active() -> bool:
    return _tracer is not None


# --- the saga span -------------------------------------------------------------------


@contextmanager
def saga_span(*, saga_id: str, saga_type: str, business_key: str):
    """Around a saga's creation: yields the ``traceparent`` to store on it ("" when off).

    The saga span is current inside, so whatever the creation does (its
    INSERT) is its child.
    """
    if _tracer is None:
        yield ""
        return
    from opentelemetry import trace

    attributes = {
        "saga.id": str(saga_id),
        "saga.type": saga_type,
        "saga.business_key": business_key,
    }
    with _tracer.start_as_current_span(
        f"saga {saga_type}", kind=trace.SpanKind.INTERNAL, attributes=attributes
    ) as span:
        yield traceparent_of(span)


def traceparent_of(span) -> str:
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def trace_id_of(traceparent: str) -> str:
    """The trace id (32 hex digits) in a stored ``traceparent``; "" if there is none."""
    parts = traceparent.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return ""
    return parts[1]


def _parent(traceparent: str):
    """The OpenTelemetry context whose span is the one ``traceparent`` names (None if none)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": traceparent})
    from opentelemetry import trace

    return context if trace.get_current_span(context).get_span_context().is_valid else None


def under_saga(traceparent: str):
    """Make the saga span (by its stored ``traceparent``) the current parent, e.g. to publish."""
    if _tracer is None or not traceparent:
        return nullcontext()
    return _attached(_parent(traceparent))


@contextmanager
def _attached(context):
    if context is None:
        yield
        return
    from opentelemetry import context as otel_context

    token = otel_context.attach(context)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextmanager
def saga_event(name: str, saga, **attributes: Any):
    """A short span under ``saga``'s saga span (an errback's claim, the finish); None when off."""
    if _tracer is None:
        yield None
        return
    attributes = {
        "saga.id": str(saga.id),
        "saga.type": saga.saga_type,
        **{f"saga.{key}": value for key, value in attributes.items() if value is not None},
    }
    with _tracer.start_as_current_span(
        name, context=_parent(saga.trace_context), attributes=attributes
    ) as span:
        yield span


# --- attempt spans and the log context -----------------------------------------------


class Attempt:
    """One step or compensation attempt: its log context, and its span once it is traced.

    :meth:`join` starts the span once the saga row is loaded (its start set
    back to when the attempt began); ``outcome`` is what the attempt recorded
    (the step wrapper sets it with each SagaLog row it writes).
    """

    __slots__ = (
        "_token",
        "attempt",
        "outcome",
        "phase",
        "round",
        "saga_id",
        "span",
        "start_ns",
        "step",
    )

    def __init__(self, saga_id: str, step: str, phase: str, attempt: int, round: int) -> None:
        self.saga_id, self.step, self.phase = saga_id, step, phase
        self.attempt, self.round = attempt, round
        self.outcome = ""
        self.span = None
        self.start_ns = time.time_ns() if _tracer is not None else 0

    def join(self, saga) -> None:
        """Start this attempt's span under ``saga``'s saga span; a second call does nothing.

        Tracing never fails a step: an error here is logged and the attempt runs untraced.
        """
        if _tracer is None or self.span is not None:
            return
        try:
            self._start(saga)
        except Exception:
            logger.warning("saga %s %s: could not trace it", self.saga_id, self.step, exc_info=True)

    def _start(self, saga) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        here = trace.get_current_span()  # Celery's span of this task, if instrumented
        parent = _parent(saga.trace_context)
        links = []
        if parent is not None and here.get_span_context().is_valid:
            saga_trace = trace.get_current_span(parent).get_span_context().trace_id
            if here.get_span_context().trace_id != saga_trace:
                links.append(trace.Link(here.get_span_context(), {"celery.span": "delivery"}))
        attributes = {
            "saga.id": str(self.saga_id),
            "saga.type": saga.saga_type,
            "saga.step": self.step,
            "saga.phase": self.phase,
            "saga.attempt": self.attempt,
        }
        if self.round:
            attributes["saga.round"] = self.round
        span = _tracer.start_span(
            f"{self.phase} {self.step}",
            context=parent,
            attributes=attributes,
            links=links,
            start_time=self.start_ns,
        )
        # Current from here on: the step's own database and Redis calls are its children.
        self._token = otel_context.attach(trace.set_span_in_context(span))
        self.span = span
        trace_id_var.set(f"{span.get_span_context().trace_id:032x}")

    def close(self, exc: BaseException | None) -> None:
        """End the span (if there is one) with the attempt's outcome and error."""
        span = self.span
        if span is None:
            return
        from opentelemetry import context as otel_context

        try:
            self._finish(span, exc)
        except Exception:
            logger.warning("saga %s %s: could not end its span", self.saga_id, self.step)
        finally:
            otel_context.detach(self._token)
            span.end()

    def _finish(self, span, exc: BaseException | None) -> None:
        from celery.exceptions import Ignore, Retry
        from opentelemetry.trace import Status, StatusCode

        error = exc.exc if isinstance(exc, Retry) else exc
        if isinstance(exc, Retry) and not self.outcome:
            self.outcome = "retrying"
        if isinstance(error, BaseException) and not isinstance(error, Ignore):
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.set_attribute("saga.outcome", self.outcome or ("failed" if error else "succeeded"))


@contextmanager
def attempt(saga_id, step: str, phase: str, attempt: int, round: int = 0):
    """Run one attempt with its log context set; yields its :class:`Attempt`."""
    current = Attempt(str(saga_id), step, phase, attempt, round)
    saga_token, step_token = saga_id_var.set(current.saga_id), step_var.set(step)
    trace_token = trace_id_var.set("")
    try:
        yield current
    except BaseException as exc:
        current.close(exc)
        raise
    else:
        current.close(None)
    finally:
        trace_id_var.reset(trace_token)
        step_var.reset(step_token)
        saga_id_var.reset(saga_token)


class DropSpanExporter:
    """Throws spans away: all of tracing's work in the process, nothing sent (the bench)."""

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def dropping_processor():
    """A batching span processor whose batches are thrown away (``OTEL_TRACES_EXPORTER=drop``)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(DropSpanExporter())


@contextmanager
def dropping(on: bool = True):
    """Trace this process's sagas into a provider that drops the spans, while inside (the
    bench's process side); ``on=False`` changes nothing."""
    if not on:
        yield
        return
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    provider.add_span_processor(dropping_processor())
    activate(provider)
    try:
        yield
    finally:
        deactivate()
        provider.shutdown()


# --- logging -------------------------------------------------------------------------


class SagaLogFilter(logging.Filter):
    """Copies the running attempt's ``saga_id``, ``step`` and ``trace_id`` onto each record.

    Blank outside an attempt (and ``trace_id`` with tracing off).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.saga_id = saga_id_var.get()
        record.step = step_var.get()
        record.trace_id = trace_id_var.get()
        return True


class PlainFormatter(logging.Formatter):
    """Text lines; one logged inside a step ends with ``saga_id=... step=... trace_id=...``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        saga_id = getattr(record, "saga_id", "")
        if not saga_id:
            return line
        trace_id = getattr(record, "trace_id", "") or "-"
        return f"{line} saga_id={saga_id} step={getattr(record, 'step', '')} trace_id={trace_id}"
