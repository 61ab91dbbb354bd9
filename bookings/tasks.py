# The trip and cancellation sagas register their step tasks when defined.
from bookings import saga_steps  # noqa: F401

# The bench's baseline: the same steps as a bare Celery chain (manage.py bench).
from bookings.bench import bare  # noqa: F401
