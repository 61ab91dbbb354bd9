from django.core.management.base import BaseCommand, CommandError

from sagas.bench.scale import SeedConfig, seed_sagas


class Command(BaseCommand):
    help = (
        "Bulk-insert sagas with their SagaLog rows for `bench --scale` "
        "(a realistic mix of types, statuses, ages and durations; ~5% FAILED). "
        "--saga-type picks the type; its plug-in may name a mix of types "
        "(trip_booking: 85% trips, 15% cancellations)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--saga-type", default="trip_booking", metavar="NAME", help="[trip_booking]"
        )
        parser.add_argument("--sagas", type=int, default=1_000_000, help="sagas to add [1000000]")
        parser.add_argument(
            "--logs-per-saga", type=int, default=5, help="SagaLog rows per saga [5]"
        )
        parser.add_argument(
            "--days", type=int, default=30, help="spread created_at over this many days [30]"
        )
        parser.add_argument(
            "--batch-size", type=int, default=100_000, help="sagas per INSERT statement [100000]"
        )

    def handle(self, *args, **options):
        try:
            config = SeedConfig(
                saga_type=options["saga_type"],
                sagas=options["sagas"],
                logs_per_saga=options["logs_per_saga"],
                days=options["days"],
                batch_size=options["batch_size"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        summary = seed_sagas(config, self.stdout.write)
        self.stdout.write(
            self.style.SUCCESS(
                f"seeded {summary['sagas']:,} sagas and {summary['saga_logs']:,} saga log rows "
                f"in {summary['seconds']} s, analyzed"
            )
        )
