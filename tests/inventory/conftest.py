from __future__ import annotations

import itertools
from decimal import Decimal

import pytest

from inventory import services

_skus = itertools.count(1)


@pytest.fixture
def make_item():
    """Create an item through the service, so its counters start consistent."""

    def make(**overrides):
        values = {
            "sku": f"SKU-{next(_skus)}",
            "kind": "flight_seat",
            "name": "Test seat",
            "capacity": 5,
            "price": Decimal("100.00"),
            "currency": "EUR",
        }
        values.update(overrides)
        return services.item_create(**values)

    return make
