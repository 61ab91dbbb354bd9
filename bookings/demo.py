"""Demo data for `make run`: a few flights, hotels and cars, a customer and an operator."""

from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction

from inventory import services as inventory

DEMO_USER = ("demo", "demo-password")
DEMO_ADMIN = ("admin", "admin-password")

ITEMS = [
    # sku, kind, name, capacity, price
    ("FL-LIS-BER-0900", "flight_seat", "Lisbon -> Berlin 09:00", 120, "189.00"),
    ("FL-BER-LIS-1830", "flight_seat", "Berlin -> Lisbon 18:30", 120, "174.00"),
    ("FL-LIS-PAR-0715", "flight_seat", "Lisbon -> Paris 07:15", 150, "129.00"),
    ("HT-BER-MITTE", "hotel_room", "Berlin Mitte, double room, 1 night", 40, "142.00"),
    ("HT-PAR-MARAIS", "hotel_room", "Paris Le Marais, double room, 1 night", 25, "198.00"),
    ("CR-BER-COMPACT", "car", "Berlin, compact car, 1 day", 30, "49.00"),
    ("CR-PAR-ELECTRIC", "car", "Paris, electric car, 1 day", 15, "72.00"),
]


@transaction.atomic
def seed_demo() -> dict:
    created = 0
    for sku, kind, name, capacity, price in ITEMS:
        _, was_created = inventory.item_upsert(
            sku=sku, kind=kind, name=name, capacity=capacity, price=Decimal(price), currency="EUR"
        )
        created += was_created
    users = []
    model = get_user_model()
    for (username, password), staff in ((DEMO_USER, False), (DEMO_ADMIN, True)):
        user, was_created = model.objects.get_or_create(
            username=username,
            defaults={"is_staff": staff, "is_superuser": staff, "email": f"{username}@example.com"},
        )
        if was_created:
            user.set_password(password)
            user.save(update_fields=["password"])
        users.append(username)
    return {"items": len(ITEMS), "items_created": created, "users": users}
