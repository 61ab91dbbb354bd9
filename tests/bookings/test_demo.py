import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from inventory.models import Item

pytestmark = pytest.mark.django_db


def test_seed_demo_creates_inventory_and_users_once(capsys):
    call_command("seed_demo")
    call_command("seed_demo")

    out = capsys.readouterr().out
    assert "demo data ready: 7 items (7 new), users demo, admin" in out
    assert "demo data ready: 7 items (0 new), users demo, admin" in out
    assert Item.objects.count() == 7
    assert set(Item.objects.values_list("kind", flat=True)) == {"flight_seat", "hotel_room", "car"}
    users = get_user_model().objects
    assert users.get(username="demo").check_password("demo-password")
    assert not users.get(username="demo").is_staff
    assert users.get(username="admin").is_superuser
