from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from sagas import checks  # noqa: F401  (registers the system checks)

        # Saga types live in each app's saga_steps module; load them so the
        # registry is complete in the web process, in workers and in beat.
        autodiscover_modules("saga_steps")
