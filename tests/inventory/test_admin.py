"""The inventory admin: items with their counters, holds read-only."""

from __future__ import annotations

import pytest
from django.urls import reverse

from inventory import services
from inventory.models import Hold

pytestmark = pytest.mark.django_db


def test_the_item_list_shows_available_held_and_sold(admin_client, make_item):
    item = make_item(sku="FL-ADMIN", capacity=5)
    services.hold_place(sku=item.sku, quantity=2, reference="booking-line:1")

    response = admin_client.get(reverse("admin:inventory_item_changelist"))

    assert response.status_code == 200
    row = response.text.split("FL-ADMIN", 1)[1].split("</tr>", 1)[0]
    counters = [
        cell
        for cell in ("field-capacity", "field-available", "field-held", "field-sold")
        if f'class="{cell}">' in row
    ]
    assert len(counters) == 4
    assert '<td class="field-available">3</td>' in row
    assert '<td class="field-held">2</td>' in row
    assert '<td class="field-sold">0</td>' in row


def test_item_counters_cannot_be_edited_by_hand(admin_client, make_item):
    item = make_item()

    page = admin_client.get(reverse("admin:inventory_item_change", args=[item.pk]))

    assert page.status_code == 200
    assert 'name="available"' not in page.text
    assert 'name="held"' not in page.text


def test_holds_are_listed_but_cannot_be_changed(admin_client, make_item):
    item = make_item()
    services.hold_place(sku=item.sku, quantity=1, reference="booking-line:7")
    hold = Hold.objects.get(reference="booking-line:7")

    listing = admin_client.get(reverse("admin:inventory_hold_changelist"))
    changed = admin_client.post(
        reverse("admin:inventory_hold_change", args=[hold.pk]), {"status": "RELEASED"}
    )

    assert listing.status_code == 200
    assert "booking-line:7" in listing.text
    assert changed.status_code == 403
    hold.refresh_from_db()
    assert hold.status == Hold.Status.HELD
