"""Payments' domain and gateway errors. ``code`` is stable and machine-readable.

Constructor arguments are kept in ``args`` so the errors survive pickling and
Celery's JSON result encoding, which rebuild an exception as ``cls(*args)``.
"""

from decimal import Decimal


class PaymentError(Exception):
    """Base of payments' errors."""

    code = "payment_error"

    @property
    def message(self) -> str:
        return str(self)


class InvalidAmount(PaymentError):
    code = "invalid_amount"

    def __init__(self, amount: object, reason: str) -> None:
        super().__init__(amount, reason)
        self.amount = amount
        self.reason = reason

    def __str__(self) -> str:
        return f"Invalid amount {self.amount!r}: {self.reason}."


class UnsupportedCurrency(PaymentError):
    code = "unsupported_currency"

    def __init__(self, currency: str, supported: list[str]) -> None:
        super().__init__(currency, supported)
        self.currency = currency
        self.supported = list(supported)

    def __str__(self) -> str:
        return (
            f"Currency {self.currency!r} is not supported; use one of {', '.join(self.supported)}."
        )


class GatewayError(PaymentError):
    """A payment gateway refused or failed a request.

    ``retryable`` tells the caller whether repeating the request with the same
    idempotency key can succeed.
    """

    code = "gateway_error"
    retryable = False


class CardDeclined(GatewayError):
    """Permanent: the card was refused and nothing was charged."""

    code = "card_declined"


class GatewayUnavailable(GatewayError):
    """Transient: the gateway did not take the request, so nothing happened."""

    code = "gateway_unavailable"
    retryable = True


class GatewayTimeout(GatewayError):
    """The request left and its answer was lost: the charge may or may not exist.

    Retrying with the same idempotency key is safe (the gateway never charges a
    key twice); if the caller gives up, the effect must still be compensated,
    which ``payments.services.charge_undo`` does by settling it with the gateway.
    """

    code = "gateway_timeout"
    retryable = True


class UnknownGatewayCharge(GatewayError):
    code = "unknown_gateway_charge"

    def __init__(self, charge_id: str) -> None:
        super().__init__(charge_id)
        self.charge_id = charge_id

    def __str__(self) -> str:
        return f"The gateway has no charge {self.charge_id!r}."


class RefundExceedsCharge(GatewayError):
    code = "refund_exceeds_charge"

    def __init__(self, charge_id: str, requested: Decimal, refundable: Decimal) -> None:
        super().__init__(charge_id, requested, refundable)
        self.charge_id = charge_id
        self.requested = requested
        self.refundable = refundable

    def __str__(self) -> str:
        return (
            f"Refund of {self.requested} on charge {self.charge_id!r} exceeds "
            f"the {self.refundable} still refundable."
        )


class ChargeVoided(GatewayError):
    """Permanent: the idempotency key was voided, so it never charges anything.

    ``Gateway.void`` settled the key while it had no charge; every later charge
    request with that key is refused with this error.
    """

    code = "charge_voided"

    def __init__(self, idempotency_key: str) -> None:
        super().__init__(idempotency_key)
        self.idempotency_key = idempotency_key

    def __str__(self) -> str:
        return (
            f"The charge with idempotency key {self.idempotency_key!r} was voided; "
            "nothing was charged."
        )


class GatewayChargePending(GatewayError):
    """Transient: a capture for the key is still being processed by the gateway.

    Its outcome is not known yet, so a void cannot settle it; asking again later
    with the same key finds the charge once it has landed.
    """

    code = "gateway_charge_pending"
    retryable = True

    def __init__(self, idempotency_key: str) -> None:
        super().__init__(idempotency_key)
        self.idempotency_key = idempotency_key

    def __str__(self) -> str:
        return (
            f"The capture for idempotency key {self.idempotency_key!r} is still being "
            "processed; try again."
        )


class GatewayFaultsUnsupported(PaymentError):
    """Asked to inject a fault the configured gateway cannot (only the fake one can)."""

    code = "gateway_faults_unsupported"

    def __init__(self, gateway: str) -> None:
        super().__init__(gateway)
        self.gateway = gateway

    def __str__(self) -> str:
        return (
            f"The {self.gateway} gateway injects no faults; set "
            "PAYMENTS_GATEWAY=payments.gateways.fake.FakeGateway."
        )
