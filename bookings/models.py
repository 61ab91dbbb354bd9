import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class Booking(models.Model):
    class Status(models.TextChoices):
        PENDING = "PENDING", "Pending"
        CONFIRMED = "CONFIRMED", "Confirmed"
        REJECTED = "REJECTED", "Rejected (every step undone)"
        CANCELLING = "CANCELLING", "Cancelling"
        CANCELLED = "CANCELLED", "Cancelled"
        NEEDS_ATTENTION = "NEEDS_ATTENTION", "Needs attention (compensation failed)"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="bookings"
    )
    customer_name = models.CharField(max_length=200)
    customer_email = models.EmailField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    # Saga ids, not foreign keys: the saga engine is a separate context.
    saga_id = models.UUIDField(null=True, blank=True, db_index=True)
    cancel_saga_id = models.UUIDField(null=True, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["user", "-created_at"], name="booking_user_created")]
        constraints = [
            models.CheckConstraint(condition=Q(total__gt=0), name="booking_total_positive")
        ]

    def __str__(self) -> str:
        return f"Booking {self.id} ({self.status})"


class BookingLine(models.Model):
    booking = models.ForeignKey(Booking, on_delete=models.CASCADE, related_name="lines")
    sku = models.CharField(max_length=64)
    kind = models.CharField(max_length=16)
    name = models.CharField(max_length=200)
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(quantity__gte=1), name="bookingline_quantity_positive"
            )
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku}"

    @property
    def hold_reference(self) -> str:
        """The inventory hold's idempotency handle: one hold per line, ever."""
        return f"booking-line:{self.pk}"

    @property
    def subtotal(self):
        return self.unit_price * self.quantity


class IdempotencyKey(models.Model):
    """A client's Idempotency-Key for one booking request, and the response it got."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64)
    booking = models.ForeignKey(Booking, on_delete=models.CASCADE, related_name="+")
    response = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="idempotency_key_once_per_user")
        ]
        # Retention deletes the oldest keys first, in batches.
        indexes = [models.Index(fields=["created_at"], name="idempotency_key_created")]

    def __str__(self) -> str:
        return f"{self.key} -> {self.booking_id}"
