from django.core.management.base import BaseCommand, CommandError

from sagas.chaos import ChaosConfigError, ChaosError, ChaosOptions, run_chaos
from sagas.chaos.plan import DEFAULT_FAULTS, TOPOLOGIES

DEFAULT_MIX = ", ".join(
    f"--{name.replace('_', '-')} {value:g}" for name, value in DEFAULT_FAULTS.items()
)


class Command(BaseCommand):
    help = (
        "Run sagas of one type (--saga-type, default trip_booking) through real Celery "
        "workers while injecting faults "
        "(permanent and transient step failures, failing compensations, duplicate deliveries, "
        "crashing steps, killed or frozen workers, a broker restart or flush, a database "
        "restart or dropped sessions, and the plug-in's own: cancellations and "
        "payment gateway faults for trips), optionally retry FAILED sagas as an operator "
        "would, wait until every saga is terminal, check "
        "the invariants of DESIGN.md section 4 and print a report. Exits non-zero if any "
        "invariant fails. No beat runs during the run: the command itself calls the "
        "reconciler (sagas_reconcile_pending) and the stall sweeper (sagas_recover_stalled) "
        "every 2 seconds, as beat would. With no fault flag it injects a default mix "
        f"({DEFAULT_MIX}); --no-faults runs clean. What the run created is deleted at "
        "the end unless --keep."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument(
            "--saga-type",
            default="trip_booking",
            metavar="NAME",
            help="the saga type to run; it needs a chaos plug-in (default trip_booking)",
        )
        parser.add_argument("--sagas", type=int, default=200, help="sagas to start (default 200)")
        parser.add_argument(
            "--concurrency",
            type=int,
            default=20,
            help="at most this many sagas open at once (default 20)",
        )
        parser.add_argument(
            "--seed", type=int, help="seed of the fault plans: same seed, same plans"
        )
        parser.add_argument(
            "--fail-rate",
            type=float,
            default=None,
            metavar="P",
            help="probability that a given action fails for good (per action)",
        )
        parser.add_argument(
            "--fail-step", default="", metavar="NAME", help="always fail this action"
        )
        parser.add_argument(
            "--transient-rate",
            type=float,
            default=None,
            metavar="P",
            help="probability that an action fails 1-2 times before it succeeds (per action)",
        )
        parser.add_argument(
            "--compensation-fail-rate",
            type=float,
            default=None,
            metavar="P",
            help="probability that a compensation fails 1-2 times before it succeeds",
        )
        parser.add_argument(
            "--duplicate-rate",
            type=float,
            default=None,
            metavar="P",
            help="probability that a saga gets one step message delivered a second time",
        )
        parser.add_argument(
            "--cancel-rate",
            type=float,
            default=None,
            metavar="P",
            help="share of finished sagas the plug-in follows up while the run goes on "
            "(trips: cancel that share of confirmed bookings, with faults of their own)",
        )
        parser.add_argument(
            "--gateway-timeout-rate",
            type=float,
            default=None,
            metavar="P",
            help="trips: share of bookings whose first capture is made but its answer lost",
        )
        parser.add_argument(
            "--gateway-brownout",
            type=float,
            default=None,
            metavar="SECONDS",
            help="trips: a gateway brown-out of this long a third into the run: answers "
            "lost for the first half, then 503 (nothing charged) for the second",
        )
        parser.add_argument(
            "--gateway-late-rate",
            type=float,
            default=None,
            metavar="P",
            help="trips: share of bookings whose capture lands at the gateway only after "
            "the attempt was answered with a timeout",
        )
        parser.add_argument(
            "--operator-retry",
            action="store_true",
            help="retry FAILED sagas' compensation as an operator would (up to 3 times); "
            "--compensation-fail-rate then fails compensations for good, until retried",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=0,
            metavar="K",
            help="start K worker processes of its own (default: use the workers running)",
        )
        parser.add_argument(
            "--topology",
            choices=TOPOLOGIES,
            default="shared",
            help="with --workers: 'split' starts K workers per queue of the saga type "
            "(trips: inventory, payments, bookings, sagas) instead of K on every queue",
        )
        parser.add_argument(
            "--kill-workers",
            type=int,
            default=None,
            metavar="M",
            help="with --workers: SIGKILL a worker's pool process M times, spread over the run "
            "(prefork starts a new one; the task is delivered again)",
        )
        parser.add_argument(
            "--crash-rate",
            type=float,
            default=None,
            metavar="P",
            help="with --workers: probability that an action or compensation ends its worker "
            "process (os._exit) on its first delivery; the broker delivers it again",
        )
        parser.add_argument(
            "--kill-worker-host",
            type=int,
            default=None,
            metavar="M",
            help="with --workers: SIGKILL a whole worker (main process and pool) M times, "
            "spread over the run, and start it again 1 s later as a supervisor would "
            "(with --workers 1 nobody works until then); its unacknowledged messages "
            "come back only after the visibility timeout",
        )
        parser.add_argument(
            "--freeze-worker",
            type=float,
            default=None,
            metavar="SECONDS",
            help="with --workers 2 or more: SIGSTOP a whole worker once a third of the sagas ended "
            "and "
            "SIGCONT it SECONDS later (its sockets and sessions stay open); one still frozen "
            "when the run ends is SIGKILLed",
        )
        parser.add_argument(
            "--flush-broker",
            action="store_true",
            help="once a third of the sagas ended, the broker loses every message, queued and "
            "unacknowledged: FLUSHDB on the broker's Redis database (that database only)",
        )
        parser.add_argument(
            "--restart-database",
            action="store_true",
            help="restart PostgreSQL once half the sagas ended: a local cluster with "
            "pg_ctlcluster or pg_ctl, or the command in CHAOS_DB_RESTART_COMMAND; refused "
            "where this machine cannot (see --drop-db-connections)",
        )
        parser.add_argument(
            "--drop-db-connections",
            action="store_true",
            help="with --workers, PostgreSQL: end every database session of the run's "
            "workers (pg_terminate_backend) once a third and once two thirds of the sagas ended",
        )
        parser.add_argument(
            "--restart-broker",
            action="store_true",
            help="with --workers: run its own Redis (append-only), stop it mid-run and "
            "restart it a few seconds later",
        )
        parser.add_argument(
            "--capacity",
            type=int,
            help="for plug-ins with stock (trips): units of each item (default: one per saga)",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=300.0,
            metavar="SECONDS",
            help="give up waiting after this long; open sagas are a violation (default 300)",
        )
        parser.add_argument(
            "--no-faults",
            action="store_true",
            help="inject no fault at all (without any fault flag the default mix runs)",
        )
        parser.add_argument(
            "--keep",
            action="store_true",
            help="keep what the run created for inspection (default: delete it if the run passed)",
        )
        parser.add_argument(
            "--json",
            dest="json_path",
            default="",
            metavar="PATH",
            help="also write the report as JSON",
        )

    def handle(self, *args, **options) -> None:
        rates = (
            "fail_rate",
            "transient_rate",
            "compensation_fail_rate",
            "duplicate_rate",
            "cancel_rate",
            "gateway_timeout_rate",
            "gateway_brownout",
            "gateway_late_rate",
        )
        counted = (*rates, "crash_rate", "kill_workers", "kill_worker_host", "freeze_worker")
        switches = ("restart_broker", "flush_broker", "restart_database", "drop_db_connections")
        given = [name for name in counted if options[name] is not None]
        given += [name for name in switches if options[name]]
        for name in counted:
            options[name] = options[name] or 0
        chaos_options = ChaosOptions(
            saga_type=options["saga_type"],
            sagas=options["sagas"],
            concurrency=options["concurrency"],
            seed=options["seed"],
            fail_rate=options["fail_rate"],
            fail_step=options["fail_step"],
            transient_rate=options["transient_rate"],
            compensation_fail_rate=options["compensation_fail_rate"],
            duplicate_rate=options["duplicate_rate"],
            cancel_rate=options["cancel_rate"],
            gateway_timeout_rate=options["gateway_timeout_rate"],
            gateway_brownout=options["gateway_brownout"],
            gateway_late_rate=options["gateway_late_rate"],
            operator_retry=options["operator_retry"],
            workers=options["workers"],
            topology=options["topology"],
            kill_workers=options["kill_workers"],
            restart_broker=options["restart_broker"],
            crash_rate=options["crash_rate"],
            kill_worker_host=options["kill_worker_host"],
            freeze_worker=options["freeze_worker"],
            flush_broker=options["flush_broker"],
            restart_database=options["restart_database"],
            drop_db_connections=options["drop_db_connections"],
            timeout=options["timeout"],
            json_path=options["json_path"],
            capacity=options["capacity"],
            keep=options["keep"],
            no_faults=options["no_faults"],
            faults_given=bool(given or options["fail_step"]),
        )
        try:
            result = run_chaos(options=chaos_options, out=self.stdout, err=self.stderr)
        except (ChaosConfigError, ChaosError) as exc:
            raise CommandError(str(exc)) from None
        if not result["passed"]:
            failed = [check["name"] for check in result["invariants"] if not check["passed"]]
            raise CommandError(
                f"chaos run {result['run_id']}: invariants failed: {', '.join(failed)}"
            )
