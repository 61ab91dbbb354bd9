"""Writes of payments: charges, refunds and their ledger entries.

The gateway is called with the caller's idempotency key, so repeating a call
never moves money twice; gateway errors propagate unchanged and the caller
decides whether to retry (``GatewayError.retryable``).
"""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, transaction

from payments.errors import GatewayFaultsUnsupported, InvalidAmount, UnsupportedCurrency
from payments.gateways import GatewayCharge, GatewayRefund, get_gateway
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


def charge_settle(*, idempotency_key: str) -> Charge | None:
    """The charge made with ``idempotency_key``, settled with the gateway; None if there is none.

    For a charge whose outcome is uncertain (its answer was lost, its worker
    died): our record if we have one; otherwise the gateway is asked to void
    the key, which returns the charge if it was captured (recorded here) and
    otherwise makes sure none ever will be, so a capture still on its way
    cannot land after we decided there was nothing. While the gateway is still
    processing a capture it raises ``GatewayChargePending`` (retryable).
    """
    existing = Charge.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return existing
    gateway_charge = get_gateway().void(idempotency_key=idempotency_key)
    if gateway_charge is None:
        return None
    return _charge_record(gateway_charge=gateway_charge)


def charge_undo(*, idempotency_key: str, reason: str = "") -> Refund | None:
    """Undo the charge made with ``idempotency_key``, whatever became of it.

    Settles it with the gateway first (``charge_settle``), then refunds what is
    left under ``refund:<idempotency_key>``, so a second call returns the
    first call's Refund. None when nothing was (or ever will be) charged.
    """
    charge = charge_settle(idempotency_key=idempotency_key)
    if charge is None:
        return None
    return charge_refund(charge=charge, refund_key=f"refund:{idempotency_key}", reason=reason)


def charge_refund(*, charge: Charge, refund_key: str, reason: str = "") -> Refund | None:
    """Refund what is still unrefunded on ``charge``, once per ``refund_key``.

    A key that already has a Refund returns it. Returns None when nothing is
    left to refund. No database transaction is open while the gateway works:
    the gateway answers a repeated key with its first refund, so a call whose
    answer was lost is simply made again, and the refund is recorded after.
    """
    # What the gateway gave back on this charge, whoever asked: a refund whose
    # answer was lost (another saga's, say) is recorded first, so what is left
    # to refund is the gateway's figure, not our guess.
    _refunds_sync(charge)
    # The charge first: a refund recorded under this key since commits with the
    # charge's new total, so it is found below rather than "nothing left".
    charge = Charge.objects.get(pk=charge.pk)  # what other refunds left, fresh
    existing = Refund.objects.filter(idempotency_key=refund_key).first()
    if existing is not None:
        return existing
    refundable = charge.amount - charge.refunded_amount
    if refundable <= 0:
        return None
    gateway_refund = get_gateway().refund(
        charge_id=charge.gateway_charge_id, amount=refundable, idempotency_key=refund_key
    )
    return _refund_record(charge=charge, gateway_refund=gateway_refund, reason=reason)


def charges_refund_all(*, reference: str, refund_key_prefix: str, reason: str) -> list[Refund]:
    """Refund every live charge of ``reference``, each under ``<prefix>:<charge id>``.

    The gateway's own list of the reference's charges is read first, so a
    capture we never heard back about is refunded too. Repeating the call
    refunds nothing twice: each charge's refund key is fixed.
    """
    refunds = [
        charge_refund(charge=charge, refund_key=_keyed(refund_key_prefix, charge), reason=reason)
        for charge in _charges_of(reference)
    ]
    return [refund for refund in refunds if refund is not None]


def charges_restore(
    *, reference: str, refund_key_prefix: str, recharge_key_prefix: str, card_token: str
) -> list[Charge]:
    """Charge again what ``charges_refund_all`` gave back under ``refund_key_prefix``.

    The refunds are read from the gateway's records too (a refund whose answer
    was lost is recorded first), so what is undone is what happened: a refund
    that never ran re-charges nothing. Each refunded charge is charged again
    once, under ``<recharge_key_prefix>:<charge id>``.
    """
    gateway = get_gateway()
    charges = []
    for charge in _charges_of(reference):
        key = _keyed(refund_key_prefix, charge)
        refund = Refund.objects.filter(idempotency_key=key).first()
        if refund is None:
            gateway_refund = gateway.lookup_refund(idempotency_key=key)
            if gateway_refund is None:
                continue
            refund = _refund_record(charge=charge, gateway_refund=gateway_refund, reason="")
        charges.append(
            charge_create(
                amount=refund.amount,
                currency=refund.currency,
                card_token=card_token,
                idempotency_key=_keyed(recharge_key_prefix, charge),
                reference=reference,
            )
        )
    return charges


def _keyed(prefix: str, charge: Charge) -> str:
    return f"{prefix}:{charge.pk}"


def _charges_of(reference: str) -> list[Charge]:
    """Every charge of ``reference``, oldest first, with the gateway's unknown to us recorded."""
    charges_sync(reference=reference)
    return list(Charge.objects.filter(reference=reference).order_by("created_at", "id"))


def charges_sync(*, reference: str) -> list[Charge]:
    """Record every charge the gateway holds for ``reference`` that we have no record of."""
    known = set(
        Charge.objects.filter(reference=reference).values_list("idempotency_key", flat=True)
    )
    return [
        _charge_record(gateway_charge=gateway_charge)
        for gateway_charge in get_gateway().charges(reference=reference)
        if gateway_charge.idempotency_key not in known
    ]


def _refunds_sync(charge: Charge) -> None:
    known = set(Refund.objects.filter(charge=charge).values_list("idempotency_key", flat=True))
    for gateway_refund in get_gateway().refunds(charge_id=charge.gateway_charge_id):
        if gateway_refund.idempotency_key not in known:
            _refund_record(
                charge=charge, gateway_refund=gateway_refund, reason="found at the gateway"
            )


@transaction.atomic
def _refund_record(*, charge: Charge, gateway_refund: GatewayRefund, reason: str) -> Refund:
    """Record a refund the gateway made and its ledger entry, once per refund key.

    The charge row is locked, so concurrent recorders take turns; the one that
    waited finds the first one's Refund.
    """
    charge = Charge.objects.select_for_update().get(pk=charge.pk)
    existing = Refund.objects.filter(idempotency_key=gateway_refund.idempotency_key).first()
    if existing is not None:
        return existing
    refund = Refund.objects.create(
        charge=charge,
        idempotency_key=gateway_refund.idempotency_key,
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


def gateway_brownout(*, lost_s: float, unavailable_s: float) -> None:
    """Open a gateway-wide brown-out (fake gateway only): answers lost, then 503s.

    For chaos runs; ``GatewayFaultsUnsupported`` if the gateway cannot inject it.
    """
    gateway = get_gateway()
    if not hasattr(gateway, "brownout"):
        raise GatewayFaultsUnsupported(type(gateway).__name__)
    gateway.brownout(lost_s=lost_s, unavailable_s=unavailable_s)


def gateway_injects_faults() -> bool:
    """Whether the configured gateway takes fault cards and brown-outs (the fake one does)."""
    return hasattr(get_gateway(), "brownout")


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
