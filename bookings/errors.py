class BookingError(Exception):
    """A booking request the domain refuses; ``field`` names the input at fault."""

    code = "booking_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownSku(BookingError):
    code = "unknown_sku"


class InvalidBooking(BookingError):
    code = "invalid_booking"


class PaymentMismatch(BookingError):
    code = "payment_mismatch"


class BookingNotFound(BookingError):
    code = "booking_not_found"


class BookingNotCancellable(BookingError):
    code = "booking_not_cancellable"


class IdempotencyConflict(BookingError):
    code = "idempotency_key_reused"


class BookingStateConflict(BookingError):
    """A saga found the booking in a state its step or hook does not expect: a bug, loudly."""

    code = "booking_state_conflict"
