from __future__ import annotations

import uuid

import pytest
from django.conf import settings


@pytest.fixture
def redis_url() -> str:
    if not settings.REDIS_URL:
        pytest.skip("REDIS_URL is not set: the fake gateway keeps its state in Redis")
    return settings.REDIS_URL


@pytest.fixture
def key():
    """Unique idempotency keys, so runs against a shared Redis never collide."""

    def make(label: str = "charge") -> str:
        return f"test:{label}:{uuid.uuid4().hex}"

    return make
