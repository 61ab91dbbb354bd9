from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import F

from inventory import selectors, services
from inventory.models import Item

pytestmark = pytest.mark.django_db


def test_item_list_orders_by_kind_then_sku_and_filters_by_kind(make_item):
    make_item(sku="FL-2", kind="flight_seat")
    make_item(sku="CR-1", kind="car")
    make_item(sku="FL-1", kind="flight_seat")

    assert [i.sku for i in selectors.item_list()] == ["CR-1", "FL-1", "FL-2"]
    assert [i.sku for i in selectors.item_list(kind="flight_seat")] == ["FL-1", "FL-2"]


def test_items_by_sku_returns_frozen_infos_and_leaves_unknown_skus_out(make_item):
    make_item(sku="HT-1", kind="hotel_room", name="Harbour", capacity=4, price=Decimal("80.50"))
    services.hold_place(sku="HT-1", quantity=1, reference="line:1")

    infos = selectors.items_by_sku(skus=["HT-1", "NOPE"])

    assert list(infos) == ["HT-1"]
    info = infos["HT-1"]
    assert (info.kind, info.name, info.currency, info.available) == (
        "hotel_room",
        "Harbour",
        "EUR",
        3,
    )
    assert info.price == Decimal("80.50")
    assert isinstance(info.price, Decimal)
    with pytest.raises(AttributeError):
        info.available = 99  # type: ignore[misc]


def test_holds_by_reference_names_the_sku_quantity_and_status(make_item):
    make_item(sku="FL-1")
    services.hold_place(sku="FL-1", quantity=2, reference="line:1")
    services.hold_place(sku="FL-1", quantity=1, reference="line:2")
    services.hold_confirm(reference="line:2")

    holds = selectors.holds_by_reference(references=["line:1", "line:2", "line:404"])

    assert set(holds) == {"line:1", "line:2"}
    assert (holds["line:1"].sku, holds["line:1"].quantity, holds["line:1"].status) == (
        "FL-1",
        2,
        "HELD",
    )
    assert holds["line:2"].status == "CONFIRMED"


def test_items_with_broken_counts_is_empty_after_a_round_of_holds(make_item):
    make_item(sku="FL-1", capacity=3)
    services.hold_place(sku="FL-1", quantity=2, reference="line:1")
    services.hold_confirm(reference="line:1")
    services.hold_place(sku="FL-1", quantity=1, reference="line:2")
    services.hold_release(reference="line:1")

    assert selectors.items_with_broken_counts() == []


def test_items_with_broken_counts_lists_an_item_whose_counts_miss_capacity(make_item):
    make_item(sku="FL-OK")
    broken = make_item(sku="FL-BAD")
    # The constraint forbids broken counts; lift it inside the test's
    # transaction to see that the invariant check would notice them.
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                "ALTER TABLE inventory_item DROP CONSTRAINT inventory_item_counts_sum_to_capacity"
            )
        else:
            cursor.execute("PRAGMA ignore_check_constraints = ON")
    try:
        Item.objects.filter(pk=broken.pk).update(capacity=F("capacity") + 1)
    finally:
        if connection.vendor != "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("PRAGMA ignore_check_constraints = OFF")

    assert selectors.items_with_broken_counts() == ["FL-BAD"]
