from decimal import Decimal

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import F, Q

currency_validator = RegexValidator(r"^[A-Z]{3}$", "Use a three-letter ISO 4217 code, e.g. EUR.")


class Item(models.Model):
    """A bookable stock line: every unit is available, held or sold.

    The counters move only through conditional UPDATEs in ``inventory.services``;
    the check constraints are the last line of defence against overselling.
    """

    class Kind(models.TextChoices):
        FLIGHT_SEAT = "flight_seat", "Flight seat"
        HOTEL_ROOM = "hotel_room", "Hotel room"
        CAR = "car", "Car"

    sku = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=200)
    capacity = models.PositiveIntegerField()
    available = models.PositiveIntegerField()
    held = models.PositiveIntegerField(default=0)
    sold = models.PositiveIntegerField(default=0)
    price = models.DecimalField(
        max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal("0"))]
    )
    currency = models.CharField(max_length=3, validators=[currency_validator])
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["kind", "sku"]
        indexes = [models.Index(fields=["kind"], name="inventory_item_kind")]
        constraints = [
            models.CheckConstraint(
                condition=Q(available__gte=0), name="inventory_item_available_gte_0"
            ),
            models.CheckConstraint(condition=Q(held__gte=0), name="inventory_item_held_gte_0"),
            models.CheckConstraint(condition=Q(sold__gte=0), name="inventory_item_sold_gte_0"),
            models.CheckConstraint(
                condition=Q(capacity=F("available") + F("held") + F("sold")),
                name="inventory_item_counts_sum_to_capacity",
            ),
            models.CheckConstraint(condition=Q(price__gte=0), name="inventory_item_price_gte_0"),
        ]

    def __str__(self) -> str:
        return f"{self.sku} ({self.name})"


class Hold(models.Model):
    """Units of one item set aside for a caller, who names the hold by ``reference``.

    The reference is the caller's idempotency handle (e.g. ``booking-line:42``):
    placing, confirming or releasing twice with it has the effect of once.
    """

    class Status(models.TextChoices):
        HELD = "HELD", "Held"
        CONFIRMED = "CONFIRMED", "Confirmed"
        RELEASED = "RELEASED", "Released"

    item = models.ForeignKey(Item, on_delete=models.PROTECT, related_name="holds")
    quantity = models.PositiveIntegerField()
    reference = models.CharField(max_length=200, unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.HELD)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(quantity__gte=1), name="inventory_hold_quantity_gte_1"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reference} ({self.status})"
