from django.core.management.base import BaseCommand

from bookings.demo import seed_demo


class Command(BaseCommand):
    help = "Create demo inventory (flights, hotels, cars) and the demo users; safe to run again."

    def handle(self, *args, **options) -> None:
        summary = seed_demo()
        self.stdout.write(
            self.style.SUCCESS(
                f"demo data ready: {summary['items']} items "
                f"({summary['items_created']} new), users {', '.join(summary['users'])}"
            )
        )
