"""Payment gateway adapters, chosen by ``settings.PAYMENTS_GATEWAY``.

Shaped like ``django.contrib.sessions.backends``: ``base.Gateway`` is the
interface, ``fake.FakeGateway`` the default implementation.
"""

from __future__ import annotations

import threading

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver
from django.utils.module_loading import import_string

from payments.gateways.base import Gateway, GatewayCharge, GatewayRefund

__all__ = ["Gateway", "GatewayCharge", "GatewayRefund", "get_gateway"]

_lock = threading.Lock()
_instances: dict[str, Gateway] = {}

# Settings a gateway instance reads when it is built (the fake's books follow
# REDIS_URL unless PAYMENTS_FAKE_GATEWAY_URL is set). Others, such as
# PAYMENTS_FAKE_LATE_CAPTURE_S, are read on every call.
_GATEWAY_SETTINGS = {"PAYMENTS_GATEWAY", "PAYMENTS_FAKE_GATEWAY_URL", "REDIS_URL"}


def get_gateway() -> Gateway:
    """The configured gateway; built once per process and reused (it holds connections)."""
    path = settings.PAYMENTS_GATEWAY
    gateway = _instances.get(path)
    if gateway is not None:
        return gateway
    with _lock:
        if path not in _instances:
            _instances[path] = _gateway_class(path)()
        return _instances[path]


def _gateway_class(path: str) -> type[Gateway]:
    try:
        cls = import_string(path)
    except ImportError as exc:
        raise ImproperlyConfigured(
            f"PAYMENTS_GATEWAY={path!r} cannot be imported ({exc}); "
            "name a Gateway class, e.g. 'payments.gateways.fake.FakeGateway'."
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, Gateway)):
        raise ImproperlyConfigured(
            f"PAYMENTS_GATEWAY={path!r} is not a subclass of payments.gateways.base.Gateway."
        )
    return cls


@receiver(setting_changed)
def _forget_gateways(*, setting: str, **kwargs) -> None:
    # override_settings in tests must not get an instance built from old settings.
    if setting in _GATEWAY_SETTINGS:
        with _lock:
            _instances.clear()
