import math

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.exceptions import ImproperlyConfigured

from sagas.definitions import registry
from sagas.retention import RetentionSettings


@register(Tags.compatibility)
def check_broker_configured(app_configs, **kwargs):
    """Celery silently defaults to amqp://localhost; a saga published there never runs."""
    if getattr(settings, "CELERY_BROKER_URL", ""):
        return []
    return [
        Error(
            "No Celery broker is configured.",
            hint="Set REDIS_URL (e.g. redis://127.0.0.1:6379/0), or start the stack "
            "with `make run`.",
            id="sagas.E001",
        )
    ]


@register(Tags.compatibility)
def check_visibility_timeout(app_configs, **kwargs):
    """A message unacknowledged past the visibility timeout is delivered again.

    Live workers renew their lease on what they hold every
    ``SAGA_LEASE_RENEW_S`` (sagas.leases), so the timeout has to outlast a
    few renewals, not the longest task or countdown.
    """
    renew = getattr(settings, "SAGA_LEASE_RENEW_S", 0) or 0
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    visibility = options.get("visibility_timeout", 3600)
    if renew > 0 and visibility >= 3 * renew:
        return []
    return [
        Error(
            f"visibility_timeout ({visibility}s) must be at least three lease renewals "
            f"(SAGA_LEASE_RENEW_S={renew}s).",
            hint="Otherwise Redis hands out messages that a live worker still holds: raise "
            "CELERY_VISIBILITY_TIMEOUT or renew leases more often.",
            id="sagas.E002",
        )
    ]


@register(Tags.compatibility)
def check_saga_deadlines(app_configs, **kwargs):
    """A deadline shorter than the steps' worst case compensates sagas that were only retrying."""
    errors = []
    for definition in registry.all():
        for phase, deadline in (
            ("action", definition.deadline_s),
            ("compensation", definition.compensation_deadline_s),
        ):
            worst = definition.worst_case_s(phase)
            if deadline >= worst:
                continue
            name = "deadline_s" if phase == "action" else "compensation_deadline_s"
            errors.append(
                Error(
                    f"saga type {definition.name!r}: {name}={deadline}s is shorter than its "
                    f"{phase}s' worst case ({worst:.0f}s: every attempt at its hard time "
                    "limit plus every backoff).",
                    hint=f"Raise {name} to at least {math.ceil(worst)}s, or leave it out to "
                    "get the worst case plus SAGA_STALL_GRACE_S.",
                    obj=definition.name,
                    id="sagas.E003",
                )
            )
    return errors


# What a production database session must bound (config.settings.base.postgres_session_options).
SESSION_BOUNDS = (
    "lock_timeout",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
)


@register(Tags.database, deploy=True)
def check_database_waits_bounded(app_configs, **kwargs):
    """In production every PostgreSQL wait is bounded: timeouts set, keepalives on."""
    missing = unbounded_waits(settings.DATABASES.get("default", {}))
    if not missing:
        return []
    return [
        Error(
            f"database sessions wait without bound: {', '.join(missing)} not set (or 0).",
            hint="Set DB_LOCK_TIMEOUT_MS, DB_STATEMENT_TIMEOUT_MS and "
            "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS above 0 (README, 'Liveness'); "
            "a frozen host would otherwise hold its row locks for hours.",
            id="sagas.E004",
        )
    ]


def unbounded_waits(database: dict) -> list[str]:
    """What a PostgreSQL database's settings leave unbounded (nothing for another engine)."""
    if not database.get("ENGINE", "").startswith("django.db.backends.postgresql"):
        return []
    options = database.get("OPTIONS", {}) or {}
    server = options.get("options", "")
    missing = [name for name in SESSION_BOUNDS if not _bounded(server, name)]
    if not options.get("keepalives"):
        missing.append("keepalives")
    return missing


def _bounded(server_options: str, name: str) -> bool:
    for part in server_options.split():
        if part.startswith(f"{name}="):
            return part.split("=", 1)[1] not in ("0", "")
    return False


@register(Tags.compatibility)
def check_retention_settings(app_configs, **kwargs):
    """Retention reads its settings when it runs; a bad one is reported at start-up instead.

    A retention run may outlast the visibility timeout: the worker running it
    renews its lease (sagas.leases), so it is not delivered twice.
    """
    try:
        RetentionSettings.load()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint="See README, Retention.", id="sagas.E005")]
    return []
