class BookingError(Exception):
    code = "booking_error"


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
