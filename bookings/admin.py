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
from sagas.admin_support import EstimatedCountPaginator, ReadOnlyAdminMixin


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
