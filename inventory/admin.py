from django.contrib import admin

from inventory.models import Hold, Item


@admin.register(Item)
class ItemAdmin(admin.ModelAdmin):
    list_display = [
        "sku",
        "kind",
        "name",
        "capacity",
        "available",
        "held",
        "sold",
        "price",
        "currency",
    ]
    list_filter = ["kind"]
    search_fields = ["sku", "name"]

    def get_readonly_fields(self, request, obj=None):
        # The counters move only through holds; editing one by hand would break
        # available + held + sold = capacity.
        counts = ["available", "held", "sold", "created_at", "updated_at"]
        if obj is not None:
            return ["sku", "capacity", *counts]
        return counts

    def save_model(self, request, obj, form, change):
        if not change:
            # A new item starts with its whole capacity available.
            obj.available, obj.held, obj.sold = obj.capacity, 0, 0
        super().save_model(request, obj, form, change)


@admin.register(Hold)
class HoldAdmin(admin.ModelAdmin):
    """Read-only: a hold changes state only through inventory.services."""

    list_display = ["reference", "item", "quantity", "status", "created_at"]
    list_filter = ["status"]
    search_fields = ["reference", "item__sku"]
    list_select_related = ["item"]
    readonly_fields = ["item", "quantity", "reference", "status", "created_at", "updated_at"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
