"""The payments admin: charges, refunds and the ledger, read-only."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.urls import reverse

from payments.models import Charge, LedgerEntry, Refund

pytestmark = pytest.mark.django_db


@pytest.fixture
def refunded_charge():
    charge = Charge.objects.create(
        idempotency_key="saga:abc:charge_payment",
        reference="booking:abc",
        amount=Decimal("360.00"),
        currency="EUR",
        gateway_charge_id="ch_1",
        status=Charge.Status.REFUNDED,
        refunded_amount=Decimal("360.00"),
    )
    refund = Refund.objects.create(
        charge=charge,
        idempotency_key="saga:abc:refund_payment",
        amount=Decimal("360.00"),
        currency="EUR",
        gateway_refund_id="re_1",
        reason="trip booking undone",
    )
    LedgerEntry.objects.create(
        entry_type="CHARGE", amount=Decimal("360.00"), currency="EUR", charge=charge
    )
    LedgerEntry.objects.create(
        entry_type="REFUND",
        amount=Decimal("-360.00"),
        currency="EUR",
        charge=charge,
        refund=refund,
    )
    return charge


def test_the_charge_list_shows_amounts_and_status(admin_client, refunded_charge):
    response = admin_client.get(reverse("admin:payments_charge_changelist"))

    assert response.status_code == 200
    assert "saga:abc:charge_payment" in response.text
    assert "Refunded" in response.text
    assert "360.00" in response.text


def test_a_charge_page_shows_its_refunds_and_cannot_be_saved(admin_client, refunded_charge):
    url = reverse("admin:payments_charge_change", args=[refunded_charge.pk])

    page = admin_client.get(url)
    saved = admin_client.post(url, {"amount": "1.00"})

    assert page.status_code == 200
    assert "saga:abc:refund_payment" in page.text
    assert saved.status_code == 403
    refunded_charge.refresh_from_db()
    assert refunded_charge.amount == Decimal("360.00")


def test_the_refund_and_ledger_lists_render(admin_client, refunded_charge):
    refunds = admin_client.get(reverse("admin:payments_refund_changelist"))
    ledger = admin_client.get(reverse("admin:payments_ledgerentry_changelist"))

    assert refunds.status_code == 200
    assert "saga:abc:refund_payment" in refunds.text
    assert ledger.status_code == 200
    assert "-360.00" in ledger.text
