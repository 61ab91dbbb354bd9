from django.apps import AppConfig
from django.utils.module_loading import autodiscover_modules


class SagasConfig(AppConfig):
    name = "sagas"
    verbose_name = "Sagas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, once models are loaded: the checks register themselves,
        # and tasks.py makes every saga type's step tasks from the registry.
        from sagas import checks, tasks  # noqa: F401

        # Saga types live in each app's saga_steps module; load them so the
        # registry is complete in the web process, in workers and in beat.
        autodiscover_modules("saga_steps")
        tasks.register_step_tasks()
