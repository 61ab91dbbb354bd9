"""The trip booking saga's plug-in for ``manage.py chaos`` and ``manage.py bench``.

What is specific to trips: the stock and the customer a run books with, how
a trip saga starts (through ``booking_create``, as the API does), the domain
invariants (stock and money), the bare-chain baseline with the same domain
writes (``bare``), and removing all of it when the run ends. The engine's
harness (``sagas.chaos``, ``sagas.bench``) does everything else.
"""

from __future__ import annotations

from collections import Counter
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction

from bookings.harness import bare
from bookings.harness.invariants import check_trips
from bookings.models import Booking
from bookings.services import (
    BOOKING_CANCELLATION,
    TRIP_BOOKING,
    LineRequest,
    PaymentRequest,
    booking_create,
    bookings_purge,
)
from inventory import services as inventory_services
from payments import services as payment_services
from sagas.harness.plugin import BareStep, InvariantResult, SagaHarness, chunks, unpublished_saga

# One item of each kind per stock line: (SKU code, kind, name, price).
KINDS = [
    ("FL", "flight_seat", "flight", Decimal("200.00")),
    ("HT", "hotel_room", "hotel", Decimal("120.00")),
    ("CR", "car", "car", Decimal("40.00")),
]
# The bench spreads its trips over several items per kind: bookings of one hot
# item would queue on its row lock and measure that contention instead of the
# saga engine. A chaos run books one item per kind, so stock runs out when asked.
ITEMS_PER_KIND = {"bench": 8, "chaos": 1}
BENCH_CAPACITY = 1_000_000
CARD_TOKEN = "tok_ok"  # noqa: S105 - the fake gateway's card that always pays


class TripHarness(SagaHarness):
    worker_includes = ("bookings.harness.bare",)
    # No follows_broker: the fake gateway keeps its books on the broker's Redis
    # server one database further, so it follows REDIS_URL by itself.
    seed_mix = {TRIP_BOOKING: 0.85, BOOKING_CANCELLATION: 0.15}

    def __init__(self, definition, *, purpose: str, run_id: str) -> None:
        super().__init__(definition, purpose=purpose, run_id=run_id)
        self.skus: list[list[str]] = []  # per stock line, one SKU of each kind
        self.booking_ids: list[str] = []
        self.user = None
        self.user_created = False
        self.currency = settings.PAYMENTS_CURRENCIES[0]
        self.total = sum((price for *_rest, price in KINDS), Decimal("0"))

    # --- stock and customer ----------------------------------------------------
    @transaction.atomic
    def prepare(self, *, sagas: int, capacity: int | None = None) -> None:
        prefix = f"{self.purpose.upper()}-{self.run_id}"
        lines = ITEMS_PER_KIND.get(self.purpose, 1)
        if capacity is None:
            capacity = BENCH_CAPACITY if self.purpose == "bench" else sagas
        for n in range(lines):
            suffix = f"-{n:02d}" if lines > 1 else ""
            line = []
            for code, kind, name, price in KINDS:
                item = inventory_services.item_create(
                    sku=f"{prefix}-{code}{suffix}",
                    kind=kind,
                    name=f"{self.purpose.title()} {name} {self.run_id}{suffix}",
                    capacity=capacity,
                    price=price,
                    currency=self.currency,
                )
                line.append(item.sku)
            self.skus.append(line)
        username = self.purpose
        self.user, self.user_created = get_user_model().objects.get_or_create(
            username=username, defaults={"email": f"{username}@example.com"}
        )
        if self.user_created:
            self.user.set_unusable_password()
            self.user.save(update_fields=["password"])

    @property
    def all_skus(self) -> list[str]:
        return [sku for line in self.skus for sku in line]

    def booking_request(self, index: int) -> dict[str, Any]:
        """``booking_create``'s arguments for the run's ``index``-th trip."""
        line = self.skus[index % len(self.skus)]
        return {
            "user": self.user,
            "customer_name": f"{self.purpose.title()} {self.run_id} #{index + 1}",
            "customer_email": f"{self.purpose}@example.com",
            "lines": [LineRequest(sku=sku, quantity=1) for sku in line],
            "payment": PaymentRequest(self.total, self.currency, CARD_TOKEN),
        }

    # --- sagas -----------------------------------------------------------------
    def start(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        booking = booking_create(**self.booking_request(index), chaos=chaos or None)
        self.booking_ids.append(str(booking.id))
        return str(booking.saga_id)

    def start_unpublished(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        with transaction.atomic():
            booking = bare.booking_rows(**self.booking_request(index))
            self.booking_ids.append(str(booking.id))
            context: dict[str, Any] = {"booking_id": str(booking.id), "card_token": CARD_TOKEN}
            if chaos:
                context["chaos"] = chaos
            saga = unpublished_saga(
                definition=self.definition,
                business_key=f"booking:{booking.id}",
                context=context,
                owner=self.user,
            )
            booking.saga_id = saga.id
            booking.save(update_fields=["saga_id"])
        return str(saga.id)

    def invariants(self, saga_ids: list[str]) -> list[InvariantResult]:
        return check_trips(saga_ids=saga_ids, skus=self.all_skus)

    # --- the bare chain ----------------------------------------------------------
    def bare_task_names(self) -> list[str]:
        return bare.TASK_NAMES

    def bare_start(self, index: int, *, last_task_id: str) -> float:
        booking = bare.bare_booking_create(**self.booking_request(index), last_task_id=last_task_id)
        self.booking_ids.append(str(booking.id))
        return booking.created_at.timestamp()

    def bare_steps(self, index: int) -> list[BareStep]:
        booking = bare.booking_rows(**self.booking_request(index))
        self.booking_ids.append(str(booking.id))
        booking_id = str(booking.id)
        return [
            (name, lambda run=bare.RUNS[name]: run(booking_id=booking_id, card_token=CARD_TOKEN))
            for name, _queue, _timeout in bare.STEPS
        ]

    # --- cleaning up -------------------------------------------------------------
    @transaction.atomic  # all or nothing: never a booking left without its charge
    def cleanup(self) -> dict[str, int]:
        counts: Counter = Counter()
        for ids in chunks(self.booking_ids):
            counts.update(payment_services.charges_purge(references=[f"booking:{i}" for i in ids]))
            counts["bookings"] += bookings_purge(booking_ids=ids)
        counts.update(inventory_services.items_purge(skus=self.all_skus))
        if (
            self.user_created
            and self.user is not None
            and not Booking.objects.filter(user=self.user).exists()
        ):
            self.user.delete()
        self.booking_ids.clear()
        return dict(counts)
