from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection

from payments import selectors, services
from payments.errors import (
    CardDeclined,
    GatewayTimeout,
    GatewayUnavailable,
    InvalidAmount,
    UnsupportedCurrency,
)
from payments.models import Charge, LedgerEntry, Refund

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("redis_url")]


def charge(key, card="tok_ok", amount="120.00", reference="booking:1"):
    return services.charge_create(
        amount=Decimal(amount),
        currency="EUR",
        card_token=card,
        idempotency_key=key,
        reference=reference,
    )


def test_charge_create_records_the_charge_and_a_positive_ledger_entry(key):
    k = key()

    ch = charge(k, amount="120.00")

    assert (ch.amount, ch.currency, ch.status) == (Decimal("120.00"), "EUR", Charge.Status.CAPTURED)
    assert ch.gateway_charge_id.startswith("ch_fake_")
    entry = LedgerEntry.objects.get(charge=ch)
    assert (entry.entry_type, entry.amount, entry.reference) == (
        "CHARGE",
        Decimal("120.00"),
        "booking:1",
    )
    assert selectors.money_totals(references=["booking:1"]) == {
        "charged": Decimal("120.00"),
        "refunded": Decimal("0.00"),
        "net": Decimal("120.00"),
    }


def test_charge_create_with_a_known_key_returns_the_charge_without_calling_the_gateway(key):
    k = key()
    first = charge(k)

    # A declining token would fail if the gateway were asked again.
    again = charge(k, card="tok_decline")

    assert again.pk == first.pk
    assert LedgerEntry.objects.count() == 1


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (Decimal("0"), "Invalid amount Decimal('0'): it must be greater than zero."),
        (Decimal("-5.00"), "Invalid amount Decimal('-5.00'): it must be greater than zero."),
        (Decimal("1.005"), "Invalid amount Decimal('1.005'): it has more than two decimal places."),
        (12.5, "Invalid amount 12.5: money must be a Decimal."),
    ],
)
def test_charge_create_rejects_an_invalid_amount(key, amount, message):
    with pytest.raises(InvalidAmount) as exc:
        services.charge_create(
            amount=amount, currency="EUR", card_token="tok_ok", idempotency_key=key(), reference="b"
        )

    assert exc.value.code == "invalid_amount"
    assert str(exc.value) == message
    assert not Charge.objects.exists()


def test_charge_create_rejects_an_unsupported_currency(key):
    with pytest.raises(UnsupportedCurrency) as exc:
        services.charge_create(
            amount=Decimal("10.00"),
            currency="JPY",
            card_token="tok_ok",
            idempotency_key=key(),
            reference="b",
        )

    assert exc.value.code == "unsupported_currency"
    assert str(exc.value) == "Currency 'JPY' is not supported; use one of EUR, USD, GBP."


def test_charge_create_lets_a_decline_propagate_and_records_nothing(key):
    with pytest.raises(CardDeclined):
        charge(key(), card="tok_decline")

    assert not Charge.objects.exists()
    assert selectors.ledger_balance() == Decimal("0.00")


def test_charge_create_retried_after_gateway_unavailable_charges_once(key):
    k = key()

    with pytest.raises(GatewayUnavailable):
        charge(k, card="tok_unavailable_1")
    ch = charge(k, card="tok_unavailable_1")

    assert Charge.objects.get().pk == ch.pk
    assert selectors.ledger_balance() == Decimal("120.00")


def test_charge_refund_refunds_the_whole_charge_once(key):
    k = key()
    ch = charge(k, amount="99.90")

    refund = services.charge_undo(idempotency_key=k, reason="trip cancelled")
    again = services.charge_undo(idempotency_key=k)

    assert refund is not None
    assert again is not None
    assert again.pk == refund.pk
    assert (refund.amount, refund.idempotency_key, refund.reason) == (
        Decimal("99.90"),
        f"refund:{k}",
        "trip cancelled",
    )
    ch.refresh_from_db()
    assert (ch.status, ch.refunded_amount) == (Charge.Status.REFUNDED, Decimal("99.90"))
    assert Refund.objects.count() == 1
    assert selectors.money_totals(references=["booking:1"]) == {
        "charged": Decimal("99.90"),
        "refunded": Decimal("99.90"),
        "net": Decimal("0.00"),
    }


def test_charge_refund_after_a_timeout_recovers_the_charge_from_the_gateway(key):
    k = key()
    with pytest.raises(GatewayTimeout):
        charge(k, card="tok_timeout", reference="booking:7")
    assert selectors.charge_for_key(idempotency_key=k) is None

    refund = services.charge_undo(idempotency_key=k)

    assert refund is not None
    assert refund.amount == Decimal("120.00")
    info = selectors.charge_for_key(idempotency_key=k)
    assert info is not None
    assert (info.reference, info.status, info.refunded_amount) == (
        "booking:7",
        "REFUNDED",
        Decimal("120.00"),
    )
    assert selectors.money_totals(references=["booking:7"])["net"] == Decimal("0.00")
    assert selectors.ledger_balance() == Decimal("0.00")


@pytest.mark.parametrize("token", ["tok_decline", None])
def test_charge_refund_returns_none_when_nothing_was_charged(key, token):
    k = key()
    if token is not None:
        with pytest.raises(CardDeclined):
            charge(k, card=token)

    assert services.charge_undo(idempotency_key=k) is None
    assert not Charge.objects.exists()
    assert not Refund.objects.exists()


def test_selectors_list_charges_by_reference_and_sum_the_ledger(key):
    k1, k2, k3 = key(), key(), key()
    charge(k1, amount="10.00", reference="booking:1")
    charge(k2, amount="20.00", reference="booking:1")
    charge(k3, amount="5.00", reference="booking:2")
    services.charge_undo(idempotency_key=k2)

    infos = selectors.charges_for_reference(reference="booking:1")

    assert [i.idempotency_key for i in infos] == [k1, k2]
    assert [i.status for i in infos] == ["CAPTURED", "REFUNDED"]
    assert selectors.money_totals() == {
        "charged": Decimal("35.00"),
        "refunded": Decimal("20.00"),
        "net": Decimal("15.00"),
    }
    assert selectors.money_totals(references=["booking:2"])["net"] == Decimal("5.00")
    assert selectors.money_totals(currency="USD")["net"] == Decimal("0.00")
    assert selectors.ledger_balance() == Decimal("15.00")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_refunds_of_one_charge_refund_it_once(key):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite serialises writers, so there is no race to test")
    k = key()
    charge(k, amount="70.00")
    start = threading.Barrier(4)
    refund_ids: list[int] = []

    def run() -> None:
        try:
            start.wait()
            refund = services.charge_undo(idempotency_key=k)
            refund_ids.append(refund.pk if refund else None)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(refund_ids) == 4
    assert len(set(refund_ids)) == 1
    assert selectors.ledger_balance() == Decimal("0.00")


def test_charges_purge_deletes_a_references_charges_refunds_and_ledger_entries(key):
    refunded = charge(key(), reference="booking:purge")
    services.charge_undo(idempotency_key=refunded.idempotency_key)
    kept = charge(key(), reference="booking:kept")

    counts = services.charges_purge(references=["booking:purge"])

    assert counts == {"ledger_entries": 2, "refunds": 1, "charges": 1}
    assert list(Charge.objects.values_list("pk", flat=True)) == [kept.pk]
    assert LedgerEntry.objects.filter(charge=kept).count() == 1
    assert not Refund.objects.exists()
