from django.db import models
from django.db.models import F, Q


class Charge(models.Model):
    """Money captured at the gateway, one per idempotency key."""

    class Status(models.TextChoices):
        CAPTURED = "CAPTURED", "Captured"
        PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED", "Partially refunded"
        REFUNDED = "REFUNDED", "Refunded"

    idempotency_key = models.CharField(max_length=200, unique=True)
    reference = models.CharField(max_length=200, db_index=True, blank=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    gateway_charge_id = models.CharField(max_length=100)
    status = models.CharField(max_length=24, choices=Status.choices, default=Status.CAPTURED)
    refunded_amount = models.DecimalField(max_digits=12, decimal_places=2, default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="payments_charge_amount_gt_0"),
            models.CheckConstraint(
                condition=Q(refunded_amount__gte=0, refunded_amount__lte=F("amount")),
                name="payments_charge_refunded_within_amount",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.idempotency_key}: {self.amount} {self.currency} ({self.status})"


class Refund(models.Model):
    """Money given back on a charge, one per idempotency key."""

    charge = models.ForeignKey(Charge, on_delete=models.PROTECT, related_name="refunds")
    idempotency_key = models.CharField(max_length=200, unique=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    gateway_refund_id = models.CharField(max_length=100)
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="payments_refund_amount_gt_0"),
        ]

    def __str__(self) -> str:
        return f"{self.idempotency_key}: {self.amount} {self.currency}"


class LedgerEntry(models.Model):
    """Append-only record of money movements: + for a charge, - for a refund.

    One CHARGE entry per charge and one REFUND entry per refund, enforced by
    the database, so the ledger sum is exactly charges minus refunds.
    """

    class EntryType(models.TextChoices):
        CHARGE = "CHARGE", "Charge"
        REFUND = "REFUND", "Refund"

    entry_type = models.CharField(max_length=8, choices=EntryType.choices)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    charge = models.ForeignKey(Charge, on_delete=models.PROTECT, related_name="ledger_entries")
    refund = models.OneToOneField(
        Refund, on_delete=models.PROTECT, null=True, blank=True, related_name="ledger_entry"
    )
    reference = models.CharField(max_length=200, db_index=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.CheckConstraint(
                condition=(
                    Q(entry_type="CHARGE", amount__gt=0, refund__isnull=True)
                    | Q(entry_type="REFUND", amount__lt=0, refund__isnull=False)
                ),
                name="payments_ledger_sign_matches_type",
            ),
            models.UniqueConstraint(
                fields=["charge"],
                condition=Q(entry_type="CHARGE"),
                name="payments_ledger_one_charge_entry",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.entry_type} {self.amount} {self.currency} ({self.reference})"
