"""Tracing set-up, the one place it happens: the environment's OTEL_* settings, one provider.

- ``OTEL_TRACES_EXPORTER``: ``none`` (the default: nothing is set up, no
  provider, no instrumentation), ``otlp`` (OTLP over HTTP to
  ``OTEL_EXPORTER_OTLP_ENDPOINT``, default ``http://localhost:4318``),
  ``console`` (each span printed to stdout as it ends), or a comma-separated
  list of ``otlp`` and ``console``. ``drop`` (for ``manage.py bench``) does
  all the work of ``otlp`` and throws the spans away.
- ``OTEL_SERVICE_NAME``: the service name; ``backtrack-web`` or
  ``backtrack-worker`` (by process) when unset.

The settings read and check these when they load (:func:`exporters_from_env`,
:func:`endpoint_from_env`), so a bad value stops every process at start with
an error naming the variable. :func:`configure_tracing` is called by the web
entry points (``config.wsgi``, ``config.asgi``, so ``runserver`` too) before
Django builds its middleware, and in every Celery worker process
(``config.celery_app``): in each prefork child after the fork
(``worker_process_init``), since a BatchSpanProcessor's export thread does
not survive a fork, or once in a solo or threads worker. A worker process
flushes its spans as it shuts down (:func:`shutdown_tracing`).

It instruments Django (web only), Celery (publish and run spans, their
context in each message's headers), psycopg and redis (kombu's and the fake
gateway's calls), and activates the saga engine's own spans
(``sagas.tracing``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

from django.core.exceptions import ImproperlyConfigured

from config.env import http_url_from_env

EXPORTERS = ("otlp", "console", "drop")
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"
# Requests not worth a trace: load balancers' and Prometheus' polling.
EXCLUDED_URLS = "healthz,metrics"

_provider = None
logger = logging.getLogger(__name__)


def exporters_from_env(environ: Mapping[str, str] = os.environ) -> tuple[str, ...]:
    """``OTEL_TRACES_EXPORTER`` as a tuple of exporters; () for ``none`` or unset."""
    raw = environ.get("OTEL_TRACES_EXPORTER", "")
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    if not names or names == ["none"]:
        return ()
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown or "none" in names or len(set(names)) != len(names):
        raise ImproperlyConfigured(
            f"OTEL_TRACES_EXPORTER={raw!r} is not a traces exporter: use none (the default), "
            "otlp, console, or a comma-separated list of otlp and console "
            "(drop: spans made and thrown away, for manage.py bench)"
        )
    return tuple(names)


def endpoint_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """``OTEL_EXPORTER_OTLP_ENDPOINT``: the collector's base URL (``/v1/traces`` is added)."""
    return (
        http_url_from_env("OTEL_EXPORTER_OTLP_ENDPOINT", environ, example="http://jaeger:4318")
        or DEFAULT_OTLP_ENDPOINT
    )


def trace_url_template_from_env(environ: Mapping[str, str] = os.environ) -> str:
    """``SAGA_TRACE_URL_TEMPLATE``: where the admin links a trace id, e.g. Jaeger's trace page."""
    raw = environ.get("SAGA_TRACE_URL_TEMPLATE", "").strip()
    if raw and "{trace_id}" not in raw:
        raise ImproperlyConfigured(
            f"SAGA_TRACE_URL_TEMPLATE={raw!r} has no {{trace_id}} placeholder, "
            "e.g. http://localhost:16686/trace/{trace_id}"
        )
    return raw


def configure_tracing(role: str, *, exporters: tuple[str, ...] | None = None):
    """Set up this process's tracing as the settings say; the provider, or None when off.

    ``role`` (``web``, ``worker``, ``bench``) names the service when
    ``OTEL_SERVICE_NAME`` is unset; only ``web`` instruments Django.
    ``exporters`` overrides ``OTEL_TRACES_EXPORTER``. Once per process: a
    second call returns the provider set up first.
    """
    global _provider
    from django.conf import settings

    if _provider is not None:
        return _provider
    exporters = settings.OTEL_TRACES_EXPORTER if exporters is None else exporters
    if not exporters:
        return None

    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    from sagas import tracing as saga_tracing

    name = settings.OTEL_SERVICE_NAME or f"backtrack-{role}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name, "process.role": role}))
    for exporter in exporters:
        provider.add_span_processor(span_processor(exporter))
    trace.set_tracer_provider(provider)
    instrument(provider, django=role == "web")
    saga_tracing.activate(provider)
    _provider = provider
    logger.info("tracing on: %s, service %s (pid %d)", ",".join(exporters), name, os.getpid())
    return provider


def span_processor(exporter: str):
    """The span processor for ``exporter``: batched, except the console's (printed as it ends)."""
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    if exporter == "console":
        # One line per span (honcho prefixes each line with its process, and
        # grep finds a saga's spans by its id), on the real stdout: a worker's
        # sys.stdout may be Celery's logging proxy.
        return SimpleSpanProcessor(ConsoleSpanExporter(out=sys.__stdout__, formatter=_one_line))
    if exporter == "drop":
        from sagas.tracing import dropping_processor

        return dropping_processor()
    from django.conf import settings
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return BatchSpanProcessor(
        OTLPSpanExporter(endpoint=f"{settings.OTEL_EXPORTER_OTLP_ENDPOINT}/v1/traces")
    )


def _one_line(span) -> str:
    return span.to_json(indent=None) + "\n"


def instrument(provider, *, django: bool) -> None:
    """The official instrumentations, with ``provider``: Celery, psycopg, redis, and Django."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    CeleryInstrumentor().instrument(tracer_provider=provider)
    PsycopgInstrumentor().instrument(tracer_provider=provider)
    RedisInstrumentor().instrument(tracer_provider=provider)
    if django:
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        DjangoInstrumentor().instrument(tracer_provider=provider, excluded_urls=EXCLUDED_URLS)


def shutdown_tracing() -> None:
    """Export what is still queued and stop (a worker process on its way out)."""
    if _provider is not None:
        _provider.shutdown()
