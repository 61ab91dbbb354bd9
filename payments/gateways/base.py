"""The interface every payment gateway adapter implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class GatewayCharge:
    id: str
    amount: Decimal
    currency: str
    idempotency_key: str
    # The caller's label (e.g. "booking:42"), kept as gateway metadata so a
    # charge recovered through lookup_charge can be filed where it belongs.
    reference: str = ""


@dataclass(frozen=True)
class GatewayRefund:
    id: str
    charge_id: str
    amount: Decimal
    currency: str
    idempotency_key: str


class Gateway(abc.ABC):
    """A payment gateway, as seen by ``payments.services``.

    Every call that moves money carries an idempotency key: repeating a call
    with the same key must return the first call's result and never move money
    twice. Errors are the ``GatewayError`` subclasses of ``payments.errors``;
    ``GatewayError.retryable`` tells whether asking again can succeed.
    """

    @abc.abstractmethod
    def charge(
        self,
        *,
        amount: Decimal,
        currency: str,
        card_token: str,
        idempotency_key: str,
        reference: str = "",
    ) -> GatewayCharge:
        """Capture ``amount`` from the card behind ``card_token``.

        ``reference`` is stored with the charge and returned by ``lookup_charge``.
        """

    @abc.abstractmethod
    def refund(self, *, charge_id: str, amount: Decimal, idempotency_key: str) -> GatewayRefund:
        """Give back ``amount`` of a charge; the refunds of a charge never exceed it.

        A repeated ``idempotency_key`` returns the first refund made with it.
        """

    @abc.abstractmethod
    def lookup_charge(self, *, idempotency_key: str) -> GatewayCharge | None:
        """The charge made with ``idempotency_key``, or None if the gateway has none.

        This is how a charge whose answer was lost in a timeout is found again.
        Only a captured (landed) charge is returned: one the gateway is still
        processing is not visible yet, so None does not prove that the key will
        never charge; ``void`` does.
        """

    @abc.abstractmethod
    def void(self, *, idempotency_key: str) -> GatewayCharge | None:
        """Settle a charge whose outcome is uncertain (its answer was lost).

        If a charge with ``idempotency_key`` was captured, it is returned and
        stays captured: the caller refunds it. Otherwise the gateway guarantees
        that no charge with this key will ever be captured: every later
        ``charge`` with the key raises ``ChargeVoided`` and charges nothing, and
        None is returned. While a capture for the key is still being processed
        the outcome cannot be settled yet: ``GatewayChargePending`` (retryable)
        is raised, and a later call returns the charge once it has landed.
        Idempotent: voiding a key again gives the same answer.

        A real adapter maps this to cancelling what it created for the key
        (e.g. cancelling a payment intent, which fails once it has succeeded).
        """

    @abc.abstractmethod
    def charges(self, *, reference: str) -> list[GatewayCharge]:
        """Every captured charge whose ``reference`` is ``reference``, oldest first.

        Captures the gateway is still processing are not listed. This is how
        charges made under a label are audited, whatever their keys were.
        """

    @abc.abstractmethod
    def refunds(self, *, charge_id: str) -> list[GatewayRefund]:
        """Every refund of the charge ``charge_id``, oldest first (empty if none)."""

    @abc.abstractmethod
    def lookup_refund(self, *, idempotency_key: str) -> GatewayRefund | None:
        """The refund made with ``idempotency_key``, or None if the gateway has none.

        This is how a refund whose answer was lost in a timeout is found again.
        """
