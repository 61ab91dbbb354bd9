"""Writes of payments: charges, refunds and their ledger entries.

The gateway is called with the caller's idempotency key, so repeating a call
never moves money twice; gateway errors propagate unchanged and the caller
decides whether to retry (``GatewayError.retryable``).
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction

from payments.errors import InvalidAmount, UnsupportedCurrency
from payments.gateways import GatewayCharge, get_gateway
from payments.models import Charge, LedgerEntry, Refund

EntryType = LedgerEntry.EntryType


def charge_create(
    *, amount: Decimal, currency: str, card_token: str, idempotency_key: str, reference: str
) -> Charge:
    """Capture ``amount`` at the gateway and record it, once per idempotency key.

    A key that already has a Charge returns it without calling the gateway.
    Deliberately not one atomic block: no database transaction of this
    function stays open across the gateway's network round trip.
    """
    _check_money(amount=amount, currency=currency)
    existing = Charge.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return existing
    gateway_charge = get_gateway().charge(
        amount=amount,
        currency=currency,
        card_token=card_token,
        idempotency_key=idempotency_key,
        reference=reference,
    )
    return _charge_record(gateway_charge=gateway_charge)


@transaction.atomic
def charge_refund(*, idempotency_key: str, reason: str = "") -> Refund | None:
    """Refund what is still unrefunded on the charge made with ``idempotency_key``.

    The refund's own key is ``refund:<idempotency_key>``, so a second call
    returns the first call's Refund. Without a local Charge the gateway is
    asked: a charge whose answer was lost in a timeout is recorded (under the
    reference the gateway kept for it) and refunded. Returns None when there is
    nothing to undo.
    """
    refund_key = f"refund:{idempotency_key}"
    existing = Refund.objects.filter(idempotency_key=refund_key).first()
    if existing is not None:
        return existing

    charge = Charge.objects.filter(idempotency_key=idempotency_key).first()
    if charge is None:
        gateway_charge = get_gateway().lookup_charge(idempotency_key=idempotency_key)
        if gateway_charge is None:
            return None
        charge = _charge_record(gateway_charge=gateway_charge)

    # The row lock makes concurrent refunds of one charge take turns; the one
    # that waited finds the first one's Refund below.
    charge = Charge.objects.select_for_update().get(pk=charge.pk)
    existing = Refund.objects.filter(idempotency_key=refund_key).first()
    if existing is not None:
        return existing
    refundable = charge.amount - charge.refunded_amount
    if refundable <= 0:
        return None

    gateway_refund = get_gateway().refund(
        charge_id=charge.gateway_charge_id, amount=refundable, idempotency_key=refund_key
    )
    # The gateway answers a repeated key with the first refund, whose amount
    # is what was actually given back.
    refund = Refund.objects.create(
        charge=charge,
        idempotency_key=refund_key,
        amount=gateway_refund.amount,
        currency=charge.currency,
        gateway_refund_id=gateway_refund.id,
        reason=reason,
    )
    LedgerEntry.objects.create(
        entry_type=EntryType.REFUND,
        amount=-refund.amount,
        currency=refund.currency,
        charge=charge,
        refund=refund,
        reference=charge.reference,
    )
    charge.refunded_amount += refund.amount
    charge.status = (
        Charge.Status.REFUNDED
        if charge.refunded_amount >= charge.amount
        else Charge.Status.PARTIALLY_REFUNDED
    )
    charge.save(update_fields=["refunded_amount", "status", "updated_at"])
    return refund


@transaction.atomic
def _charge_record(*, gateway_charge: GatewayCharge) -> Charge:
    """Record a gateway charge and its ledger entry; a concurrent recorder may win."""
    try:
        with transaction.atomic():
            charge = Charge.objects.create(
                idempotency_key=gateway_charge.idempotency_key,
                reference=gateway_charge.reference,
                amount=gateway_charge.amount,
                currency=gateway_charge.currency,
                gateway_charge_id=gateway_charge.id,
            )
            LedgerEntry.objects.create(
                entry_type=EntryType.CHARGE,
                amount=charge.amount,
                currency=charge.currency,
                charge=charge,
                reference=charge.reference,
            )
    except IntegrityError:
        # The same key was recorded concurrently; the gateway gave both
        # callers the same charge, so the committed row is the answer.
        existing = Charge.objects.filter(idempotency_key=gateway_charge.idempotency_key).first()
        if existing is None:
            raise
        return existing
    return charge


def _check_money(*, amount: Decimal, currency: str) -> None:
    if not isinstance(amount, Decimal):
        raise InvalidAmount(amount, "money must be a Decimal")
    if not amount.is_finite() or amount <= 0:
        raise InvalidAmount(amount, "it must be greater than zero")
    if amount.as_tuple().exponent < -2:
        raise InvalidAmount(amount, "it has more than two decimal places")
    if currency not in settings.PAYMENTS_CURRENCIES:
        raise UnsupportedCurrency(currency, settings.PAYMENTS_CURRENCIES)


@transaction.atomic
def charges_purge(*, references: list[str]) -> dict[str, int]:
    """Delete the charges of these references with their refunds and ledger entries.

    For harness runs that charged the fake gateway's test card; the ledger is
    otherwise append-only. The gateway keeps its own records.
    """
    charges = Charge.objects.filter(reference__in=references)
    entries, _ = LedgerEntry.objects.filter(charge__in=charges).delete()
    refunds, _ = Refund.objects.filter(charge__in=charges).delete()
    deleted, _ = charges.delete()
    return {"ledger_entries": entries, "refunds": refunds, "charges": deleted}
