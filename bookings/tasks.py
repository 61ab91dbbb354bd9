# The trip and cancellation sagas register their step tasks when defined.
from bookings import saga_steps  # noqa: F401
