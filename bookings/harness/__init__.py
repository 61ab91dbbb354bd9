"""The trip booking saga's plug-in for ``manage.py chaos`` and ``manage.py bench``.

What is specific to trips: the stock and the customer a run books with, how
a trip saga starts (through ``booking_create``, as the API does), the domain
invariants (stock and money), the bare-chain baseline with the same domain
writes (``bare``), and removing all of it when the run ends. The engine's
harness (``sagas.chaos``, ``sagas.bench``) does everything else.
"""

from __future__ import annotations

import random
from collections import Counter
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Q

from bookings.harness import bare
from bookings.harness.invariants import check_trips
from bookings.models import Booking
from bookings.services import (
    BOOKING_CANCELLATION,
    TRIP_BOOKING,
    LineRequest,
    PaymentRequest,
    booking_cancel,
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
# The fake gateway's fault cards (payments/gateways/fake.py):
TIMEOUT_CARD = "tok_timeout_1"  # captured, its answer lost once, then answered
LATE_CARD = "tok_late"  # captured only after the timeout answer
# A booking is cancelled at most this often in a run (a second cancellation
# after a compensated first one is the path that once took money twice).
MAX_CANCELLATIONS = 2


class TripHarness(SagaHarness):
    worker_includes = ("bookings.harness.bare",)
    # No follows_broker: the fake gateway keeps its books on the broker's Redis
    # server one database further, so it follows REDIS_URL by itself.
    seed_mix = {TRIP_BOOKING: 0.85, BOOKING_CANCELLATION: 0.15}
    chaos_flags = (
        "--cancel-rate",
        "--gateway-timeout-rate",
        "--gateway-brownout",
        "--gateway-late-rate",
    )

    def __init__(self, definition, *, purpose: str, run_id: str) -> None:
        super().__init__(definition, purpose=purpose, run_id=run_id)
        self.skus: list[list[str]] = []  # per stock line, one SKU of each kind
        self.booking_ids: list[str] = []
        self.user = None
        self.user_created = False
        self.currency = settings.PAYMENTS_CURRENCIES[0]
        self.total = sum((price for *_rest, price in KINDS), Decimal("0"))
        self.seed = 0
        self.timeout_rate = self.late_rate = 0.0
        self.brownout_s = 0.0
        self.brownout_at_s: float | None = None
        self.cards: Counter = Counter()
        self.cancellations: Counter = Counter()  # booking id -> cancellations started

    # --- a chaos run's domain faults ---------------------------------------------
    def configure(self, options, *, seed: int) -> None:
        self.seed = seed
        self.timeout_rate = options.gateway_timeout_rate
        self.late_rate = options.gateway_late_rate
        self.brownout_s = options.gateway_brownout
        faults = self.timeout_rate or self.late_rate or self.brownout_s
        if faults and not payment_services.gateway_injects_faults():
            raise ValueError(
                "--gateway-timeout-rate, --gateway-late-rate and --gateway-brownout are "
                "faults of the fake gateway: set PAYMENTS_GATEWAY="
                "payments.gateways.fake.FakeGateway"
            )

    @property
    def follow_up_type(self) -> str:
        return BOOKING_CANCELLATION

    def card_for(self, index: int) -> str:
        """The ``index``-th trip's card: the same for one seed, whatever else the run does."""
        draw = random.Random(f"{self.seed}:card:{index}").random()
        if draw < self.timeout_rate:
            return TIMEOUT_CARD
        if draw < self.timeout_rate + self.late_rate:
            return LATE_CARD
        return CARD_TOKEN

    def follow_up(self, saga_id: str, *, chaos: dict[str, Any] | None) -> str | None:
        """Cancel the saga's booking if it is CONFIRMED (after its trip, or a compensated
        cancellation), at most MAX_CANCELLATIONS times per booking."""
        booking = Booking.objects.filter(Q(saga_id=saga_id) | Q(cancel_saga_id=saga_id)).first()
        if booking is None or booking.status != Booking.Status.CONFIRMED:
            return None
        if self.cancellations[booking.id] >= MAX_CANCELLATIONS:
            return None
        self.cancellations[booking.id] += 1
        return str(booking_cancel(booking_id=booking.id, chaos=chaos).cancel_saga_id)

    def tick(self, *, at_s: float, dispatched: int, total: int) -> list[str]:
        """Open the gateway brown-out once a third of the trips are out."""
        if not self.brownout_s or self.brownout_at_s is not None or dispatched < total // 3:
            return []
        half = self.brownout_s / 2
        payment_services.gateway_brownout(lost_s=half, unavailable_s=half)
        self.brownout_at_s = round(at_s, 2)
        return [
            f"gateway brown-out at {at_s:.1f}s: answers lost for {half:g}s, then 503 for {half:g}s"
        ]

    def domain_faults(self) -> dict[str, int]:
        return {
            "gateway_timeout": self.cards[TIMEOUT_CARD],
            "gateway_late": self.cards[LATE_CARD],
            "gateway_brownout": int(self.brownout_at_s is not None),
        }

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
            "payment": PaymentRequest(self.total, self.currency, self.card_for(index)),
        }

    # --- sagas -----------------------------------------------------------------
    def start(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        request = self.booking_request(index)
        booking = booking_create(**request, chaos=chaos or None)
        # Counted once submitted: a booking the run could not submit injected nothing.
        self.cards[request["payment"].card_token] += 1
        self.booking_ids.append(str(booking.id))
        return str(booking.saga_id)

    def start_unpublished(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        with transaction.atomic():
            booking, plan = bare.booking_rows(**self.booking_request(index))
            self.booking_ids.append(str(booking.id))
            context: dict[str, Any] = {**plan, "card_token": CARD_TOKEN}
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
        booking, plan = bare.booking_rows(**self.booking_request(index))
        self.booking_ids.append(str(booking.id))
        plan = {**plan, "card_token": CARD_TOKEN}
        return [
            (name, lambda run=bare.RUNS[name]: run(plan=plan))
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
