from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.db import connection, transaction

from payments import selectors, services
from payments.errors import (
    CardDeclined,
    GatewayTimeout,
    GatewayUnavailable,
    InvalidAmount,
    UnsupportedCurrency,
)
from payments.gateways import GatewayCharge, get_gateway
from payments.models import Charge, LedgerEntry, Refund
from sagas.bench.sqlcount import TRANSACTION, counting

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


# --- lean paths: what each call asks the database ------------------------------------


def statements(counter) -> list[str]:
    """What the database was asked, BEGIN and COMMIT left out (they are the transaction)."""
    return [" ".join(sql.split()) for kind, sql in counter.statements if kind != TRANSACTION]


@pytest.mark.django_db(transaction=True)
def test_charge_create_with_no_transaction_open_records_in_one_of_its_own_without_a_savepoint(key):
    with counting() as counter:
        ch = charge(key(), amount="42.00")

    sql = statements(counter)
    assert [statement.split(" (")[0] for statement in sql[1:]] == [
        'INSERT INTO "payments_charge"',
        'INSERT INTO "payments_ledgerentry"',
    ], sql
    assert sql[0].startswith('SELECT "payments_charge"'), sql
    assert LedgerEntry.objects.get().charge_id == ch.pk


def test_a_charge_recorded_twice_in_the_callers_transaction_is_recorded_once(key):
    gateway_charge = GatewayCharge(
        id="ch_fake_twice", amount=Decimal("12.00"), currency="EUR", idempotency_key=key()
    )

    with transaction.atomic():
        first = services._charge_record(gateway_charge=gateway_charge)
        # The unique key refuses the copy; its savepoint keeps this transaction usable.
        again = services._charge_record(gateway_charge=gateway_charge)
        entries = LedgerEntry.objects.count()

    assert again.pk == first.pk
    assert entries == 1


@pytest.mark.django_db(transaction=True)
def test_charge_undo_reads_the_charge_once_and_records_the_refund_in_three_writes(key):
    k = key()
    ch = charge(k, amount="80.00")

    with counting() as counter:
        refund = services.charge_undo(idempotency_key=k, reason="trip booking undone")

    sql = statements(counter)
    assert len(sql) == 4, sql
    assert sql[0].startswith('SELECT "payments_charge"'), sql
    assert '"payments_refund"' in sql[0], sql  # the refund under the key, in the same read
    assert [statement.split(" (")[0].split(" SET")[0] for statement in sql[1:]] == [
        'INSERT INTO "payments_refund"',
        'INSERT INTO "payments_ledgerentry"',
        'UPDATE "payments_charge"',
    ], sql
    ch.refresh_from_db()
    assert (ch.status, ch.refunded_amount) == (Charge.Status.REFUNDED, Decimal("80.00"))
    assert refund is not None
    assert (refund.amount, refund.reason) == (Decimal("80.00"), "trip booking undone")


def test_charge_undo_records_a_refund_whose_answer_was_lost_instead_of_refunding_again(key):
    k = key()
    ch = charge(k, amount="55.00")
    # The gateway refunded under the key; the answer never reached us.
    get_gateway().refund(
        charge_id=ch.gateway_charge_id, amount=Decimal("55.00"), idempotency_key=f"refund:{k}"
    )

    refund = services.charge_undo(idempotency_key=k)

    assert refund is not None
    assert (refund.amount, refund.reason) == (Decimal("55.00"), "found at the gateway")
    assert Refund.objects.count() == 1
    assert selectors.money_totals(references=["booking:1"])["net"] == Decimal("0.00")


def test_charge_refund_refunds_only_what_another_key_left(key):
    k = key()
    ch = charge(k, amount="100.00")
    get_gateway().refund(
        charge_id=ch.gateway_charge_id, amount=Decimal("30.00"), idempotency_key=key("partial")
    )

    refund = services.charge_refund(charge=ch, refund_key=key("rest"))

    assert refund is not None
    assert refund.amount == Decimal("70.00")
    ch.refresh_from_db()
    assert (ch.status, ch.refunded_amount) == (Charge.Status.REFUNDED, Decimal("100.00"))
    assert selectors.money_totals(references=["booking:1"])["net"] == Decimal("0.00")


def test_a_partial_refund_leaves_the_charge_partially_refunded(key):
    ch = charge(key(), amount="100.00")
    gateway_refund = get_gateway().refund(
        charge_id=ch.gateway_charge_id, amount=Decimal("25.00"), idempotency_key=key("part")
    )

    services._refund_record(charge=ch, gateway_refund=gateway_refund, reason="")

    ch.refresh_from_db()
    assert (ch.status, ch.refunded_amount) == (
        Charge.Status.PARTIALLY_REFUNDED,
        Decimal("25.00"),
    )


def test_partial_refunds_that_add_up_to_the_charge_refund_it_exactly(key):
    # Cents that binary floating point cannot hold: SQLite adds decimals as floats.
    ch = charge(key(), amount="0.30")
    for part in ("0.10", "0.10", "0.10"):
        gateway_refund = get_gateway().refund(
            charge_id=ch.gateway_charge_id, amount=Decimal(part), idempotency_key=key()
        )
        services._refund_record(charge=ch, gateway_refund=gateway_refund, reason="")

    ch.refresh_from_db()
    assert (ch.status, ch.refunded_amount) == (Charge.Status.REFUNDED, Decimal("0.30"))
    assert selectors.money_totals(references=["booking:1"])["net"] == Decimal("0.00")


@pytest.mark.django_db(transaction=True)
def test_charges_refund_all_reads_the_charges_once_and_writes_each_refund_in_three(key):
    reference = key("booking")  # the gateway's books outlive the test database
    charge(key(), amount="30.00", reference=reference)

    with counting() as counter:
        refunds = services.charges_refund_all(
            reference=reference, refund_key_prefix=key("cancel"), reason="booking cancelled"
        )

    sql = statements(counter)
    assert len(sql) == 4, sql
    assert [refund.amount for refund in refunds] == [Decimal("30.00")]
    assert selectors.money_totals(references=[reference])["net"] == Decimal("0.00")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_recorders_of_one_refund_record_it_once(key):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite serialises writers, so there is no race to test")
    ch = charge(key(), amount="64.00")
    gateway_refund = get_gateway().refund(
        charge_id=ch.gateway_charge_id, amount=Decimal("64.00"), idempotency_key=key("refund")
    )
    start = threading.Barrier(4)
    refund_ids: list[int] = []

    def run() -> None:
        try:
            start.wait()
            refund = services._refund_record(charge=ch, gateway_refund=gateway_refund, reason="")
            refund_ids.append(refund.pk)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(refund_ids) == 4
    assert len(set(refund_ids)) == 1
    ch.refresh_from_db()
    assert (ch.status, ch.refunded_amount) == (Charge.Status.REFUNDED, Decimal("64.00"))
    assert LedgerEntry.objects.filter(entry_type="REFUND").count() == 1
    assert selectors.ledger_balance() == Decimal("0.00")
