from django.db.models import QuerySet

from bookings.errors import BookingNotFound
from bookings.models import Booking, BookingLine


def booking_get(*, booking_id) -> Booking:
    booking = Booking.objects.filter(pk=booking_id).first()
    if booking is None:
        raise BookingNotFound(f"booking {booking_id} does not exist")
    return booking


def booking_lines(*, booking_id, kind: str | None = None) -> QuerySet[BookingLine]:
    lines = BookingLine.objects.filter(booking_id=booking_id)
    if kind is not None:
        lines = lines.filter(kind=kind)
    return lines.order_by("id")
