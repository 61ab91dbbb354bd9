"""Writes of payments: charges, refunds and their ledger entries.

The gateway is called with the caller's idempotency key, so repeating a call
never moves money twice; gateway errors propagate unchanged and the caller
decides whether to retry (``GatewayError.retryable``).
"""

from __future__ import annotations

import functools
from decimal import Decimal

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import (
    Case,
    CharField,
    F,
    Model,
    OuterRef,
    QuerySet,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Cast, Concat, Round
from django.utils import timezone

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

    Refunds what is left under ``refund:<idempotency_key>``, so a second call
    returns the first call's Refund; a charge we have no record of is settled
    with the gateway first (``charge_settle``). None when nothing was (or ever
    will be) charged.

    Statements when the charge is ours and has no refund yet: one read of the
    charge with the refund under the key, then the refund's three writes
    (``_refund_record``).
    """
    refund_key = f"refund:{idempotency_key}"
    charge = _with_refund(
        Charge.objects.filter(idempotency_key=idempotency_key), key=refund_key
    ).first()
    if charge is None:
        settled = charge_settle(idempotency_key=idempotency_key)
        if settled is None:
            return None
        charge = _with_refund(Charge.objects.filter(pk=settled.pk), key=refund_key).get()
    return _refund_rest(charge, refund_key=refund_key, reason=reason)


def charge_refund(*, charge: Charge, refund_key: str, reason: str = "") -> Refund | None:
    """Refund what is still unrefunded on ``charge``, once per ``refund_key``.

    A key that already has a Refund returns it. Returns None when nothing is
    left to refund. No database transaction is open while the gateway works:
    the gateway answers a repeated key with its first refund, so a call whose
    answer was lost is simply made again, and the refund is recorded after.
    """
    charge = _with_refund(Charge.objects.filter(pk=charge.pk), key=refund_key).get()
    return _refund_rest(charge, refund_key=refund_key, reason=reason)


def charges_refund_all(*, reference: str, refund_key_prefix: str, reason: str) -> list[Refund]:
    """Refund every live charge of ``reference``, each under ``<prefix>:<charge id>``.

    The gateway's own list of the reference's charges is read first, so a
    capture we never heard back about is refunded too. Repeating the call
    refunds nothing twice: each charge's refund key is fixed.
    """
    refunds = [
        _refund_rest(charge, refund_key=_keyed(refund_key_prefix, charge), reason=reason)
        for charge in _charges_of(reference, refund_key_prefix=refund_key_prefix)
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
    for charge in _charges_of(reference, refund_key_prefix=refund_key_prefix):
        if charge.keyed_refund_id is not None:
            refund = Refund.objects.get(pk=charge.keyed_refund_id)
        else:
            key = _keyed(refund_key_prefix, charge)
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


def _with_refund(charges: QuerySet[Charge], *, key: str | Concat) -> QuerySet[Charge]:
    """``charges``, each with ``keyed_refund_id``: the id of its refund under ``key``, or None.

    One statement, so one snapshot: a refund commits together with its
    charge's new refunded total, and the two are seen together or not at all.
    (Read apart, a copy of a refund racing the first could see the total
    without the refund and answer "nothing left".)
    """
    refund = Refund.objects.filter(charge=OuterRef("pk"), idempotency_key=key)
    return charges.annotate(keyed_refund_id=Subquery(refund.values("pk")[:1]))


def _refund_rest(charge: Charge, *, refund_key: str, reason: str) -> Refund | None:
    """Refund what is left of ``charge`` (as ``_with_refund`` read it) under ``refund_key``.

    The gateway's list of the charge's refunds comes first. If it is empty,
    nothing was refunded since ``charge`` was read (a refund is recorded here
    only after the gateway made it, and the gateway keeps it), so the read
    stands and nothing more is read. Otherwise the refunds we lack are
    recorded (one whose answer was lost, another saga's) and the charge and
    the refund under the key are read again, together.

    Interleavings: a copy of this call racing the first either finds the
    first's refund (listed, then read) or asks the gateway with the same key,
    gets the same refund back and finds it recorded when it records it
    (``_refund_record``). A crash after the gateway refunded and before the
    record committed leaves a refund the next call finds in the gateway's
    list and records.
    """
    gateway = get_gateway()
    listed = gateway.refunds(charge_id=charge.gateway_charge_id)
    if listed:
        _refunds_sync(charge, listed)
        charge = _with_refund(Charge.objects.filter(pk=charge.pk), key=refund_key).get()
    if charge.keyed_refund_id is not None:
        return Refund.objects.get(pk=charge.keyed_refund_id)
    refundable = charge.amount - charge.refunded_amount
    if refundable <= 0:
        return None
    gateway_refund = gateway.refund(
        charge_id=charge.gateway_charge_id, amount=refundable, idempotency_key=refund_key
    )
    return _refund_record(charge=charge, gateway_refund=gateway_refund, reason=reason)


def _charges_of(reference: str, *, refund_key_prefix: str) -> list[Charge]:
    """Every charge of ``reference``, oldest first, with the gateway's unknown to us recorded.

    Each carries the id of its refund under ``<refund_key_prefix>:<charge id>``
    (``_with_refund``). One read when the gateway lists no charge we lack.
    """
    key = Concat(Value(f"{refund_key_prefix}:"), Cast(OuterRef("pk"), CharField()))
    charges = _with_refund(Charge.objects.filter(reference=reference), key=key).order_by(
        "created_at", "id"
    )
    known = list(charges)
    keys = {charge.idempotency_key for charge in known}
    unknown = [
        gateway_charge
        for gateway_charge in get_gateway().charges(reference=reference)
        if gateway_charge.idempotency_key not in keys
    ]
    if not unknown:
        return known
    for gateway_charge in unknown:
        _charge_record(gateway_charge=gateway_charge)
    return list(charges.all())


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


def _refunds_sync(charge: Charge, listed: list[GatewayRefund]) -> None:
    """Record the refunds of ``listed`` (the gateway's, for ``charge``) that we lack."""
    known = set(
        Refund.objects.filter(
            idempotency_key__in=[refund.idempotency_key for refund in listed]
        ).values_list("idempotency_key", flat=True)
    )
    for gateway_refund in listed:
        if gateway_refund.idempotency_key not in known:
            _refund_record(
                charge=charge, gateway_refund=gateway_refund, reason="found at the gateway"
            )


def _refund_record(*, charge: Charge, gateway_refund: GatewayRefund, reason: str) -> Refund:
    """Record a refund the gateway made, its ledger entry and the charge's new total, once.

    Three statements: INSERT the refund (its key is unique), INSERT the
    ledger entry, and UPDATE the charge's refunded total and status with F()
    expressions, so the new total is computed from the committed row. In a
    transaction of their own when none is open (a payment step's case: no
    savepoint); in a savepoint inside the caller's.

    Interleavings: a concurrent recorder of the same key waits on the unique
    index, fails once the first commits, and returns the first's Refund; two
    refunds of one charge under different keys add up in the UPDATE (the
    second waits for the first's row lock, then re-reads the total), and the
    charge's check constraint (refunded <= amount) refuses a sum past the
    charge: the last line of defence. A crash between the statements rolls
    all three back; the gateway keeps its refund, which the next call finds
    in its list.
    """
    amount = gateway_refund.amount
    # Rounded to the cent in the database: SQLite adds decimals as binary
    # floats (0.10 three times is more than 0.30 there); PostgreSQL is exact.
    refunded = Round(F("refunded_amount") + amount, 2)
    try:
        with transaction.atomic():
            refund = Refund.objects.create(
                charge=charge,
                idempotency_key=gateway_refund.idempotency_key,
                amount=amount,
                currency=charge.currency,
                gateway_refund_id=gateway_refund.id,
                reason=reason,
            )
            LedgerEntry.objects.create(
                entry_type=EntryType.REFUND,
                amount=-amount,
                currency=refund.currency,
                charge=charge,
                refund=refund,
                reference=charge.reference,
            )
            Charge.objects.filter(pk=charge.pk).update(
                refunded_amount=refunded,
                status=Case(
                    When(amount__lte=refunded, then=Value(Charge.Status.REFUNDED)),
                    default=Value(Charge.Status.PARTIALLY_REFUNDED),
                ),
                updated_at=timezone.now(),
            )
    except IntegrityError:
        # The same key was recorded concurrently: the gateway gave both
        # callers the same refund, so the committed row is the answer.
        existing = Refund.objects.filter(idempotency_key=gateway_refund.idempotency_key).first()
        if existing is None:
            raise
        return existing
    return refund


def _charge_record(*, gateway_charge: GatewayCharge) -> Charge:
    """Record a gateway charge and its ledger entry, once per idempotency key.

    Two INSERTs, in a transaction of their own when none is open (a payment
    step's case: no savepoint); in a savepoint inside the caller's, so a lost
    race below leaves the caller's transaction usable.

    Interleavings: a concurrent recorder of the same key waits on the unique
    index, fails once the first commits and returns the first's row (the
    gateway gave both the same charge). A crash between the INSERTs rolls
    both back; the gateway keeps the capture, which ``charge_settle`` and
    ``charges_sync`` find in its books.
    """
    try:
        with transaction.atomic():
            charge = _inserted(
                Charge(
                    idempotency_key=gateway_charge.idempotency_key,
                    reference=gateway_charge.reference,
                    amount=gateway_charge.amount,
                    currency=gateway_charge.currency,
                    gateway_charge_id=gateway_charge.id,
                )
            )
            _inserted(
                LedgerEntry(
                    entry_type=EntryType.CHARGE,
                    amount=charge.amount,
                    currency=charge.currency,
                    charge=charge,
                    reference=charge.reference,
                )
            )
    except IntegrityError:
        # The same key was recorded concurrently; the gateway gave both
        # callers the same charge, so the committed row is the answer.
        existing = Charge.objects.filter(idempotency_key=gateway_charge.idempotency_key).first()
        if existing is None:
            raise
        return existing
    return charge


def _inserted(row: Model) -> Model:
    """``row`` inserted as ``row.save()`` would (defaults, ``auto_now``), as one
    ``INSERT ... RETURNING id`` without the machinery around it (no model signals are
    used here): compiling the ORM's insert took about as long as running it, and a
    charge's two rows are on every trip's path."""
    model = type(row)
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    values = [field.get_db_prep_save(field.pre_save(row, add=True), connection) for field in fields]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(connection.vendor, model), values)
        row.pk = cursor.fetchone()[0]
    row._state.adding = False
    row._state.db = connection.alias
    return row


@functools.lru_cache(maxsize=8)
def _insert_sql(vendor: str, model: type[Model]) -> str:
    quote = connection.ops.quote_name
    fields = [field for field in model._meta.concrete_fields if not field.primary_key]
    columns = ", ".join(quote(field.column) for field in fields)
    # Names come from the model; every value is a parameter.
    return (
        f"INSERT INTO {quote(model._meta.db_table)} ({columns}) "  # noqa: S608
        f"VALUES ({', '.join(['%s'] * len(fields))}) RETURNING {quote(model._meta.pk.column)}"
    )


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
