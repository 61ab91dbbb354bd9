"""The bookings admin: a read-only list with a way to each booking's sagas."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal

import pytest
from django.urls import reverse

from bookings.models import Booking, BookingLine

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:bookings_booking_changelist")


@pytest.fixture
def make_booking(customer):
    def make(email: str = "alice@example.com", **fields) -> Booking:
        booking = Booking.objects.create(
            user=customer,
            customer_name="Alice Example",
            customer_email=email,
            total=Decimal("360.00"),
            currency="EUR",
            **fields,
        )
        BookingLine.objects.create(
            booking=booking,
            sku="FL-TEST",
            kind="flight_seat",
            name="Test flight",
            quantity=1,
            unit_price=Decimal("200.00"),
            currency="EUR",
        )
        BookingLine.objects.create(
            booking=booking,
            sku="HT-TEST",
            kind="hotel_room",
            name="Test hotel",
            quantity=2,
            unit_price=Decimal("80.00"),
            currency="EUR",
        )
        return booking

    return make


def listed(response) -> list[str]:
    """The booking ids linked from a changelist page, in order."""
    return re.findall(r'href="/admin/bookings/booking/([0-9a-f-]{36})/change/', response.text)


def test_the_booking_list_shows_customer_status_total_and_links_to_its_sagas(
    admin_client, make_booking
):
    saga_id, cancel_saga_id = uuid.uuid4(), uuid.uuid4()
    booking = make_booking(
        status=Booking.Status.CONFIRMED, saga_id=saga_id, cancel_saga_id=cancel_saga_id
    )

    response = admin_client.get(CHANGELIST)

    assert response.status_code == 200
    html = response.text
    assert str(booking.pk) in html
    assert "Alice Example<br><small>alice@example.com</small>" in html
    assert "Confirmed" in html
    assert "360.00" in html
    assert f'<a href="{reverse("admin:sagas_saga_change", args=[saga_id])}">booking</a>' in html
    cancel_url = reverse("admin:sagas_saga_change", args=[cancel_saga_id])
    assert f'<a href="{cancel_url}">cancellation</a>' in html


def test_the_booking_list_filters_by_status(admin_client, make_booking):
    confirmed = make_booking(status=Booking.Status.CONFIRMED)
    make_booking(status=Booking.Status.REJECTED)

    response = admin_client.get(CHANGELIST, {"status__exact": Booking.Status.CONFIRMED})

    assert listed(response) == [str(confirmed.pk)]


def test_bookings_are_found_by_id_or_by_email(admin_client, make_booking):
    alice = make_booking()
    bob = make_booking(email="bob@example.com")

    by_id = admin_client.get(CHANGELIST, {"q": str(bob.pk)})
    by_email = admin_client.get(CHANGELIST, {"q": "ALICE@example.com"})
    by_fragment = admin_client.get(CHANGELIST, {"q": "example.com"})

    assert listed(by_id) == [str(bob.pk)]
    assert listed(by_email) == [str(alice.pk)]
    assert listed(by_fragment) == []


def test_the_booking_page_shows_its_lines_read_only(admin_client, make_booking):
    booking = make_booking()
    url = reverse("admin:bookings_booking_change", args=[booking.pk])

    page = admin_client.get(url)
    saved = admin_client.post(url, {"status": Booking.Status.CONFIRMED})

    assert page.status_code == 200
    assert "<p>FL-TEST</p>" in page.text
    assert "<p>160.00</p>" in page.text  # 2 x 80.00, the hotel line's subtotal
    assert 'name="_save"' not in page.text
    inline = page.context["inline_admin_formsets"][0]
    assert not inline.has_add_permission
    assert not inline.has_change_permission
    assert saved.status_code == 403
    booking.refresh_from_db()
    assert booking.status == Booking.Status.PENDING
