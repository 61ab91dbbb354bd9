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

    Every call carries an idempotency key: repeating a call with the same key
    must return the first call's result and never move money twice. Errors are
    the ``GatewayError`` subclasses of ``payments.errors``.
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
        """Give back ``amount`` of a charge; the refunds of a charge never exceed it."""

    @abc.abstractmethod
    def lookup_charge(self, *, idempotency_key: str) -> GatewayCharge | None:
        """The charge made with ``idempotency_key``, or None if the gateway has none.

        This is how a charge whose answer was lost in a timeout is found again.
        """
