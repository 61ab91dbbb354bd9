"""Reads of inventory. Other contexts receive the frozen dataclasses, not models."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db.models import F, Q, QuerySet

from inventory.models import Hold, Item


@dataclass(frozen=True)
class ItemInfo:
    sku: str
    kind: str
    name: str
    price: Decimal
    currency: str
    available: int


@dataclass(frozen=True)
class HoldInfo:
    reference: str
    sku: str
    quantity: int
    status: str


def item_list(*, kind: str | None = None) -> QuerySet[Item]:
    items = Item.objects.all()
    if kind is not None:
        items = items.filter(kind=kind)
    return items.order_by("kind", "sku")


def items_by_sku(*, skus: list[str]) -> dict[str, ItemInfo]:
    """The items among ``skus``, keyed by SKU; unknown SKUs are left out."""
    rows = Item.objects.filter(sku__in=skus).values(
        "sku", "kind", "name", "price", "currency", "available"
    )
    return {row["sku"]: ItemInfo(**row) for row in rows}


def holds_by_reference(*, references: list[str]) -> dict[str, HoldInfo]:
    """The holds among ``references``, keyed by reference; unknown ones are left out."""
    rows = Hold.objects.filter(reference__in=references).values(
        "reference", "quantity", "status", sku=F("item__sku")
    )
    return {row["reference"]: HoldInfo(**row) for row in rows}


def items_with_broken_counts() -> list[str]:
    """SKUs whose counters do not add up to capacity or went negative.

    The database constraints forbid both, so anything listed here means a
    constraint was dropped or bypassed: an invariant check, not a business read.
    """
    broken = Item.objects.annotate(counted=F("available") + F("held") + F("sold")).filter(
        ~Q(counted=F("capacity")) | Q(available__lt=0) | Q(held__lt=0) | Q(sold__lt=0)
    )
    return list(broken.order_by("sku").values_list("sku", flat=True))
