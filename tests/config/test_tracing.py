"""Tracing's settings from the environment, and set-up per process (config/tracing.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config import tracing

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("value", "exporters"),
    [
        (None, ()),
        ("", ()),
        ("none", ()),
        (" None ", ()),
        ("otlp", ("otlp",)),
        ("console", ("console",)),
        ("OTLP, console", ("otlp", "console")),
        ("drop", ("drop",)),
    ],
)
def test_the_traces_exporter_is_read_from_the_environment(value, exporters):
    environ = {} if value is None else {"OTEL_TRACES_EXPORTER": value}
    assert tracing.exporters_from_env(environ) == exporters


@pytest.mark.parametrize("value", ["bogus", "jaeger", "none,otlp", "otlp,otlp", "otlp;console"])
def test_a_bad_traces_exporter_is_an_error_naming_the_variable(value):
    with pytest.raises(ImproperlyConfigured) as error:
        tracing.exporters_from_env({"OTEL_TRACES_EXPORTER": value})
    assert str(error.value).startswith(f"OTEL_TRACES_EXPORTER={value!r} is not a traces exporter")


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        (None, "http://localhost:4318"),
        ("", "http://localhost:4318"),
        ("http://jaeger:4318", "http://jaeger:4318"),
        ("https://otel.example.com/", "https://otel.example.com"),
    ],
)
def test_the_otlp_endpoint_is_a_base_url(value, endpoint):
    environ = {} if value is None else {"OTEL_EXPORTER_OTLP_ENDPOINT": value}
    assert tracing.endpoint_from_env(environ) == endpoint


@pytest.mark.parametrize("value", ["jaeger:4318", "ftp://jaeger", "http://", "http://jaeger:43x8"])
def test_a_bad_otlp_endpoint_is_an_error_naming_the_variable(value):
    with pytest.raises(ImproperlyConfigured, match=r"^OTEL_EXPORTER_OTLP_ENDPOINT="):
        tracing.endpoint_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": value})


def test_the_trace_url_template_needs_its_placeholder():
    template = "http://localhost:16686/trace/{trace_id}"
    assert tracing.trace_url_template_from_env({"SAGA_TRACE_URL_TEMPLATE": template}) == template
    assert tracing.trace_url_template_from_env({}) == ""
    with pytest.raises(ImproperlyConfigured, match=r"^SAGA_TRACE_URL_TEMPLATE=.* no \{trace_id\}"):
        tracing.trace_url_template_from_env({"SAGA_TRACE_URL_TEMPLATE": "http://jaeger/trace/"})


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.test", **env}
    return subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "bogus"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "jaeger:4318"),
        ("LOG_FORMAT", "xml"),
        ("SAGA_TRACE_URL_TEMPLATE", "http://jaeger/trace/"),
    ],
)
def test_a_process_will_not_start_with_a_bad_value(variable, value):
    started = run_python("import django; django.setup()", **{variable: value})

    assert started.returncode != 0
    assert f"ImproperlyConfigured: {variable}={value!r}" in started.stderr


def test_with_tracing_off_nothing_is_set_up_or_imported():
    started = run_python(
        "import sys, django; django.setup();"
        "from config.tracing import configure_tracing; from sagas import tracing;"
        "print(configure_tracing('worker'), tracing.active(),"
        " sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))",
        OTEL_TRACES_EXPORTER="none",
    )

    assert started.returncode == 0, started.stderr
    assert started.stdout.strip() == "None False []"


def test_the_console_exporter_prints_each_span_with_its_saga_under_the_service_name():
    code = """
import django, psycopg
django.setup()
from config.tracing import configure_tracing, shutdown_tracing
from sagas import tracing
provider = configure_tracing("worker")
assert configure_tracing("worker") is provider  # once per process
assert tracing.active()
assert hasattr(psycopg.connect, "__wrapped__")  # psycopg instrumented
with tracing.saga_span(saga_id="s-1", saga_type="toy_saga", business_key="toy:1") as parent:
    print("traceparent", parent)
shutdown_tracing()
"""
    started = run_python(code, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="")

    assert started.returncode == 0, started.stderr
    first, printed = started.stdout.splitlines()  # one line per span
    span = json.loads(printed)
    assert span["name"] == "saga toy_saga"
    assert span["attributes"] == {
        "saga.id": "s-1",
        "saga.type": "toy_saga",
        "saga.business_key": "toy:1",
    }
    assert span["resource"]["attributes"]["service.name"] == "backtrack-worker"
    trace_id, span_id = span["context"]["trace_id"][2:], span["context"]["span_id"][2:]
    assert first.startswith(f"traceparent 00-{trace_id}-{span_id}-")
