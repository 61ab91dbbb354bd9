import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from sagas.bench.hops import HopsConfig, hops_table, run_hops
from sagas.bench.pipeline import PipelineConfig, pipeline_table, run_pipeline
from sagas.bench.report import table
from sagas.bench.runner import BenchConfig, run_bench
from sagas.bench.scale import ScaleConfig, run_scale, scale_table
from sagas.bench.workers import BenchError

THROUGHPUT_FLAGS = (
    "sagas",
    "submitters",
    "lone",
    "failures",
    "half_load_sagas",
    "skip_half_load",
    "warmup",
    "rounds",
    "concurrency",
    "purge",
    "allow_foreign_workers",
    "saga_type",
    "keep",
    "profile_sagas",
    "tracing",
)


# The flags --hops and --pipeline take, and the config field each sets.
_SHARED = ("rounds", "saga_type", "submitters", "concurrency", "timeout", "purge")
HOPS_FLAGS = {
    "sagas": "chains",
    "lone": "lone",
    **{name: name for name in (*_SHARED, "allow_foreign_workers")},
}
PIPELINE_FLAGS = {name: name for name in ("sagas", *_SHARED, "allow_foreign_workers", "keep")}


def _given(value) -> bool:
    """Set on the command line: a number (0 included) or a switch that is on."""
    return value is not None and value is not False


class Command(BaseCommand):
    help = (
        "Benchmark sagas of one type (--saga-type, default trip_booking) against a bare "
        "Celery chain with the same domain work and a no-op chain, with workers started "
        "here: throughput, latency, compensation latency, SQL per step and worker memory. "
        "What the run created is deleted at the end unless --keep. "
        "--scale times the admin and API pages over the seeded sagas instead "
        "(see seed_sagas)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--saga-type", metavar="NAME", help="the saga type to bench [trip_booking]"
        )
        parser.add_argument("--sagas", type=int, help="sagas (and bare chains) per burst [500]")
        parser.add_argument("--submitters", type=int, help="threads starting sagas [4]")
        parser.add_argument("--lone", type=int, help="sagas run one at a time [50]")
        parser.add_argument("--failures", type=int, help="sagas failing at the last step [100]")
        parser.add_argument(
            "--half-load-sagas", type=int, help="sagas at half capacity [sagas / 2]"
        )
        parser.add_argument("--skip-half-load", action="store_true", help="skip that phase")
        parser.add_argument("--warmup", type=int, help="sagas and bare chains to warm up [20]")
        parser.add_argument(
            "--rounds", type=int, help="saga and bare bursts taken in turns, --sagas split [2]"
        )
        parser.add_argument("--concurrency", type=int, help="worker processes (prefork -c) [2]")
        parser.add_argument("--timeout", type=float, help="seconds any phase may take [300]")
        parser.add_argument(
            "--purge", action="store_true", help="drop messages already in the bench's queues"
        )
        parser.add_argument(
            "--allow-foreign-workers",
            action="store_true",
            help="run even if other workers consume this broker (their work skews the figures)",
        )
        parser.add_argument(
            "--keep",
            action="store_true",
            help="keep what the run created (default: delete it at the end)",
        )
        parser.add_argument(
            "--profile-sagas",
            type=int,
            help="lone sagas and no-op chains profiled step by step on a worker of their own "
            "after the other phases; 0 skips the profile [20]",
        )
        parser.add_argument(
            "--tracing",
            choices=("off", "drop"),
            help="drop: after the other phases, run sagas on workers with tracing off and with "
            "tracing on (OTEL_TRACES_EXPORTER=drop: spans made, thrown away), in turns, and "
            "print both and their ratio; the SQL count is run again traced. The figures above "
            "are always tracing off [off]",
        )
        parser.add_argument("--json", metavar="PATH", help="write the report to PATH as JSON")
        parser.add_argument(
            "--scale",
            action="store_true",
            help="time the admin and API pages over the sagas in the database (seed_sagas first)",
        )
        parser.add_argument(
            "--hops",
            action="store_true",
            help="measure what Celery's per-task machinery costs each hop instead: no-op chains "
            "against a worker restarted per variant (events, logging, acks, results, ...); "
            "takes --sagas (chains per burst) [300], --lone [30], --rounds [2], --saga-type, "
            "--submitters, --concurrency, --timeout, --purge, --allow-foreign-workers",
        )
        parser.add_argument(
            "--pipeline",
            action="store_true",
            help="measure what bounds the throughput instead: sagas, bare chains and no-op "
            "chains in bursts on a worker restarted per variant of its pipeline (a pool process "
            "more, prefetch 2, task events unbatched or off), as ratios to the production "
            "worker's; takes --sagas (per burst) [200], --rounds [2], --saga-type, --submitters, "
            "--concurrency, --timeout, --purge, --allow-foreign-workers, --keep",
        )
        parser.add_argument("--runs", type=int, help="--scale: timed requests per page [5]")
        parser.add_argument(
            "--stalled",
            type=int,
            help="--scale: stalled sagas (their messages lost) the sweeper must move on; "
            "0 skips it [10000]",
        )

    def handle(self, *args, **options):
        path = self._json_path(options["json"])
        try:
            if options["hops"] and options["pipeline"]:
                raise CommandError("--hops and --pipeline are two different runs: pick one")
            if options["pipeline"]:
                config = PipelineConfig(**self._mode_options(options, "pipeline", PIPELINE_FLAGS))
                report = run_pipeline(config, self._echo)
                text = pipeline_table(report)
            elif options["hops"]:
                config = HopsConfig(**self._mode_options(options, "hops", HOPS_FLAGS))
                report = run_hops(config, self._echo)
                text = hops_table(report)
            elif options["scale"]:
                used = [flag for flag in THROUGHPUT_FLAGS if _given(options[flag])]
                if used:
                    flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in used)
                    raise CommandError(f"--scale times pages only; it takes no {flags}")
                config = ScaleConfig(**self._given(options, "runs", "timeout", "stalled"))
                report = run_scale(config, self._echo)
                text = scale_table(report)
            else:
                for flag in ("runs", "stalled"):
                    if options[flag] is not None:
                        raise CommandError(f"--{flag} belongs to --scale")
                config = BenchConfig(**self._given(options, *THROUGHPUT_FLAGS, "timeout"))
                report = run_bench(config, self._echo)
                text = table(report)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        except BenchError as exc:
            raise CommandError(f"bench failed: {exc}") from None
        except KeyboardInterrupt:
            raise CommandError(
                "interrupted; the workers were stopped (the next run needs --purge)"
            ) from None
        self.stdout.write("\n" + text)
        if path is not None:
            path.write_text(json.dumps(report, indent=2, default=str) + "\n")
            self.stdout.write(f"\nreport written to {path}")

    def _mode_options(self, options, mode: str, allowed: dict[str, str]):
        """The config of ``--<mode>`` from the flags it takes; any other flag given is refused."""
        others = [
            flag
            for flag in (*THROUGHPUT_FLAGS, "runs", "stalled", "scale")
            if flag not in allowed and _given(options[flag])
        ]
        if others:
            flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in others)
            raise CommandError(f"--{mode} takes no {flags}")
        return {allowed[name]: options[name] for name in allowed if _given(options[name])}

    def _given(self, options, *names):
        return {name: options[name] for name in names if _given(options[name])}

    def _json_path(self, value):
        if value is None:
            return None
        path = Path(value)
        if path.is_dir():
            raise CommandError(f"--json {value}: is a directory; name a file")
        if not path.parent.is_dir():
            raise CommandError(f"--json {value}: directory {path.parent} does not exist")
        return path

    def _echo(self, message: str) -> None:
        self.stdout.write(message)
        self.stdout.flush()
