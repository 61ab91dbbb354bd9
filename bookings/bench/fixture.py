"""The bench's own inventory and customer, created on first use and reused after."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction

from bookings.services import LineRequest, PaymentRequest
from inventory import selectors as inventory_selectors
from inventory import services as inventory

# Several items per kind, taken in turn: bookings of one hot item would queue
# on its row lock and measure that contention instead of the saga engine.
ITEMS_PER_KIND = 8
ITEM_CAPACITY = 1_000_000
KINDS = [
    # sku prefix, kind, price
    ("BENCH-FL", "flight_seat", Decimal("100.00")),
    ("BENCH-HT", "hotel_room", Decimal("80.00")),
    ("BENCH-CR", "car", Decimal("30.00")),
]
USERNAME = "bench"
CURRENCY = "EUR"
CARD_TOKEN = "tok_ok"  # noqa: S105 - the fake gateway's card that always pays


def _sku(prefix: str, n: int) -> str:
    return f"{prefix}-{n:02d}"


@dataclass(frozen=True)
class BenchFixture:
    user: Any
    total: Decimal

    def lines(self, index: int) -> list[LineRequest]:
        n = index % ITEMS_PER_KIND
        return [LineRequest(_sku(prefix, n), 1) for prefix, _kind, _price in KINDS]

    def booking_request(self, index: int) -> dict[str, Any]:
        """``booking_create``'s arguments for the bench's ``index``-th trip."""
        return {
            "user": self.user,
            "customer_name": "Bench Customer",
            "customer_email": "bench@example.com",
            "lines": self.lines(index),
            "payment": PaymentRequest(self.total, CURRENCY, CARD_TOKEN),
        }


class StockExhausted(Exception):
    pass


@transaction.atomic
def bench_fixture(*, trips: int) -> BenchFixture:
    """Items with room for ``trips`` more bookings, and the customer who makes them."""
    skus = []
    for prefix, kind, price in KINDS:
        for n in range(ITEMS_PER_KIND):
            sku = _sku(prefix, n)
            inventory.item_upsert(
                sku=sku,
                kind=kind,
                name=f"Bench {kind.replace('_', ' ')} {n}",
                capacity=ITEM_CAPACITY,
                price=price,
                currency=CURRENCY,
            )
            skus.append(sku)
    per_item = -(-trips // ITEMS_PER_KIND) + 1
    short = {
        sku: item.available
        for sku, item in inventory_selectors.items_by_sku(skus=skus).items()
        if item.available < per_item
    }
    if short:
        raise StockExhausted(
            f"the bench items have too little stock left for {trips} trips ({short}); "
            "run the bench on a fresh database"
        )
    user, _ = get_user_model().objects.get_or_create(
        username=USERNAME, defaults={"email": "bench@example.com"}
    )
    return BenchFixture(user=user, total=sum((price for _p, _k, price in KINDS), Decimal("0")))
