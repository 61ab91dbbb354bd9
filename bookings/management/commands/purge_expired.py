from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError

from bookings.retention import retention_purge


class Command(BaseCommand):
    help = (
        "Delete what beat's retention jobs delete, now: expired task results, "
        "(with SAGA_RETENTION_SAGAS_DAYS) expired sagas with their logs, and "
        "expired Idempotency-Keys. In batches, each job within SAGA_RETENTION_MAX_S: "
        "run it again while rows are left."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="count the rows due, delete nothing"
        )

    def handle(self, *args, **options):
        try:
            counts = retention_purge(dry_run=options["dry_run"])
        except ImproperlyConfigured as exc:
            raise CommandError(str(exc)) from None
        verb = "due" if options["dry_run"] else "deleted"
        self.stdout.write(
            f"{counts['task_results']} task results, {counts['sagas']} sagas, "
            f"{counts['saga_logs']} saga log rows, {counts['idempotency_keys']} "
            f"idempotency keys {verb}; {counts['left']} left"
        )
