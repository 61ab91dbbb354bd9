"""A gateway that moves no money, with faults chosen by the card token.

Part of the product, not a test double: tests and the chaos command inject
declines, outages and lost answers through it. Its state lives in Redis, outside
the caller's database transaction, because a real gateway keeps a charge even
when the saga step that asked for it rolls back.

Card tokens:

- ``tok_ok`` and any other ``tok_...`` not listed here: success.
- ``tok_decline``: ``CardDeclined``, nothing charged.
- ``tok_unavailable_N``: the first N attempts for an idempotency key raise
  ``GatewayUnavailable`` with nothing charged; later ones succeed.
  ``tok_unavailable`` alone is unavailable on every attempt.
- ``tok_timeout``: every attempt records the charge, then raises
  ``GatewayTimeout``; ``lookup_charge`` finds the charge.
- ``tok_timeout_N``: like ``tok_timeout`` for the first N attempts, then
  answers with the charge recorded earlier.
- anything not starting with ``tok_``: ``CardDeclined`` naming the token.
"""

from __future__ import annotations

import json
import re
import uuid
from decimal import Decimal

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from payments.errors import (
    CardDeclined,
    GatewayTimeout,
    GatewayUnavailable,
    InvalidAmount,
    RefundExceedsCharge,
    UnknownGatewayCharge,
)
from payments.gateways.base import Gateway, GatewayCharge, GatewayRefund

KEY_PREFIX = "fakegw:"
# Long enough for any saga, its retries and an operator's look; short enough
# that test and chaos runs do not fill Redis.
TTL_S = 7 * 24 * 3600

_UNAVAILABLE = re.compile(r"tok_unavailable(?:_(\d+))?")
_TIMEOUT = re.compile(r"tok_timeout(?:_(\d+))?")


class FakeGateway(Gateway):
    def __init__(self, *, url: str | None = None) -> None:
        url = url or getattr(settings, "PAYMENTS_FAKE_GATEWAY_URL", "") or settings.REDIS_URL
        if not url:
            raise ImproperlyConfigured(
                "FakeGateway keeps its charges in Redis: set REDIS_URL "
                "(or PAYMENTS_FAKE_GATEWAY_URL), e.g. redis://127.0.0.1:6379/0."
            )
        self._redis = redis.Redis.from_url(url, decode_responses=True)

    def charge(
        self,
        *,
        amount: Decimal,
        currency: str,
        card_token: str,
        idempotency_key: str,
        reference: str = "",
    ) -> GatewayCharge:
        _check_amount(amount)
        if not card_token.startswith("tok_"):
            raise CardDeclined(f"Card declined: {card_token!r} is not a card token (tok_...).")
        if card_token == "tok_decline":  # noqa: S105 - a test card token, not a secret
            raise CardDeclined(f"Card declined by the issuer (token {card_token!r}).")

        if match := _UNAVAILABLE.fullmatch(card_token):
            attempt = self._attempt(idempotency_key)
            if _still_failing(match, attempt):
                raise GatewayUnavailable(
                    f"Gateway unavailable (attempt {attempt} for key {idempotency_key!r}); "
                    "nothing was charged."
                )
            return self._record_charge(
                amount=amount,
                currency=currency,
                idempotency_key=idempotency_key,
                reference=reference,
            )

        if match := _TIMEOUT.fullmatch(card_token):
            attempt = self._attempt(idempotency_key)
            charge = self._record_charge(
                amount=amount,
                currency=currency,
                idempotency_key=idempotency_key,
                reference=reference,
            )
            if _still_failing(match, attempt):
                raise GatewayTimeout(
                    f"Gateway timed out (attempt {attempt} for key {idempotency_key!r}); "
                    "the charge may exist."
                )
            return charge

        return self._record_charge(
            amount=amount, currency=currency, idempotency_key=idempotency_key, reference=reference
        )

    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> GatewayRefund:
        _check_amount(amount)
        charge_key = self._redis.get(_key("charge_id", charge_id))
        raw_charge = self._redis.get(_key("charge", charge_key)) if charge_key else None
        if raw_charge is None:
            raise UnknownGatewayCharge(charge_id)
        charge = _charge_from_json(raw_charge)

        refund_key = _key("refund", idempotency_key)
        refunded_key = _key("refunded", charge_id)
        # Optimistic transaction: the refunded total and the refund are written
        # together, and only if neither changed since they were read, so
        # concurrent refunds can never add up to more than the charge.
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(refund_key, refunded_key)
                    existing = pipe.get(refund_key)
                    if existing is not None:
                        return _refund_from_json(existing)
                    refunded = Decimal(pipe.get(refunded_key) or "0")
                    if refunded + amount > charge.amount:
                        raise RefundExceedsCharge(charge_id, amount, charge.amount - refunded)
                    refund = GatewayRefund(
                        id=f"re_fake_{uuid.uuid4().hex}",
                        charge_id=charge_id,
                        amount=amount,
                        currency=charge.currency,
                        idempotency_key=idempotency_key,
                    )
                    pipe.multi()
                    pipe.set(refunded_key, str(refunded + amount), ex=TTL_S)
                    pipe.set(refund_key, _refund_to_json(refund), ex=TTL_S)
                    pipe.execute()
                    return refund
                except redis.WatchError:
                    continue

    def lookup_charge(self, *, idempotency_key: str) -> GatewayCharge | None:
        raw = self._redis.get(_key("charge", idempotency_key))
        return _charge_from_json(raw) if raw is not None else None

    def _attempt(self, idempotency_key: str) -> int:
        """Count one charge attempt for the key; 1 on the first."""
        key = _key("attempts", idempotency_key)
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, TTL_S)
            attempt, _ = pipe.execute()
        return int(attempt)

    def _record_charge(
        self, *, amount: Decimal, currency: str, idempotency_key: str, reference: str
    ) -> GatewayCharge:
        """Create the key's charge, or return the one a previous attempt created."""
        charge = GatewayCharge(
            id=f"ch_fake_{uuid.uuid4().hex}",
            amount=amount,
            currency=currency,
            idempotency_key=idempotency_key,
            reference=reference,
        )
        # The id -> key index is written first, so any charge id that is ever
        # handed out can already be refunded.
        index_key = _key("charge_id", charge.id)
        self._redis.set(index_key, idempotency_key, ex=TTL_S)
        if self._redis.set(
            _key("charge", idempotency_key), _charge_to_json(charge), nx=True, ex=TTL_S
        ):
            return charge
        self._redis.delete(index_key)
        existing = self.lookup_charge(idempotency_key=idempotency_key)
        if existing is None:
            # Only if the key expired in between: create it afresh.
            return self._record_charge(
                amount=amount,
                currency=currency,
                idempotency_key=idempotency_key,
                reference=reference,
            )
        return existing


def _key(kind: str, name: str) -> str:
    return f"{KEY_PREFIX}{kind}:{name}"


def _still_failing(match: re.Match[str], attempt: int) -> bool:
    failures = match.group(1)
    return failures is None or attempt <= int(failures)


def _check_amount(amount: Decimal) -> None:
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise InvalidAmount(amount, "the gateway takes a positive Decimal")


def _charge_to_json(charge: GatewayCharge) -> str:
    return json.dumps(
        {
            "id": charge.id,
            "amount": str(charge.amount),
            "currency": charge.currency,
            "idempotency_key": charge.idempotency_key,
            "reference": charge.reference,
        }
    )


def _charge_from_json(raw: str) -> GatewayCharge:
    data = json.loads(raw)
    return GatewayCharge(
        id=data["id"],
        amount=Decimal(data["amount"]),
        currency=data["currency"],
        idempotency_key=data["idempotency_key"],
        reference=data.get("reference", ""),
    )


def _refund_to_json(refund: GatewayRefund) -> str:
    return json.dumps(
        {
            "id": refund.id,
            "charge_id": refund.charge_id,
            "amount": str(refund.amount),
            "currency": refund.currency,
            "idempotency_key": refund.idempotency_key,
        }
    )


def _refund_from_json(raw: str) -> GatewayRefund:
    data = json.loads(raw)
    return GatewayRefund(
        id=data["id"],
        charge_id=data["charge_id"],
        amount=Decimal(data["amount"]),
        currency=data["currency"],
        idempotency_key=data["idempotency_key"],
    )
