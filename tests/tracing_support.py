"""An in-memory tracer for tests: the engine's spans and the official instrumentations' spans."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def traced(*, django: bool = False):
    """Trace into an InMemorySpanExporter (yielded) while inside; everything undone after.

    No global provider is set (OpenTelemetry allows one per process): the
    engine and the instrumentations are given this provider.
    """
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sagas import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentors = [CeleryInstrumentor(), *([DjangoInstrumentor()] if django else [])]
    for instrumentor in instrumentors:
        instrumentor.instrument(tracer_provider=provider)
    tracing.activate(provider)
    try:
        yield exporter
    finally:
        tracing.deactivate()
        for instrumentor in instrumentors:
            instrumentor.uninstrument()
        provider.shutdown()
