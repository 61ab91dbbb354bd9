"""Settings read from the environment that more than one settings module checks the same way."""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from django.core.exceptions import ImproperlyConfigured


def http_url_from_env(name: str, environ: Mapping[str, str] = os.environ, *, example: str) -> str:
    """``name``: an http(s) URL with a host (and a numeric port, if any), without its trailing
    slash; "" when unset. Anything else stops the process with an error naming ``name``."""
    raw = environ.get(name, "").strip()
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ImproperlyConfigured(
            f"{name}={raw!r} is not an http(s) URL with a host, e.g. {example}"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} has a port that is not a number") from None
    return raw.rstrip("/")
