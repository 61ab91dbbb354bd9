from django.apps import AppConfig


class BookingsConfig(AppConfig):
    name = "bookings"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Registers with the engine's retention which sagas bookings still need.
        from bookings import retention  # noqa: F401
