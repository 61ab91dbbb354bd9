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
from sagas.bench.sqlcount import TRANSACTION, counting

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


# --- batched holds: one thing per statement ------------------------------------------


def statements(counter) -> list[str]:
    """What the database was asked, BEGIN and COMMIT left out (they are the transaction)."""
    return [" ".join(sql.split()) for kind, sql in counter.statements if kind != TRANSACTION]


def test_hold_place_in_the_callers_transaction_inserts_and_takes_the_units_without_a_savepoint(
    make_item,
):
    item = make_item(capacity=5)

    with transaction.atomic(), counting() as counter:
        services.hold_place(sku=item.sku, quantity=2, reference="line:1")

    sql = statements(counter)
    assert len(sql) == 2, sql
    assert sql[0].startswith('INSERT INTO "inventory_hold"'), sql
    assert "ON CONFLICT (reference) DO NOTHING RETURNING" in sql[0], sql
    assert sql[1].startswith('UPDATE "inventory_item"'), sql
    assert counts(item) == (3, 2, 0)


def test_holds_place_places_every_request_and_returns_the_holds_in_request_order(make_item):
    flight, car = make_item(capacity=5), make_item(kind="car", capacity=3)
    requests = [
        services.HoldRequest(sku=car.sku, quantity=1, reference="line:b"),
        services.HoldRequest(sku=flight.sku, quantity=2, reference="line:a"),
        services.HoldRequest(sku=flight.sku, quantity=1, reference="line:c"),
    ]

    with transaction.atomic(), counting() as counter:
        holds = services.holds_place(requests=requests)

    assert [hold.reference for hold in holds] == ["line:b", "line:a", "line:c"]
    assert [hold.item_id for hold in holds] == [car.pk, flight.pk, flight.pk]
    assert all(hold.status == Hold.Status.HELD and hold.pk for hold in holds)
    # One INSERT per request, one UPDATE per item: nothing read, no savepoint.
    assert len(statements(counter)) == 5, statements(counter)
    assert counts(flight) == (2, 3, 0)
    assert counts(car) == (2, 1, 0)


def test_holds_place_again_returns_the_existing_holds_and_moves_no_counter(make_item):
    item = make_item(capacity=5)
    request = services.HoldRequest(sku=item.sku, quantity=2, reference="line:1")
    first = services.holds_place(requests=[request])

    again = services.holds_place(requests=[request, request])

    assert [hold.pk for hold in again] == [first[0].pk] * 2
    assert counts(item) == (3, 2, 0)


def test_holds_place_out_of_stock_leaves_nothing_behind_for_a_caller_that_catches_it(make_item):
    plenty = make_item(sku="FL-PLENTY", capacity=5)
    scarce = make_item(sku="FL-SCARCE", capacity=1)
    requests = [
        services.HoldRequest(sku=plenty.sku, quantity=2, reference="line:1"),
        services.HoldRequest(sku=scarce.sku, quantity=2, reference="line:2"),
    ]

    with transaction.atomic():
        with pytest.raises(OutOfStock) as exc:
            services.holds_place(requests=requests)
        # The caller goes on in the same transaction and commits.
        services.hold_place(sku=plenty.sku, quantity=1, reference="line:3")

    assert str(exc.value) == "Not enough stock for 'FL-SCARCE': requested 2, available 1."
    assert counts(plenty) == (4, 1, 0)
    assert counts(scarce) == (1, 0, 0)
    assert list(Hold.objects.values_list("reference", flat=True)) == ["line:3"]


def test_holds_place_with_an_unknown_sku_leaves_no_hold_behind(make_item):
    item = make_item(capacity=5)
    requests = [
        services.HoldRequest(sku=item.sku, quantity=1, reference="line:1"),
        services.HoldRequest(sku="NOPE", quantity=1, reference="line:2"),
    ]

    with transaction.atomic():
        with pytest.raises(UnknownItem) as exc:
            services.holds_place(requests=requests)
        assert not Hold.objects.exists()

    assert exc.value.sku == "NOPE"
    assert counts(item) == (5, 0, 0)


def test_holds_confirm_moves_the_holds_in_one_update_and_each_item_in_one(make_item):
    items = [make_item(capacity=5), make_item(kind="hotel_room"), make_item(kind="car")]
    for n, item in enumerate(items):
        services.hold_place(sku=item.sku, quantity=n + 1, reference=f"line:{n}")
    references = ["line:2", "line:0", "line:1"]

    with transaction.atomic(), counting() as counter:
        holds = services.holds_confirm(references=references)

    sql = statements(counter)
    assert len(sql) == 4, sql
    assert sql[0].startswith('UPDATE "inventory_hold"'), sql
    assert "RETURNING" in sql[0], sql
    assert all(statement.startswith('UPDATE "inventory_item"') for statement in sql[1:]), sql
    assert [hold.reference for hold in holds] == references
    assert {hold.status for hold in holds} == {Hold.Status.CONFIRMED}
    assert [counts(item) for item in items] == [(4, 0, 1), (3, 0, 2), (2, 0, 3)]


def test_holds_confirm_again_returns_the_confirmed_holds_and_sells_nothing_twice(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_place(sku=item.sku, quantity=1, reference="line:2")
    services.holds_confirm(references=["line:1"])

    holds = services.holds_confirm(references=["line:1", "line:2"])

    assert [(hold.reference, hold.status) for hold in holds] == [
        ("line:1", Hold.Status.CONFIRMED),
        ("line:2", Hold.Status.CONFIRMED),
    ]
    assert counts(item) == (2, 0, 3)


def test_holds_confirm_with_a_released_hold_moves_none_of_them(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=1, reference="line:1")
    services.hold_place(sku=item.sku, quantity=1, reference="line:2")
    services.hold_release(reference="line:2")

    with transaction.atomic():
        with pytest.raises(InvalidHoldState) as exc:
            services.holds_confirm(references=["line:1", "line:2"])
        # The caller's transaction is still usable, and nothing moved.
        statuses = dict(Hold.objects.values_list("reference", "status"))

    assert str(exc.value) == "Hold 'line:2' is RELEASED; it cannot be confirmed."
    assert statuses == {"line:1": Hold.Status.HELD, "line:2": Hold.Status.RELEASED}
    assert counts(item) == (4, 1, 0)


def test_holds_confirm_of_a_missing_hold_moves_none_of_them(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=1, reference="line:1")

    with pytest.raises(HoldNotFound):
        services.holds_confirm(references=["line:1", "line:404"])

    assert Hold.objects.get().status == Hold.Status.HELD
    assert counts(item) == (4, 1, 0)


def test_holds_release_gives_back_held_and_sold_units_and_a_second_release_nothing(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=1, reference="line:1")
    services.hold_place(sku=item.sku, quantity=2, reference="line:2")
    services.hold_confirm(reference="line:2")

    released = services.holds_release(references=["line:2", "line:1", "line:404"])
    again = services.holds_release(references=["line:1", "line:2"])

    assert [hold.reference for hold in released] == ["line:2", "line:1"]
    assert {hold.status for hold in released} == {Hold.Status.RELEASED}
    assert again == []
    assert counts(item) == (5, 0, 0)


@pytest.mark.parametrize(("first", "updates"), [(Hold.Status.CONFIRMED, 1), (Hold.Status.HELD, 2)])
def test_holds_release_tries_the_state_it_is_told_first(make_item, first, updates):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_confirm(reference="line:1")

    with transaction.atomic(), counting() as counter:
        released = services.holds_release(references=["line:1"], first=first)

    sql = statements(counter)
    assert [statement.split(" SET")[0] for statement in sql] == [
        'UPDATE "inventory_hold"'
    ] * updates + ['UPDATE "inventory_item"'], sql
    assert [hold.reference for hold in released] == ["line:1"]
    assert counts(item) == (5, 0, 0)


def test_holds_release_refuses_to_try_a_state_a_hold_cannot_be_released_from():
    with pytest.raises(ValueError, match="first must be HELD or CONFIRMED, not 'RELEASED'"):
        services.holds_release(references=["line:1"], first=Hold.Status.RELEASED)


def test_holds_reinstate_out_of_stock_leaves_every_hold_released(make_item):
    roomy, tight = make_item(capacity=5), make_item(kind="car", sku="CR-TIGHT", capacity=2)
    services.hold_place(sku=roomy.sku, quantity=1, reference="line:1")
    services.hold_place(sku=tight.sku, quantity=2, reference="line:2")
    services.holds_confirm(references=["line:1", "line:2"])
    services.holds_release(references=["line:1", "line:2"])
    services.hold_place(sku=tight.sku, quantity=1, reference="line:3")

    with transaction.atomic():
        with pytest.raises(OutOfStock) as exc:
            services.holds_reinstate(references=["line:1", "line:2"])
        statuses = dict(Hold.objects.values_list("reference", "status"))

    assert str(exc.value) == "Not enough stock for 'CR-TIGHT': requested 2, available 1."
    assert statuses["line:1"] == statuses["line:2"] == Hold.Status.RELEASED
    assert counts(roomy) == (5, 0, 0)
    assert counts(tight) == (1, 1, 0)


def test_holds_reinstate_returns_the_confirmed_holds_and_leaves_out_missing_ones(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    services.hold_confirm(reference="line:1")
    services.hold_release(reference="line:1")

    with transaction.atomic(), counting() as counter:
        holds = services.holds_reinstate(references=["line:1", "line:404"])
    again = services.holds_reinstate(references=["line:1"])

    # The hold and its item, then one read for the reference the UPDATE missed.
    assert len(statements(counter)) == 3, statements(counter)
    assert [hold.reference for hold in holds] == [hold.reference for hold in again] == ["line:1"]
    assert counts(item) == (3, 0, 2)


def test_an_error_that_is_not_the_domains_marks_the_callers_transaction_for_rollback(make_item):
    item = make_item(capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="line:1")
    # Counters that no longer cover the hold: the check constraint refuses the move.
    Item.objects.filter(pk=item.pk).update(held=0, available=5)

    with transaction.atomic():
        with pytest.raises(IntegrityError):
            services.hold_confirm(reference="line:1")
        assert transaction.get_rollback()

    assert Hold.objects.get().status == Hold.Status.HELD


def _race(target, runs: int) -> list[str]:
    """``target(n)`` in ``runs`` threads at once; each outcome, or the error it raised."""
    start = threading.Barrier(runs)
    outcomes: list[str] = []
    lock = threading.Lock()

    def run(n: int) -> None:
        try:
            start.wait()
            outcome = target(n)
        except Exception as exc:
            outcome = repr(exc)
        finally:
            connection.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(runs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def _needs_postgres():
    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL: SQLite serialises writers, so there is no race to test")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_batches_over_the_same_items_in_opposite_orders_never_deadlock(make_item):
    _needs_postgres()
    first, second = make_item(capacity=100), make_item(kind="car", capacity=100)

    def place(n: int) -> str:
        # Every batch names both items; half of them the other way round.
        pair = [first, second] if n % 2 else [second, first]
        for round_ in range(5):
            services.holds_place(
                requests=[
                    services.HoldRequest(sku=item.sku, quantity=1, reference=f"r{round_}:{n}:{k}")
                    for k, item in enumerate(pair)
                ]
            )
        return "held"

    outcomes = _race(place, 8)

    assert outcomes == ["held"] * 8
    assert counts(first) == counts(second) == (60, 40, 0)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_place_with_the_same_references_hold_once(make_item):
    _needs_postgres()
    item = make_item(capacity=10)
    requests = [
        services.HoldRequest(sku=item.sku, quantity=2, reference=f"line:{n}") for n in range(3)
    ]

    def place(n: int) -> str:
        holds = services.holds_place(requests=requests[n % 3 :] + requests[: n % 3])
        return ",".join(str(hold.pk) for hold in sorted(holds, key=lambda hold: hold.reference))

    outcomes = _race(place, 6)

    assert len(set(outcomes)) == 1, outcomes
    assert counts(item) == (4, 6, 0)
    assert Hold.objects.count() == 3


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_confirm_sell_each_hold_once(make_item):
    _needs_postgres()
    items = [make_item(capacity=5), make_item(kind="car", capacity=5)]
    references = [f"line:{n}" for n in range(4)]
    for n, reference in enumerate(references):
        services.hold_place(sku=items[n % 2].sku, quantity=1, reference=reference)

    def confirm(n: int) -> str:
        holds = services.holds_confirm(references=references[n:] + references[:n])
        return ",".join(sorted({hold.status for hold in holds}))

    outcomes = _race(confirm, 4)

    assert outcomes == [Hold.Status.CONFIRMED] * 4
    assert [counts(item) for item in items] == [(3, 0, 2), (3, 0, 2)]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_release_give_each_hold_back_once(make_item):
    _needs_postgres()
    items = [make_item(capacity=5), make_item(kind="car", capacity=5)]
    references = [f"line:{n}" for n in range(4)]
    for n, reference in enumerate(references):
        services.hold_place(sku=items[n % 2].sku, quantity=1, reference=reference)
    services.holds_confirm(references=references[:2])

    def release(n: int) -> str:
        return str(len(services.holds_release(references=references[n:] + references[:n])))

    outcomes = _race(release, 4)

    assert sum(int(outcome) for outcome in outcomes) == 4, outcomes
    assert [counts(item) for item in items] == [(5, 0, 0), (5, 0, 0)]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_reinstate_sell_each_hold_again_once(make_item):
    _needs_postgres()
    items = [make_item(capacity=5), make_item(kind="car", capacity=5)]
    references = [f"line:{n}" for n in range(4)]
    for n, reference in enumerate(references):
        services.hold_place(sku=items[n % 2].sku, quantity=1, reference=reference)
    services.holds_confirm(references=references)
    services.holds_release(references=references)

    def reinstate(n: int) -> str:
        holds = services.holds_reinstate(references=references[n:] + references[:n])
        return ",".join(sorted({hold.status for hold in holds}))

    outcomes = _race(reinstate, 4)

    assert outcomes == [Hold.Status.CONFIRMED] * 4
    assert [counts(item) for item in items] == [(3, 0, 2), (3, 0, 2)]
