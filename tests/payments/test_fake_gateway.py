from __future__ import annotations

import pickle
import threading
import time
from decimal import Decimal

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from payments.errors import (
    CardDeclined,
    ChargeVoided,
    GatewayChargePending,
    GatewayTimeout,
    GatewayUnavailable,
    RefundExceedsCharge,
    UnknownGatewayCharge,
)
from payments.gateways import get_gateway
from payments.gateways.fake import FakeGateway, books_url


@pytest.fixture
def gateway(redis_url) -> FakeGateway:
    # Built from the settings, as get_gateway builds it: the books sit in the
    # database after REDIS_URL's.
    return FakeGateway()


@pytest.fixture
def brownout(gateway):
    """``gateway.brownout``; the window is gateway-wide, so it is closed afterwards."""
    yield gateway.brownout
    gateway.brownout_clear()


def charge(gateway, key, card="tok_ok", amount="100.00", reference=""):
    return gateway.charge(
        amount=Decimal(amount),
        currency="EUR",
        card_token=card,
        idempotency_key=key,
        reference=reference,
    )


def refund(gateway, ch, key, amount="10.00"):
    return gateway.refund(charge_id=ch.id, amount=Decimal(amount), idempotency_key=key)


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


# --- void ---------------------------------------------------------------------------
def test_void_of_a_key_with_no_charge_makes_every_later_charge_raise_charge_voided(gateway, key):
    k = key()

    assert gateway.void(idempotency_key=k) is None
    with pytest.raises(ChargeVoided) as exc:
        charge(gateway, k, reference="booking:void")

    assert exc.value.code == "charge_voided"
    assert exc.value.retryable is False
    assert (
        str(exc.value) == f"The charge with idempotency key {k!r} was voided; nothing was charged."
    )
    assert gateway.lookup_charge(idempotency_key=k) is None
    assert gateway.charges(reference="booking:void") == []
    assert gateway.void(idempotency_key=k) is None  # idempotent
    with pytest.raises(ChargeVoided):
        charge(gateway, k, card="tok_timeout_1")


def test_charge_voided_survives_pickling_as_celery_rebuilds_it(gateway, key):
    k = key()
    gateway.void(idempotency_key=k)
    with pytest.raises(ChargeVoided) as exc:
        charge(gateway, k)

    copy = pickle.loads(pickle.dumps(exc.value))  # noqa: S301 - our own bytes

    assert (type(copy), str(copy), copy.idempotency_key) == (ChargeVoided, str(exc.value), k)


def test_void_of_a_captured_charge_returns_it_and_leaves_it_captured(gateway, key):
    k = key()
    ch = charge(gateway, k)

    assert gateway.void(idempotency_key=k) == ch
    assert gateway.void(idempotency_key=k) == ch
    assert charge(gateway, k) == ch
    assert gateway.lookup_charge(idempotency_key=k) == ch


def test_void_finds_the_charge_whose_answer_was_lost(gateway, key):
    k = key()
    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_timeout")

    voided = gateway.void(idempotency_key=k)

    assert voided is not None
    assert voided == gateway.lookup_charge(idempotency_key=k)


def test_void_after_an_attempt_that_charged_nothing_settles_the_key(gateway, key):
    k = key()
    with pytest.raises(GatewayUnavailable):
        charge(gateway, k, card="tok_unavailable_1")

    assert gateway.void(idempotency_key=k) is None
    with pytest.raises(ChargeVoided):
        charge(gateway, k, card="tok_unavailable_1")


def test_concurrent_void_and_charge_of_one_key_agree_on_one_outcome(gateway, key):
    for _ in range(10):
        k = key()
        start = threading.Barrier(2)
        outcome: dict[str, object] = {}

        def charge_it(k=k, start=start, outcome=outcome) -> None:
            start.wait()
            try:
                outcome["charge"] = charge(gateway, k)
            except ChargeVoided:
                outcome["charge"] = None

        def void_it(k=k, start=start, outcome=outcome) -> None:
            start.wait()
            outcome["void"] = gateway.void(idempotency_key=k)

        threads = [threading.Thread(target=charge_it), threading.Thread(target=void_it)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)

        # Either the capture won (the void returns it) or the void did (nothing charged).
        assert outcome["void"] == outcome["charge"]
        assert gateway.lookup_charge(idempotency_key=k) == outcome["charge"]


# --- tok_brownout -------------------------------------------------------------------
def test_tok_brownout_n_loses_the_first_answer_then_refuses_n_times_then_answers(gateway, key):
    k = key()
    ref = key("booking")

    with pytest.raises(GatewayTimeout, match="the charge may exist"):
        charge(gateway, k, card="tok_brownout_2", reference=ref)
    captured = gateway.lookup_charge(idempotency_key=k)
    for _ in range(2):
        with pytest.raises(GatewayUnavailable, match="nothing was charged"):
            charge(gateway, k, card="tok_brownout_2", reference=ref)
    third = charge(gateway, k, card="tok_brownout_2", reference=ref)
    fourth = charge(gateway, k, card="tok_brownout_2", reference=ref)

    assert captured is not None
    assert third == fourth == captured
    assert gateway.charges(reference=ref) == [captured]  # one capture, ever


def test_tok_brownout_alone_refuses_every_attempt_after_the_first(gateway, key):
    k = key()
    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_brownout")

    for _ in range(4):
        with pytest.raises(GatewayUnavailable):
            charge(gateway, k, card="tok_brownout")

    assert gateway.lookup_charge(idempotency_key=k) is not None


# --- tok_late -----------------------------------------------------------------------
def test_tok_late_capture_is_invisible_while_it_is_pending(gateway, key, settings):
    settings.PAYMENTS_FAKE_LATE_CAPTURE_S = 60.0
    k = key()
    ref = key("booking")

    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_late", reference=ref)
    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_late", reference=ref)
    with pytest.raises(GatewayTimeout, match="still in progress"):
        charge(gateway, k, card="tok_ok", reference=ref)  # any token: the key is taken
    with pytest.raises(GatewayChargePending) as exc:
        gateway.void(idempotency_key=k)

    assert exc.value.code == "gateway_charge_pending"
    assert exc.value.retryable is True
    assert "is still being processed; try again" in str(exc.value)
    assert gateway.lookup_charge(idempotency_key=k) is None
    assert gateway.charges(reference=ref) == []
    # The void left no tombstone: the capture is still in progress, not voided.
    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_late", reference=ref)


def test_tok_late_capture_lands_later_and_a_void_then_returns_it(gateway, key, settings):
    settings.PAYMENTS_FAKE_LATE_CAPTURE_S = 0.3
    k = key()
    ref = key("booking")

    with pytest.raises(GatewayTimeout):
        charge(gateway, k, card="tok_late", reference=ref)
    with pytest.raises(GatewayChargePending):
        gateway.void(idempotency_key=k)
    time.sleep(0.4)
    landed = gateway.lookup_charge(idempotency_key=k)

    assert landed is not None
    assert (landed.amount, landed.reference) == (Decimal("100.00"), ref)
    assert gateway.charges(reference=ref) == [landed]
    assert gateway.void(idempotency_key=k) == landed
    assert charge(gateway, k, card="tok_late", reference=ref) == landed
    assert refund(gateway, landed, key("refund")).charge_id == landed.id


def test_tok_late_with_a_negative_delay_raises_improperly_configured(gateway, key, settings):
    settings.PAYMENTS_FAKE_LATE_CAPTURE_S = -1.0

    with pytest.raises(ImproperlyConfigured, match=r"PAYMENTS_FAKE_LATE_CAPTURE_S=-1\.0"):
        charge(gateway, key(), card="tok_late")


# --- charges, refunds, lookup_refund ------------------------------------------------
def test_charges_lists_the_captured_charges_of_a_reference_oldest_first(gateway, key):
    ref = key("booking")
    first = charge(gateway, key(), reference=ref)
    second = charge(gateway, key(), amount="20.00", reference=ref)
    charge(gateway, key(), reference=key("other"))
    with pytest.raises(CardDeclined):
        charge(gateway, key(), card="tok_decline", reference=ref)
    voided = key()
    gateway.void(idempotency_key=voided)
    with pytest.raises(ChargeVoided):
        charge(gateway, voided, reference=ref)
    with pytest.raises(GatewayTimeout):
        charge(gateway, (lost := key()), card="tok_timeout", reference=ref)
    third = gateway.lookup_charge(idempotency_key=lost)
    charge(gateway, first.idempotency_key, reference=ref)  # a repeat adds nothing

    assert gateway.charges(reference=ref) == [first, second, third]
    assert gateway.charges(reference=key("nobody")) == []


def test_refunds_lists_the_refunds_of_a_charge_oldest_first(gateway, key):
    ch = charge(gateway, key())
    other = charge(gateway, key())
    first = refund(gateway, ch, key("refund"), amount="10.00")
    refund(gateway, other, key("refund"))
    second = refund(gateway, ch, key("refund"), amount="5.00")
    refund(gateway, ch, first.idempotency_key, amount="10.00")  # a repeat adds nothing

    assert gateway.refunds(charge_id=ch.id) == [first, second]
    assert gateway.refunds(charge_id=charge(gateway, key()).id) == []


def test_lookup_refund_finds_the_refund_made_with_a_key(gateway, key):
    ch = charge(gateway, key())
    k = key("refund")
    made = refund(gateway, ch, k)

    assert gateway.lookup_refund(idempotency_key=k) == made
    assert gateway.lookup_refund(idempotency_key=key("refund")) is None


# --- the brown-out window -----------------------------------------------------------
def test_while_answers_are_lost_charges_and_refunds_happen_and_time_out(gateway, key, brownout):
    ch = charge(gateway, key())
    brownout(lost_s=30, unavailable_s=0)
    k, rk = key(), key("refund")

    with pytest.raises(GatewayTimeout, match="the charge may exist"):
        charge(gateway, k)
    with pytest.raises(GatewayTimeout, match="the refund may exist"):
        refund(gateway, ch, rk, amount="25.00")
    with pytest.raises(GatewayTimeout):
        charge(gateway, key(), card="tok_decline")  # even a refusal is lost

    landed = gateway.lookup_charge(idempotency_key=k)
    refunded = gateway.lookup_refund(idempotency_key=rk)
    assert landed is not None
    assert refunded is not None
    assert refunded.amount == Decimal("25.00")
    assert gateway.refunds(charge_id=ch.id) == [refunded]
    assert gateway.void(idempotency_key=k) == landed  # void is not lost


def test_while_the_gateway_refuses_nothing_happens(gateway, key, brownout):
    ch = charge(gateway, key())
    brownout(lost_s=0, unavailable_s=30)
    k, rk = key(), key("refund")

    with pytest.raises(GatewayUnavailable, match="nothing was charged"):
        charge(gateway, k)
    with pytest.raises(GatewayUnavailable, match="nothing was refunded"):
        refund(gateway, ch, rk)
    with pytest.raises(GatewayUnavailable, match="nothing was voided"):
        gateway.void(idempotency_key=k)

    assert gateway.lookup_charge(idempotency_key=k) is None
    assert gateway.lookup_refund(idempotency_key=rk) is None
    assert gateway.refunds(charge_id=ch.id) == []
    gateway.brownout_clear()
    assert charge(gateway, k).idempotency_key == k  # the refused void voided nothing


def test_the_window_loses_answers_then_refuses_then_ends(gateway, key, brownout):
    k = key()
    brownout(lost_s=0.3, unavailable_s=0.3)
    start = time.monotonic()

    with pytest.raises(GatewayTimeout):
        charge(gateway, k)
    lost = gateway.lookup_charge(idempotency_key=k)
    time.sleep(max(0.0, start + 0.45 - time.monotonic()))
    with pytest.raises(GatewayUnavailable):
        charge(gateway, k)
    time.sleep(max(0.0, start + 0.7 - time.monotonic()))

    assert lost is not None
    assert charge(gateway, k) == lost


def test_the_window_is_seen_by_every_gateway_on_the_same_books(gateway, key, brownout):
    brownout(lost_s=0, unavailable_s=30)

    with pytest.raises(GatewayUnavailable):
        charge(FakeGateway(), key())
    gateway.brownout_clear()
    assert charge(FakeGateway(), key()).amount == Decimal("100.00")


@pytest.mark.parametrize(("lost_s", "unavailable_s"), [(-1, 1), (1, float("nan")), ("1", 1)])
def test_brownout_refuses_a_window_that_is_not_seconds(gateway, lost_s, unavailable_s):
    with pytest.raises(ValueError, match="give a number of seconds"):
        gateway.brownout(lost_s=lost_s, unavailable_s=unavailable_s)


# --- where the books are kept -------------------------------------------------------
@pytest.mark.parametrize(
    ("broker", "books"),
    [
        ("redis://h:6379/0", "redis://h:6379/1"),
        ("redis://h:6379", "redis://h:6379/1"),
        ("redis://h:6379/", "redis://h:6379/1"),
        ("redis://:s3cret@h:6379/3?socket_timeout=5", "redis://:s3cret@h:6379/4?socket_timeout=5"),
        ("rediss://user:pw@h:6380/14", "rediss://user:pw@h:6380/15"),
        ("redis://h:6379/2?db=7", "redis://h:6379/2?db=8"),  # redis-py reads ?db= first
        ("unix:///run/redis.sock", "unix:///run/redis.sock?db=1"),
        ("unix:///run/redis.sock?db=4", "unix:///run/redis.sock?db=5"),
    ],
)
def test_books_url_is_the_brokers_server_with_the_next_database(broker, books):
    assert books_url(broker) == books


def test_books_url_refuses_the_last_default_database():
    with pytest.raises(ImproperlyConfigured, match="set PAYMENTS_FAKE_GATEWAY_URL") as exc:
        books_url("redis://h:6379/15")

    assert "database 15" in str(exc.value)


def test_books_url_refuses_a_database_that_is_not_a_number():
    with pytest.raises(ImproperlyConfigured, match=r"'abc', not a number"):
        books_url("redis://h:6379/abc")


def test_without_a_books_url_the_fake_keeps_its_books_out_of_the_brokers_database(redis_url, key):
    k = key()
    charge(FakeGateway(), k)

    assert FakeGateway(url=books_url(redis_url)).lookup_charge(idempotency_key=k) is not None
    assert FakeGateway(url=redis_url).lookup_charge(idempotency_key=k) is None


def test_payments_fake_gateway_url_chooses_the_books(redis_url, key):
    k = key()
    charge(FakeGateway(url=redis_url), k)

    with override_settings(PAYMENTS_FAKE_GATEWAY_URL=redis_url):
        assert FakeGateway().lookup_charge(idempotency_key=k) is not None


def test_get_gateway_is_rebuilt_when_the_books_url_settings_change(redis_url):
    before = get_gateway()

    with override_settings(PAYMENTS_FAKE_GATEWAY_URL=redis_url):
        assert get_gateway() is not before
    with (
        override_settings(REDIS_URL="redis://127.0.0.1:6379/15"),
        pytest.raises(ImproperlyConfigured, match="PAYMENTS_FAKE_GATEWAY_URL"),
    ):
        get_gateway()
    assert get_gateway() is not before  # rebuilt again with the restored settings
