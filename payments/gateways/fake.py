"""A gateway that moves no money, with faults chosen by the card token.

Part of the product, not a test double: tests and the chaos command inject
declines, outages and lost answers through it. Its state (its "books") lives in
Redis, outside the caller's database transaction, because a real gateway keeps
a charge even when the saga step that asked for it rolls back. The books are
kept in their own Redis database, never the broker's (see ``books_url``).

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
- ``tok_brownout_N``: the first attempt captures the charge and raises
  ``GatewayTimeout``; the next N attempts raise ``GatewayUnavailable`` and
  charge nothing new; later ones answer with the first attempt's charge.
  ``tok_brownout`` alone is unavailable on every attempt after the first.
- ``tok_late``: the first attempt records a capture that lands only
  ``settings.PAYMENTS_FAKE_LATE_CAPTURE_S`` seconds later, and raises
  ``GatewayTimeout``. Until it lands, ``charge`` with the key raises
  ``GatewayTimeout``, ``lookup_charge`` and ``charges`` do not see it and
  ``void`` raises ``GatewayChargePending``; afterwards all of them find it.
- anything not starting with ``tok_``: ``CardDeclined`` naming the token.

The capture of any key that ``void`` settled first raises ``ChargeVoided``.

Besides the tokens, ``FakeGateway.brownout`` opens a gateway-wide window: for
a while every charge and refund is carried out but its answer is lost
(``GatewayTimeout``), then for a while every charge, refund and void is
refused (``GatewayUnavailable``). Lookups answer throughout. Refunds have no
card token: only the window makes them fail.

Times (landing, the window) are Redis's clock, so every process using the
books agrees on them whatever its host's clock says.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import uuid
from decimal import Decimal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from payments.errors import (
    CardDeclined,
    ChargeVoided,
    GatewayChargePending,
    GatewayError,
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
# Redis's default number of databases (0-15): the books take the broker's + 1.
_REDIS_DATABASES = 16

_UNAVAILABLE = re.compile(r"tok_unavailable(?:_(\d+))?")
_TIMEOUT = re.compile(r"tok_timeout(?:_(\d+))?")
_BROWNOUT = re.compile(r"tok_brownout(?:_(\d+))?")
_LATE = "tok_late"

# Phases of the brown-out window.
_LOST = "lost"
_REFUSED = "refused"
_WINDOW_KEY = f"{KEY_PREFIX}window:brownout"


def books_url(broker_url: str) -> str:
    """The fake gateway's Redis URL when none is set: the broker's server, database + 1.

    The books are the bank's side of every payment, which a saga's recovery
    asks about. The broker's database is flushed now and then (tests, chaos
    runs, an operator clearing stuck messages); such a FLUSHDB must never erase
    the bank, so the books live in the next database of the same server.
    Credentials and the query string are kept; ``redis://h:6379`` is database 0.
    """
    parts = urlsplit(broker_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    # redis-py reads the database from ``?db=`` first, then from the path
    # (a unix:// URL's path is its socket, so only ``?db=`` names one there).
    in_query = [value for name, value in query if name == "db"]
    if in_query:
        raw = in_query[0]
    elif parts.scheme == "unix":
        raw = ""
    else:
        raw = parts.path.strip("/")
    try:
        db = int(raw or "0")
    except ValueError:
        raise ImproperlyConfigured(
            f"REDIS_URL names Redis database {raw!r}, not a number, so the fake gateway "
            "cannot take the next one for its books: set PAYMENTS_FAKE_GATEWAY_URL."
        ) from None
    if not 0 <= db < _REDIS_DATABASES - 1:
        raise ImproperlyConfigured(
            f"REDIS_URL uses Redis database {db}; the fake gateway keeps its books in the "
            f"next one, and Redis has {_REDIS_DATABASES} (0-{_REDIS_DATABASES - 1}) by "
            "default: set PAYMENTS_FAKE_GATEWAY_URL to a Redis database of its own "
            "(never the broker's), or use a lower database for the broker."
        )
    if in_query or parts.scheme == "unix":
        query = [(name, value) for name, value in query if name != "db"]
        query.append(("db", str(db + 1)))
        # Not urlunsplit: it drops the "//" of a unix:// URL, which has no host.
        return f"{broker_url.partition('?')[0]}?{urlencode(query)}"
    return urlunsplit(parts._replace(path=f"/{db + 1}"))


class FakeGateway(Gateway):
    def __init__(self, *, url: str | None = None) -> None:
        url = url or getattr(settings, "PAYMENTS_FAKE_GATEWAY_URL", "")
        if not url and settings.REDIS_URL:
            url = books_url(settings.REDIS_URL)
        if not url:
            raise ImproperlyConfigured(
                "FakeGateway keeps its charges in Redis: set REDIS_URL (its books then go "
                "to the next database) or PAYMENTS_FAKE_GATEWAY_URL, "
                "e.g. redis://127.0.0.1:6379/1."
            )
        self._redis = redis.Redis.from_url(url, decode_responses=True)

    # --- the Gateway interface ---------------------------------------------------
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
        now, phase = self._clock_and_window()
        if phase == _REFUSED:
            raise GatewayUnavailable(
                f"Gateway unavailable (brown-out, key {idempotency_key!r}); nothing was charged."
            )
        request = {
            "now": now,
            "amount": amount,
            "currency": currency,
            "card_token": card_token,
            "idempotency_key": idempotency_key,
            "reference": reference,
        }
        if phase != _LOST:
            return self._charge(**request)
        # Carried out, answer lost: whatever it was, success or refusal.
        with contextlib.suppress(GatewayError):
            self._charge(**request)
        raise GatewayTimeout(
            f"Gateway timed out (brown-out, key {idempotency_key!r}); the charge may exist."
        )

    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> GatewayRefund:
        _check_amount(amount)
        now, phase = self._clock_and_window()
        if phase == _REFUSED:
            raise GatewayUnavailable(
                f"Gateway unavailable (brown-out, refund key {idempotency_key!r}); "
                "nothing was refunded."
            )
        request = {"now": now, "charge_id": charge_id, "amount": amount, "key": idempotency_key}
        if phase != _LOST:
            return self._refund(**request)
        with contextlib.suppress(GatewayError):
            self._refund(**request)
        raise GatewayTimeout(
            f"Gateway timed out (brown-out, refund key {idempotency_key!r}); the refund may exist."
        )

    def lookup_charge(self, *, idempotency_key: str) -> GatewayCharge | None:
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.get(_key("charge", idempotency_key))
            clock, raw = pipe.execute()
        if raw is None:
            return None
        charge, lands_at = _stored_from_json(raw)
        return charge if charge is not None and lands_at <= _seconds(clock) else None

    def void(self, *, idempotency_key: str) -> GatewayCharge | None:
        now, phase = self._clock_and_window()
        if phase == _REFUSED:
            raise GatewayUnavailable(
                f"Gateway unavailable (brown-out, key {idempotency_key!r}); nothing was voided."
            )
        charge_key = _key("charge", idempotency_key)
        # The tombstone takes the key's charge slot: whichever of a capture and
        # a void writes it first wins, and the other one sees it.
        tombstone = json.dumps({"voided": True, "idempotency_key": idempotency_key})
        while True:
            if self._redis.set(charge_key, tombstone, nx=True, ex=TTL_S):
                return None
            raw = self._redis.get(charge_key)
            if raw is None:
                continue  # expired in between: void afresh
            charge, lands_at = _stored_from_json(raw)
            if charge is None:
                return None  # voided before
            if lands_at > now:
                raise GatewayChargePending(idempotency_key)
            return charge

    def charges(self, *, reference: str) -> list[GatewayCharge]:
        now = self._now()
        keys = self._redis.zrange(_key("reference", reference), 0, -1)
        if not keys:
            return []
        found = []
        for raw in self._redis.mget([_key("charge", key) for key in keys]):
            if raw is None:
                continue  # expired
            charge, lands_at = _stored_from_json(raw)
            if charge is not None and lands_at <= now and charge.reference == reference:
                found.append(charge)
        return found

    def refunds(self, *, charge_id: str) -> list[GatewayRefund]:
        keys = self._redis.lrange(_key("refunds", charge_id), 0, -1)
        if not keys:
            return []
        raws = self._redis.mget([_key("refund", key) for key in keys])
        return [_refund_from_json(raw) for raw in raws if raw is not None]

    def lookup_refund(self, *, idempotency_key: str) -> GatewayRefund | None:
        raw = self._redis.get(_key("refund", idempotency_key))
        return _refund_from_json(raw) if raw is not None else None

    # --- fake only: the brown-out window -------------------------------------------
    def brownout(self, *, lost_s: float, unavailable_s: float) -> None:
        """Open a gateway-wide brown-out now, replacing any window already open.

        For ``lost_s`` seconds every charge and refund is carried out but
        answered with ``GatewayTimeout``; for the ``unavailable_s`` seconds after
        that every charge, refund and void is refused with ``GatewayUnavailable``
        and nothing happens. Lookups answer throughout. Kept in the books, so
        every process using them sees the same window.
        """
        for name, value in (("lost_s", lost_s), ("unavailable_s", unavailable_s)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: give a number of seconds, 0 or more")
        now = self._now()
        with self._redis.pipeline() as pipe:
            pipe.hset(
                _WINDOW_KEY,
                mapping={
                    "lost_until": repr(now + lost_s),
                    "unavailable_until": repr(now + lost_s + unavailable_s),
                },
            )
            # Over by then; the key only has to outlive the window.
            pipe.expire(_WINDOW_KEY, math.ceil(lost_s + unavailable_s) + 1)
            pipe.execute()

    def brownout_clear(self) -> None:
        """Close the brown-out window now, whichever phase it is in."""
        self._redis.delete(_WINDOW_KEY)

    # --- charges ---------------------------------------------------------------------
    def _charge(
        self,
        *,
        now: float,
        amount: Decimal,
        currency: str,
        card_token: str,
        idempotency_key: str,
        reference: str,
    ) -> GatewayCharge:
        """The card token's behaviour, with the gateway itself up."""
        if not card_token.startswith("tok_"):
            raise CardDeclined(f"Card declined: {card_token!r} is not a card token (tok_...).")
        if card_token == "tok_decline":  # noqa: S105 - a test card token, not a secret
            raise CardDeclined(f"Card declined by the issuer (token {card_token!r}).")

        def capture(lands_at: float | None = None) -> tuple[GatewayCharge, bool]:
            return self._capture(
                now=now,
                lands_at=lands_at,
                amount=amount,
                currency=currency,
                idempotency_key=idempotency_key,
                reference=reference,
            )

        if match := _UNAVAILABLE.fullmatch(card_token):
            attempt = self._attempt(idempotency_key)
            if _still_failing(match, attempt):
                raise GatewayUnavailable(
                    f"Gateway unavailable (attempt {attempt} for key {idempotency_key!r}); "
                    "nothing was charged."
                )
            return capture()[0]

        if match := _TIMEOUT.fullmatch(card_token):
            attempt = self._attempt(idempotency_key)
            charge, _ = capture()
            if _still_failing(match, attempt):
                raise GatewayTimeout(
                    f"Gateway timed out (attempt {attempt} for key {idempotency_key!r}); "
                    "the charge may exist."
                )
            return charge

        if match := _BROWNOUT.fullmatch(card_token):
            attempt = self._attempt(idempotency_key)
            if attempt == 1:
                capture()
                raise GatewayTimeout(
                    f"Gateway timed out (attempt 1 for key {idempotency_key!r}); "
                    "the charge may exist."
                )
            # The attempts after the lost one count from 1.
            if _still_failing(match, attempt - 1):
                raise GatewayUnavailable(
                    f"Gateway unavailable (attempt {attempt} for key {idempotency_key!r}); "
                    "nothing was charged."
                )
            return capture()[0]

        if card_token == _LATE:
            charge, captured = capture(lands_at=now + _late_capture_s())
            if captured:
                raise GatewayTimeout(
                    f"Gateway timed out (key {idempotency_key!r}); the charge may exist."
                )
            return charge

        return capture()[0]

    def _capture(
        self,
        *,
        now: float,
        lands_at: float | None,
        amount: Decimal,
        currency: str,
        idempotency_key: str,
        reference: str,
    ) -> tuple[GatewayCharge, bool]:
        """Capture the key's charge unless it has one already.

        The charge lands (becomes visible) at once, or at ``lands_at`` if given.

        Returns the key's charge and whether this call captured it. Raises
        ``ChargeVoided`` if the key was voided, and ``GatewayTimeout`` if an
        earlier attempt's capture has not landed yet (its answer is not known).
        """
        charge_key = _key("charge", idempotency_key)
        # Optimistic transaction: the charge and its indexes are written together,
        # and only if no attempt or void took the key's slot since it was read.
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(charge_key)
                    raw = pipe.get(charge_key)
                    if raw is not None:
                        pipe.unwatch()
                        return self._existing(raw, now=now, idempotency_key=idempotency_key)
                    charge = GatewayCharge(
                        id=f"ch_fake_{uuid.uuid4().hex}",
                        amount=amount,
                        currency=currency,
                        idempotency_key=idempotency_key,
                        reference=reference,
                    )
                    reference_key = _key("reference", reference)
                    pipe.multi()
                    pipe.set(charge_key, _charge_to_json(charge, lands_at=lands_at), ex=TTL_S)
                    pipe.set(_key("charge_id", charge.id), idempotency_key, ex=TTL_S)
                    # Scored by landing time: charges() lists them in that order.
                    pipe.zadd(
                        reference_key, {idempotency_key: now if lands_at is None else lands_at}
                    )
                    pipe.expire(reference_key, TTL_S)
                    pipe.execute()
                    return charge, True
                except redis.WatchError:
                    continue

    @staticmethod
    def _existing(raw: str, *, now: float, idempotency_key: str) -> tuple[GatewayCharge, bool]:
        charge, lands_at = _stored_from_json(raw)
        if charge is None:
            raise ChargeVoided(idempotency_key)
        if lands_at > now:
            raise GatewayTimeout(
                f"Gateway timed out (key {idempotency_key!r}, capture still in progress); "
                "the charge may exist."
            )
        return charge, False

    def _attempt(self, idempotency_key: str) -> int:
        """Count one charge attempt for the key; 1 on the first."""
        key = _key("attempts", idempotency_key)
        with self._redis.pipeline() as pipe:
            pipe.incr(key)
            pipe.expire(key, TTL_S)
            attempt, _ = pipe.execute()
        return int(attempt)

    # --- refunds ---------------------------------------------------------------------
    def _refund(self, *, now: float, charge_id: str, amount: Decimal, key: str) -> GatewayRefund:
        charge_key = self._redis.get(_key("charge_id", charge_id))
        raw_charge = self._redis.get(_key("charge", charge_key)) if charge_key else None
        charge, lands_at = _stored_from_json(raw_charge) if raw_charge else (None, 0.0)
        if charge is None or lands_at > now:
            # A capture still in progress has no id anyone was told.
            raise UnknownGatewayCharge(charge_id)

        refund_key = _key("refund", key)
        refunded_key = _key("refunded", charge_id)
        refunds_key = _key("refunds", charge_id)
        # Optimistic transaction: the refunded total and the refund are written
        # together, and only if neither changed since they were read, so
        # concurrent refunds can never add up to more than the charge.
        with self._redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(refund_key, refunded_key)
                    # One read of both: two GETs could see another refund's
                    # total without its key, and refuse a repeat of that refund.
                    existing, total = pipe.mget(refund_key, refunded_key)
                    if existing is not None:
                        return _refund_from_json(existing)
                    refunded = Decimal(total or "0")
                    if refunded + amount > charge.amount:
                        raise RefundExceedsCharge(charge_id, amount, charge.amount - refunded)
                    refund = GatewayRefund(
                        id=f"re_fake_{uuid.uuid4().hex}",
                        charge_id=charge_id,
                        amount=amount,
                        currency=charge.currency,
                        idempotency_key=key,
                    )
                    pipe.multi()
                    pipe.set(refunded_key, str(refunded + amount), ex=TTL_S)
                    pipe.set(refund_key, _refund_to_json(refund), ex=TTL_S)
                    pipe.rpush(refunds_key, key)
                    pipe.expire(refunds_key, TTL_S)
                    pipe.execute()
                    return refund
                except redis.WatchError:
                    continue

    # --- the clock and the window ----------------------------------------------------
    def _now(self) -> float:
        return _seconds(self._redis.time())

    def _clock_and_window(self) -> tuple[float, str | None]:
        """Redis's time now, and the brown-out phase it falls in (None: no window)."""
        with self._redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.hmget(_WINDOW_KEY, ["lost_until", "unavailable_until"])
            clock, (lost_until, unavailable_until) = pipe.execute()
        now = _seconds(clock)
        if lost_until is not None and now < float(lost_until):
            return now, _LOST
        if unavailable_until is not None and now < float(unavailable_until):
            return now, _REFUSED
        return now, None


def _key(kind: str, name: str) -> str:
    return f"{KEY_PREFIX}{kind}:{name}"


def _seconds(clock: tuple[int, int]) -> float:
    seconds, microseconds = clock
    return seconds + microseconds / 1_000_000


def _late_capture_s() -> float:
    value = settings.PAYMENTS_FAKE_LATE_CAPTURE_S
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise ImproperlyConfigured(
            f"PAYMENTS_FAKE_LATE_CAPTURE_S={value!r}: give a number of seconds, 0 or more."
        )
    return float(value)


def _still_failing(match: re.Match[str], attempt: int) -> bool:
    failures = match.group(1)
    return failures is None or attempt <= int(failures)


def _check_amount(amount: Decimal) -> None:
    if not isinstance(amount, Decimal) or not amount.is_finite() or amount <= 0:
        raise InvalidAmount(amount, "the gateway takes a positive Decimal")


def _charge_to_json(charge: GatewayCharge, *, lands_at: float | None) -> str:
    data = {
        "id": charge.id,
        "amount": str(charge.amount),
        "currency": charge.currency,
        "idempotency_key": charge.idempotency_key,
        "reference": charge.reference,
    }
    if lands_at is not None:
        data["lands_at"] = lands_at
    return json.dumps(data)


def _stored_from_json(raw: str) -> tuple[GatewayCharge | None, float]:
    """What a key's charge slot holds and when it lands (0: landed when captured).

    A void's tombstone holds no charge.
    """
    data = json.loads(raw)
    if data.get("voided"):
        return None, 0.0
    charge = GatewayCharge(
        id=data["id"],
        amount=Decimal(data["amount"]),
        currency=data["currency"],
        idempotency_key=data["idempotency_key"],
        reference=data.get("reference", ""),
    )
    # Only a late capture lands after it was made: comparing the capture's own
    # time with a reader's clock would hide a charge from a reader that raced it.
    return charge, float(data.get("lands_at", 0.0))


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
