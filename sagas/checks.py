from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.exceptions import ImproperlyConfigured

from sagas.retention import RetentionSettings, task_time_limits


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
    """A message unacknowledged past the visibility timeout is delivered again."""
    limit = getattr(settings, "CELERY_TASK_TIME_LIMIT", None) or 0
    countdown = getattr(settings, "SAGA_MAX_RETRY_DELAY_S", 0)
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    visibility = options.get("visibility_timeout", 3600)
    if visibility > limit + countdown:
        return []
    return [
        Error(
            f"visibility_timeout ({visibility}s) must exceed CELERY_TASK_TIME_LIMIT ({limit}s) "
            f"plus SAGA_MAX_RETRY_DELAY_S ({countdown}s).",
            hint="Otherwise Redis redelivers running tasks and retries: "
            "raise CELERY_VISIBILITY_TIMEOUT.",
            id="sagas.E002",
        )
    ]


@register(Tags.compatibility)
def check_retention_settings(app_configs, **kwargs):
    """Retention reads its settings when it runs; a bad one is reported at start-up instead."""
    try:
        config = RetentionSettings.load()
    except ImproperlyConfigured as exc:
        return [Error(str(exc), hint="See README, Retention.", id="sagas.E003")]
    # A retention run that outlives the visibility timeout is delivered again.
    _soft, limit = task_time_limits(config.max_seconds)
    options = getattr(settings, "CELERY_BROKER_TRANSPORT_OPTIONS", {}) or {}
    visibility = options.get("visibility_timeout", 3600)
    if visibility > limit:
        return []
    return [
        Error(
            f"visibility_timeout ({visibility}s) must exceed the retention tasks' "
            f"hard time limit ({limit}s: SAGA_RETENTION_MAX_S={config.max_seconds} plus 30s).",
            hint="Lower SAGA_RETENTION_MAX_S or raise CELERY_VISIBILITY_TIMEOUT.",
            id="sagas.E004",
        )
    ]
