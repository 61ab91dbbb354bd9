from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from payments.errors import (
    CardDeclined,
    GatewayTimeout,
    GatewayUnavailable,
    RefundExceedsCharge,
    UnknownGatewayCharge,
)
from payments.gateways import get_gateway
from payments.gateways.fake import FakeGateway


@pytest.fixture
def gateway(redis_url) -> FakeGateway:
    return FakeGateway(url=redis_url)


def charge(gateway, key, card="tok_ok", amount="100.00"):
    return gateway.charge(
        amount=Decimal(amount), currency="EUR", card_token=card, idempotency_key=key
    )


def test_tok_ok_charges_and_a_repeated_key_returns_the_same_charge(gateway, key):
    k = key()

    first = charge(gateway, k)
    again = charge(gateway, k)
    other = charge(gateway, key())

    assert first == again
    assert (first.amount, first.currency, first.idempotency_key) == (Decimal("100.00"), "EUR", k)
    assert other.id != first.id
    assert gateway.lookup_charge(idempotency_key=k) == first


def test_any_other_tok_token_succeeds(gateway, key):
    assert charge(gateway, key(), card="tok_visa").amount == Decimal("100.00")


def test_tok_decline_raises_card_declined_and_charges_nothing(gateway, key):
    k = key()

    with pytest.raises(CardDeclined) as exc:
        charge(gateway, k, card="tok_decline")

    assert exc.value.code == "card_declined"
    assert exc.value.retryable is False
    assert gateway.lookup_charge(idempotency_key=k) is None


def test_a_token_not_starting_with_tok_is_declined_with_a_message_naming_it(gateway, key):
    with pytest.raises(CardDeclined) as exc:
        charge(gateway, key(), card="4242424242424242")

    assert "'4242424242424242'" in str(exc.value)


def test_tok_unavailable_n_fails_n_times_without_charging_then_succeeds(gateway, key):
    k = key()

    for _ in range(2):
        with pytest.raises(GatewayUnavailable) as exc:
            charge(gateway, k, card="tok_unavailable_2")
        assert exc.value.code == "gateway_unavailable"
        assert exc.value.retryable is True
        assert gateway.lookup_charge(idempotency_key=k) is None
    third = charge(gateway, k, card="tok_unavailable_2")
    fourth = charge(gateway, k, card="tok_unavailable_2")

    assert third == fourth
    assert gateway.lookup_charge(idempotency_key=k) == third


def test_tok_timeout_records_the_charge_but_never_answers(gateway, key):
    k = key()

    for _ in range(3):
        with pytest.raises(GatewayTimeout) as exc:
            gateway.charge(
                amount=Decimal("100.00"),
                currency="EUR",
                card_token="tok_timeout",
                idempotency_key=k,
                reference="booking:7",
            )
        assert exc.value.code == "gateway_timeout"

    found = gateway.lookup_charge(idempotency_key=k)
    assert found is not None
    assert (found.amount, found.reference) == (Decimal("100.00"), "booking:7")


def test_tok_timeout_n_answers_after_n_attempts_with_the_charge_recorded_first(gateway, key):
    k = key()

    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_timeout_1")
    recorded = gateway.lookup_charge(idempotency_key=k)
    answer = charge(gateway, k, card="tok_timeout_1")

    assert recorded is not None
    assert answer == recorded


def test_concurrent_charges_with_one_key_create_one_charge(gateway, key):
    k = key()
    start = threading.Barrier(8)
    ids: list[str] = []

    def run() -> None:
        start.wait()
        ids.append(charge(gateway, k).id)

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert len(ids) == 8
    assert len(set(ids)) == 1


def test_refund_with_a_repeated_key_returns_the_same_refund(gateway, key):
    ch = charge(gateway, key())
    k = key("refund")

    first = gateway.refund(charge_id=ch.id, amount=Decimal("30.00"), idempotency_key=k)
    again = gateway.refund(charge_id=ch.id, amount=Decimal("30.00"), idempotency_key=k)

    assert first == again
    assert (first.charge_id, first.amount, first.currency) == (ch.id, Decimal("30.00"), "EUR")


def test_refunds_never_exceed_the_charge(gateway, key):
    ch = charge(gateway, key(), amount="100.00")
    gateway.refund(charge_id=ch.id, amount=Decimal("60.00"), idempotency_key=key("refund"))

    with pytest.raises(RefundExceedsCharge) as exc:
        gateway.refund(charge_id=ch.id, amount=Decimal("40.01"), idempotency_key=key("refund"))
    rest = gateway.refund(charge_id=ch.id, amount=Decimal("40.00"), idempotency_key=key("refund"))

    assert exc.value.code == "refund_exceeds_charge"
    assert "exceeds the 40.00 still refundable" in str(exc.value)
    assert rest.amount == Decimal("40.00")
    with pytest.raises(RefundExceedsCharge):
        gateway.refund(charge_id=ch.id, amount=Decimal("0.01"), idempotency_key=key("refund"))


def test_concurrent_full_refunds_with_different_keys_refund_once(gateway, key):
    ch = charge(gateway, key(), amount="50.00")
    start = threading.Barrier(6)
    outcomes: list[str] = []

    def run() -> None:
        start.wait()
        try:
            gateway.refund(charge_id=ch.id, amount=Decimal("50.00"), idempotency_key=key("r"))
            outcomes.append("refunded")
        except RefundExceedsCharge:
            outcomes.append("refused")

    threads = [threading.Thread(target=run) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert sorted(outcomes) == ["refunded"] + ["refused"] * 5


def test_refund_of_an_unknown_charge_raises_unknown_gateway_charge(gateway, key):
    with pytest.raises(UnknownGatewayCharge) as exc:
        gateway.refund(charge_id="ch_nope", amount=Decimal("1.00"), idempotency_key=key())

    assert str(exc.value) == "The gateway has no charge 'ch_nope'."


def test_get_gateway_builds_the_configured_gateway_once(redis_url):
    with override_settings(PAYMENTS_GATEWAY="payments.gateways.fake.FakeGateway"):
        assert isinstance(get_gateway(), FakeGateway)
        assert get_gateway() is get_gateway()


def test_get_gateway_with_a_wrong_path_raises_improperly_configured():
    with (
        override_settings(PAYMENTS_GATEWAY="payments.gateways.nope.Gateway"),
        pytest.raises(ImproperlyConfigured, match=r"PAYMENTS_GATEWAY='payments\.gateways\.nope"),
    ):
        get_gateway()


def test_get_gateway_refuses_a_class_that_is_not_a_gateway():
    with (
        override_settings(PAYMENTS_GATEWAY="decimal.Decimal"),
        pytest.raises(ImproperlyConfigured, match="not a subclass"),
    ):
        get_gateway()


def test_the_fake_gateway_without_redis_url_raises_improperly_configured():
    with (
        override_settings(REDIS_URL="", PAYMENTS_FAKE_GATEWAY_URL=""),
        pytest.raises(ImproperlyConfigured, match="set REDIS_URL"),
    ):
        FakeGateway()
