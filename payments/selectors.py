"""Reads of payments. Other contexts receive the frozen dataclasses, not models."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import DecimalField, F, Q, Sum, Value
from django.db.models.functions import Coalesce

from payments.gateways import get_gateway
from payments.models import Charge, LedgerEntry, Refund

ZERO = Decimal("0.00")


@dataclass(frozen=True)
class ChargeInfo:
    idempotency_key: str
    reference: str
    amount: Decimal
    currency: str
    status: str
    refunded_amount: Decimal
    gateway_charge_id: str
    created_at: datetime


@dataclass(frozen=True)
class RefundInfo:
    idempotency_key: str
    charge_key: str
    amount: Decimal
    currency: str
    gateway_refund_id: str
    created_at: datetime


def charges_and_refunds(*, reference: str) -> tuple[list[ChargeInfo], list[RefundInfo]]:
    """The charges made for ``reference`` and their refunds, each oldest first."""
    refunds = (
        Refund.objects.filter(charge__reference=reference)
        .order_by("created_at", "id")
        .values(
            "idempotency_key",
            "amount",
            "currency",
            "gateway_refund_id",
            "created_at",
            charge_key=F("charge__idempotency_key"),
        )
    )
    charges = charges_for_reference(reference=reference)
    return charges, [RefundInfo(**row) for row in refunds]


def charge_for_key(*, idempotency_key: str) -> ChargeInfo | None:
    charge = Charge.objects.filter(idempotency_key=idempotency_key).first()
    return _charge_info(charge) if charge is not None else None


def charges_by_key(*, idempotency_keys: list[str]) -> dict[str, ChargeInfo]:
    charges = Charge.objects.filter(idempotency_key__in=idempotency_keys)
    return {charge.idempotency_key: _charge_info(charge) for charge in charges}


def charges_for_reference(*, reference: str) -> list[ChargeInfo]:
    charges = Charge.objects.filter(reference=reference).order_by("created_at", "id")
    return [_charge_info(charge) for charge in charges]


def money_totals(
    *, references: list[str] | None = None, currency: str | None = None
) -> dict[str, Decimal]:
    """Charged, refunded (as a positive sum) and net money, from the ledger.

    Limited to ``references`` and ``currency`` when given. Without a currency
    the sums add up amounts of every currency, which is only meaningful as an
    invariant check (e.g. net must be 0).
    """
    entries = LedgerEntry.objects.all()
    if references is not None:
        entries = entries.filter(reference__in=references)
    if currency is not None:
        entries = entries.filter(currency=currency)
    return _money(entries.aggregate(**_money_sums()))


def money_by_reference(*, references: list[str]) -> dict[str, dict[str, Decimal]]:
    """``money_totals`` for each of ``references`` at once (zeros for one with no entries)."""
    rows = (
        LedgerEntry.objects.filter(reference__in=references)
        .values("reference")
        .annotate(**_money_sums())
        .order_by()
    )
    totals = {reference: _money({"charged": ZERO, "refunds": ZERO}) for reference in references}
    totals.update({row["reference"]: _money(row) for row in rows})
    return totals


def _money_sums() -> dict[str, Coalesce]:
    """Charged and refunded sums of ledger entries (refunds are negative entries)."""
    return {
        "charged": _sum(only=Q(entry_type=LedgerEntry.EntryType.CHARGE)),
        "refunds": _sum(only=Q(entry_type=LedgerEntry.EntryType.REFUND)),
    }


def _money(sums: dict[str, Decimal]) -> dict[str, Decimal]:
    charged, refunded = sums["charged"], -sums["refunds"]
    return {"charged": charged, "refunded": refunded, "net": charged - refunded}


def ledger_balance() -> Decimal:
    """The sum of every ledger entry: charges minus refunds."""
    return LedgerEntry.objects.aggregate(balance=_sum())["balance"]


@dataclass(frozen=True)
class GatewayBooks:
    """What the gateway itself holds for one reference: its captures and refunds."""

    reference: str
    captured: Decimal
    refunded: Decimal
    # (idempotency key, amount) of each capture and refund, as the gateway keeps them.
    charges: tuple[tuple[str, Decimal], ...]
    refunds: tuple[tuple[str, Decimal], ...]

    @property
    def net(self) -> Decimal:
        return self.captured - self.refunded


def gateway_books(*, reference: str) -> GatewayBooks:
    """The gateway's own books for ``reference``, read through the gateway interface."""
    gateway = get_gateway()
    charges = gateway.charges(reference=reference)
    refunds = [refund for charge in charges for refund in gateway.refunds(charge_id=charge.id)]
    return GatewayBooks(
        reference=reference,
        captured=sum((charge.amount for charge in charges), ZERO),
        refunded=sum((refund.amount for refund in refunds), ZERO),
        charges=tuple((charge.idempotency_key, charge.amount) for charge in charges),
        refunds=tuple((refund.idempotency_key, refund.amount) for refund in refunds),
    )


def gateway_unrecorded(*, books: GatewayBooks) -> list[str]:
    """Every capture or refund in the gateway's ``books`` that our ledger lacks or misstates."""
    charges = dict(
        Charge.objects.filter(reference=books.reference).values_list("idempotency_key", "amount")
    )
    refunds = dict(
        Refund.objects.filter(charge__reference=books.reference).values_list(
            "idempotency_key", "amount"
        )
    )
    problems = []
    for kind, ours, theirs in (
        ("capture", charges, books.charges),
        ("refund", refunds, books.refunds),
    ):
        for key, amount in theirs:
            if key not in ours:
                problems.append(f"gateway {kind} {key} of {amount} has no local record")
            elif ours[key] != amount:
                problems.append(f"gateway {kind} {key} is {amount}, ours {ours[key]}")
    return problems


def _sum(*, only: Q | None = None) -> Coalesce:
    money = DecimalField(max_digits=14, decimal_places=2)
    return Coalesce(Sum("amount", filter=only), Value(ZERO), output_field=money)


def _charge_info(charge: Charge) -> ChargeInfo:
    return ChargeInfo(
        idempotency_key=charge.idempotency_key,
        reference=charge.reference,
        amount=charge.amount,
        currency=charge.currency,
        status=charge.status,
        refunded_amount=charge.refunded_amount,
        gateway_charge_id=charge.gateway_charge_id,
        created_at=charge.created_at,
    )
