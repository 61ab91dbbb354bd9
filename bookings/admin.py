"""Bookings as operators see them: read-only, with a way to their sagas.

A booking changes only through its sagas (bookings.services and saga_steps);
editing its status or lines here would bypass the holds and the payment.
"""

from __future__ import annotations

import uuid

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from bookings.models import Booking, BookingLine
from inventory import selectors as inventory_selectors
from payments import selectors as payment_selectors
from sagas import feed
from sagas.admin_support import EstimatedCountPaginator, ReadOnlyAdminMixin
from sagas.models import Saga


class BookingLineInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = BookingLine
    extra = 0
    can_delete = False
    fields = ["sku", "kind", "name", "quantity", "unit_price", "currency", "subtotal"]
    readonly_fields = fields

    @admin.display(description="subtotal")
    def subtotal(self, obj: BookingLine):
        return obj.subtotal


@admin.register(Booking)
class BookingAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = [
        "id",
        "user",
        "customer",
        "status",
        "total",
        "currency",
        "created_at",
        "sagas",
    ]
    list_filter = ["status"]
    list_select_related = ["user"]
    # The box searches exact values only; see get_search_results.
    search_fields = ["=customer_email"]
    search_help_text = "A booking id, or a customer's email address (exact)."
    ordering = ["-created_at"]
    sortable_by = ["created_at"]
    # Facet counts and a full count are aggregates over the whole table.
    show_facets = admin.ShowFacets.NEVER
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    inlines = [BookingLineInline]
    fields = [
        "id",
        "user",
        ("customer_name", "customer_email"),
        "status",
        ("total", "currency"),
        "sagas",
        ("created_at", "updated_at"),
    ]
    readonly_fields = [
        "id",
        "user",
        "customer_name",
        "customer_email",
        "status",
        "total",
        "currency",
        "sagas",
        "created_at",
        "updated_at",
    ]

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            return queryset.filter(pk=uuid.UUID(term)), False
        except ValueError:
            return queryset.filter(customer_email__iexact=term), False

    @admin.display(description="customer")
    def customer(self, obj: Booking):
        return format_html("{}<br><small>{}</small>", obj.customer_name, obj.customer_email)

    @admin.display(description="sagas")
    def sagas(self, obj: Booking):
        links = [
            (reverse("admin:sagas_saga_change", args=[saga_id]), label)
            for saga_id, label in ((obj.saga_id, "booking"), (obj.cancel_saga_id, "cancellation"))
            if saga_id is not None
        ]
        if not links:
            return "\u2014"
        return format_html_join(" \u00b7 ", '<a href="{}">{}</a>', links)

    # --- change page: the saga, why it ended, the holds and the money ---------------

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context.update(booking_page_context(obj))
        return super().render_change_form(request, context, add, change, form_url, obj)


def booking_page_context(booking: Booking) -> dict:
    """The booking's saga and its graph, why it ended, its holds, charges and refunds."""
    page = feed.saga_graph_page(booking.saga_id)
    saga = page.pop("saga")
    if saga is not None:
        page["booking_why"] = why_it_ended(saga, page["graph"])
    references = [line.hold_reference for line in booking.lines.all()]
    holds = inventory_selectors.holds_by_reference(references=references)
    charges, refunds = payment_selectors.charges_and_refunds(reference=f"booking:{booking.pk}")
    return {
        **page,
        "booking_saga": saga,
        "holds": [holds[ref] for ref in references if ref in holds],
        "charges": charges,
        "refunds": refunds,
    }


def why_it_ended(saga: Saga, graph: dict | None) -> str:
    """The booking saga's outcome in a sentence, for an operator."""
    failing = (graph or {}).get("failing_action") or "a step"
    if saga.status == Saga.Status.COMPLETED:
        return "every step succeeded; the trip is confirmed."
    if saga.status == Saga.Status.COMPENSATED:
        return f"{failing} could not be completed, so every step already done was undone. " + (
            saga.failure_reason or ""
        )
    if saga.status == Saga.Status.FAILED:
        settled = (
            f" Settled by {saga.resolved_by}: {saga.resolution}"
            if saga.is_resolved
            else " It waits for an operator on the saga page."
        )
        return f"undoing failed: {saga.failure_reason.rstrip('.')}.{settled}"
    return f"still running ({saga.get_status_display().lower()})."
