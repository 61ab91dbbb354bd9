"""The saga change page shows the saga's trace id, linked when SAGA_TRACE_URL_TEMPLATE is set."""

from __future__ import annotations

import pytest
from django.urls import reverse

from sagas.models import Saga

pytestmark = pytest.mark.django_db

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def saga(**fields) -> Saga:
    return Saga.objects.create(saga_type="trip_booking", business_key="booking:x", **fields)


def trace_row(html: str) -> str:
    start = html.index("field-trace_link")
    return html[start : html.index("</div>", html.index('class="readonly"', start))]


def test_the_change_page_links_the_trace_through_the_template(admin_client, settings):
    settings.SAGA_TRACE_URL_TEMPLATE = "http://localhost:16686/trace/{trace_id}"
    traced = saga(trace_context=TRACEPARENT)

    response = admin_client.get(reverse("admin:sagas_saga_change", args=[traced.pk]))

    assert response.status_code == 200
    link = f'<a href="http://localhost:16686/trace/{TRACE_ID}" rel="noopener">'
    assert f"{link}<code>{TRACE_ID}</code></a>" in trace_row(response.text)


def test_without_a_template_the_trace_id_is_shown_unlinked(admin_client, settings):
    settings.SAGA_TRACE_URL_TEMPLATE = ""
    traced = saga(trace_context=TRACEPARENT)

    response = admin_client.get(reverse("admin:sagas_saga_change", args=[traced.pk]))

    row = trace_row(response.text)
    assert f"<code>{TRACE_ID}</code>" in row
    assert "<a " not in row


def test_a_saga_started_with_tracing_off_has_no_trace(admin_client, settings):
    settings.SAGA_TRACE_URL_TEMPLATE = "http://localhost:16686/trace/{trace_id}"
    untraced = saga()

    response = admin_client.get(reverse("admin:sagas_saga_change", args=[untraced.pk]))

    row = trace_row(response.text)
    assert "\u2014" in row
    assert "16686" not in row
