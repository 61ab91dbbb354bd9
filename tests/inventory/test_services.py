from __future__ import annotations

import threading
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connection, transaction
from django.db.models import F

from inventory import services
from inventory.errors import (
    HoldNotFound,
    InvalidHoldState,
    InvalidQuantity,
    OutOfStock,
    UnknownItem,
)
from inventory.models import Hold, Item

pytestmark = pytest.mark.django_db


def counts(item: Item) -> tuple[int, int, int]:
    item.refresh_from_db()
    return item.available, item.held, item.sold


def test_item_create_makes_the_whole_capacity_available(make_item):
    item = make_item(sku="FL-1", capacity=7, price=Decimal("199.99"))

    assert counts(item) == (7, 0, 0)
    assert item.price == Decimal("199.99")
    assert item.kind == Item.Kind.FLIGHT_SEAT


def test_item_create_rejects_a_duplicate_sku_and_a_bad_currency(make_item):
    make_item(sku="FL-1")

    with pytest.raises(ValidationError) as duplicate:
        make_item(sku="FL-1")
    with pytest.raises(ValidationError) as currency:
        make_item(sku="FL-2", currency="euro")

    assert "sku" in duplicate.value.message_dict
    assert "currency" in currency.value.message_dict


def test_item_upsert_creates_once_and_then_leaves_the_item_as_it_is(make_item):
    args = {"sku": "HT-1", "kind": "hotel_room", "name": "Hotel", "currency": "EUR"}

    first, created = services.item_upsert(**args, capacity=3, price=Decimal("80.00"))
    again, created_again = services.item_upsert(**args, capacity=9, price=Decimal("1.00"))

    assert created is True
    assert created_again is False
    assert again.pk == first.pk
    assert (again.capacity, again.price) == (3, Decimal("80.00"))


def test_hold_place_moves_units_from_available_to_held(make_item):
    item = make_item(capacity=5)

    hold = services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    assert hold.status == Hold.Status.HELD
    assert hold.quantity == 2
    assert counts(item) == (3, 2, 0)


def test_hold_place_twice_with_one_reference_holds_once(make_item):
    item = make_item(capacity=5)

    first = services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    second = services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    assert second.pk == first.pk
    assert counts(item) == (3, 2, 0)
    assert Hold.objects.count() == 1


def test_hold_place_returns_an_existing_hold_unchanged_even_when_released(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_release(reference="line:1")

    again = services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    assert again.status == Hold.Status.RELEASED
    assert counts(item) == (5, 0, 0)


def test_hold_place_beyond_the_stock_raises_out_of_stock_and_changes_nothing(make_item):
    item = make_item(sku="FL-9", capacity=3)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    with pytest.raises(OutOfStock) as exc:
        services.hold_place(sku=item.sku, quantity=2, reference="line:2")

    assert exc.value.code == "out_of_stock"
    assert str(exc.value) == "Not enough stock for 'FL-9': requested 2, available 1."
    assert (exc.value.requested, exc.value.available) == (2, 1)
    assert counts(item) == (1, 2, 0)
    assert not Hold.objects.filter(reference="line:2").exists()


def test_hold_place_for_an_unknown_sku_raises_unknown_item():
    with pytest.raises(UnknownItem) as exc:
        services.hold_place(sku="NOPE", quantity=1, reference="line:1")

    assert exc.value.code == "unknown_item"
    assert "NOPE" in str(exc.value)


@pytest.mark.parametrize("quantity", [0, -1, True, 1.5])
def test_hold_place_rejects_a_quantity_that_is_not_a_positive_whole_number(make_item, quantity):
    item = make_item()

    with pytest.raises(InvalidQuantity) as exc:
        services.hold_place(sku=item.sku, quantity=quantity, reference="line:1")

    assert exc.value.code == "invalid_quantity"
    assert counts(item) == (5, 0, 0)


def test_hold_confirm_turns_held_units_into_sold_ones_once(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    hold = services.hold_confirm(reference="line:1")
    again = services.hold_confirm(reference="line:1")

    assert hold.status == again.status == Hold.Status.CONFIRMED
    assert counts(item) == (3, 0, 2)


def test_hold_confirm_of_a_missing_hold_raises_hold_not_found():
    with pytest.raises(HoldNotFound) as exc:
        services.hold_confirm(reference="line:404")

    assert exc.value.code == "hold_not_found"
    assert str(exc.value) == "No hold with reference 'line:404'."


def test_hold_confirm_of_a_released_hold_raises_invalid_hold_state(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_release(reference="line:1")

    with pytest.raises(InvalidHoldState) as exc:
        services.hold_confirm(reference="line:1")

    assert exc.value.code == "invalid_hold_state"
    assert str(exc.value) == "Hold 'line:1' is RELEASED; it cannot be confirmed."
    assert counts(item) == (5, 0, 0)


def test_hold_release_gives_held_units_back_and_a_second_release_returns_none(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    released = services.hold_release(reference="line:1")
    again = services.hold_release(reference="line:1")

    assert released is not None
    assert released.status == Hold.Status.RELEASED
    assert again is None
    assert counts(item) == (5, 0, 0)


def test_hold_release_gives_sold_units_back(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=3, reference="line:1")
    services.hold_confirm(reference="line:1")

    released = services.hold_release(reference="line:1")

    assert released is not None
    assert counts(item) == (5, 0, 0)


def test_hold_release_of_a_missing_hold_returns_none():
    assert services.hold_release(reference="line:404") is None


def test_hold_reinstate_sells_the_released_units_again(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_confirm(reference="line:1")
    services.hold_release(reference="line:1")

    hold = services.hold_reinstate(reference="line:1")
    again = services.hold_reinstate(reference="line:1")

    assert hold is not None
    assert hold.status == Hold.Status.CONFIRMED
    assert again is not None
    assert again.status == Hold.Status.CONFIRMED
    assert counts(item) == (3, 0, 2)


def test_hold_reinstate_raises_out_of_stock_when_the_units_were_sold_meanwhile(make_item):
    item = make_item(sku="CR-1", kind="car", capacity=2)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_release(reference="line:1")
    services.hold_place(sku=item.sku, quantity=1, reference="line:2")

    with pytest.raises(OutOfStock) as exc:
        services.hold_reinstate(reference="line:1")

    assert str(exc.value) == "Not enough stock for 'CR-1': requested 2, available 1."
    assert Hold.objects.get(reference="line:1").status == Hold.Status.RELEASED
    assert counts(item) == (1, 1, 0)


def test_hold_reinstate_of_a_missing_hold_returns_none():
    assert services.hold_reinstate(reference="line:404") is None


def test_hold_reinstate_of_a_held_hold_raises_invalid_hold_state(make_item):
    item = make_item()
    services.hold_place(sku=item.sku, quantity=1, reference="line:1")

    with pytest.raises(InvalidHoldState):
        services.hold_reinstate(reference="line:1")

    assert counts(item) == (4, 1, 0)


def test_the_database_rejects_a_negative_count(make_item):
    item = make_item(capacity=1)

    with pytest.raises(IntegrityError), transaction.atomic():
        Item.objects.filter(pk=item.pk).update(available=F("available") - 2, held=F("held") + 2)

    assert counts(item) == (1, 0, 0)


def test_the_database_rejects_counts_that_do_not_add_up_to_capacity(make_item):
    item = make_item(capacity=3)

    with pytest.raises(IntegrityError), transaction.atomic():
        Item.objects.filter(pk=item.pk).update(sold=F("sold") + 1)

    assert counts(item) == (3, 0, 0)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_eight_concurrent_holds_on_the_last_seat_sell_it_exactly_once(make_item):
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite serialises writers, so there is no race to test")
    item = make_item(sku="FL-LAST", capacity=1)
    start = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def place(n: int) -> None:
        try:
            start.wait()
            services.hold_place(sku=item.sku, quantity=1, reference=f"race:{n}")
            outcome = "held"
        except OutOfStock:
            outcome = "out_of_stock"
        except Exception as exc:  # any other error fails the assertion below
            outcome = repr(exc)
        finally:
            connection.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=place, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcomes) == ["held"] + ["out_of_stock"] * 7
    assert counts(item) == (0, 1, 0)
    assert Hold.objects.filter(item=item).count() == 1


def test_items_purge_deletes_the_items_and_their_holds_and_nothing_else(make_item):
    doomed, kept = make_item(), make_item()
    services.hold_place(sku=doomed.sku, quantity=1, reference="purge:1")
    services.hold_place(sku=kept.sku, quantity=1, reference="purge:2")

    counts = services.items_purge(skus=[doomed.sku])

    assert counts == {"holds": 1, "items": 1}
    assert not Item.objects.filter(sku=doomed.sku).exists()
    assert list(Hold.objects.values_list("reference", flat=True)) == ["purge:2"]
