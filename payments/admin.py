from django.contrib import admin

from payments.models import Charge, LedgerEntry, Refund


class ReadOnlyAdmin(admin.ModelAdmin):
    """Money rows are written only by payments.services; the admin shows them."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class RefundInline(admin.TabularInline):
    model = Refund
    extra = 0
    fields = ["idempotency_key", "amount", "currency", "gateway_refund_id", "reason", "created_at"]
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Charge)
class ChargeAdmin(ReadOnlyAdmin):
    list_display = [
        "idempotency_key",
        "reference",
        "amount",
        "currency",
        "status",
        "refunded_amount",
        "created_at",
    ]
    list_filter = ["status", "currency"]
    search_fields = ["idempotency_key", "reference", "gateway_charge_id"]
    date_hierarchy = "created_at"
    inlines = [RefundInline]


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdmin):
    list_display = ["idempotency_key", "charge", "amount", "currency", "reason", "created_at"]
    list_filter = ["currency"]
    search_fields = ["idempotency_key", "gateway_refund_id", "charge__reference"]
    list_select_related = ["charge"]


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "entry_type", "amount", "currency", "reference", "charge"]
    list_filter = ["entry_type", "currency"]
    search_fields = ["reference", "charge__idempotency_key"]
    list_select_related = ["charge"]
