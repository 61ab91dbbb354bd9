"""What a chaos run does: its options, their validation, and one fault plan per saga.

Plans are drawn from ``random.Random(seed)``, and every saga consumes the same
number of draws whatever the rates are, so one seed always gives the same
plans and changing one rate leaves the other faults where they were.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

TOPOLOGIES = ("shared", "split")
MAX_SAGAS = 100_000
MAX_CONCURRENCY = 1_000
MAX_WORKERS = 16
MAX_KILLS = 100
MAX_FREEZE_S = 3600
# 1 or 2 injected failures: within every step's and compensation's retry budget.
TRANSIENT_FAILURES = (1, 2)
# A saga whose step k is delivered twice is held this long at step k + 1, so
# the copy of k arrives while the saga still runs (it is then a duplicate, not late).
DUPLICATE_HOLD_MS = 300

# Fault kinds, as counted in the report.
FAIL = "fail"
TRANSIENT = "transient"
COMPENSATION_TRANSIENT = "compensation_transient"
DUPLICATE = "duplicate"
WORKER_KILL = "worker_kill"
BROKER_RESTART = "broker_restart"
COMPENSATION_FAIL = "compensation_fail"  # for good: only an operator's retry heals it
FOLLOW_UP = "follow_up"
OPERATOR_RETRY = "operator_retry"
CRASH = "crash"  # a step or compensation ends its worker process on its first delivery
WORKER_HOST_KILL = "worker_host_kill"
WORKER_FREEZE = "worker_freeze"
BROKER_FLUSH = "broker_flush"
DATABASE_RESTART = "database_restart"
DB_CONNECTIONS_DROP = "db_connections_drop"
FAULT_KINDS = (
    FAIL,
    TRANSIENT,
    COMPENSATION_TRANSIENT,
    COMPENSATION_FAIL,
    DUPLICATE,
    CRASH,
    WORKER_KILL,
    WORKER_HOST_KILL,
    WORKER_FREEZE,
    BROKER_RESTART,
    BROKER_FLUSH,
    DATABASE_RESTART,
    DB_CONNECTIONS_DROP,
    FOLLOW_UP,
    OPERATOR_RETRY,
)
# An operator retries a FAILED saga at most this often in one run.
MAX_OPERATOR_RETRIES = 3


# What `chaos` injects when no fault flag is given (`--no-faults` for a clean run):
# 1 - 0.95**5 = 23% of five-step sagas fail at some step, and every fault kind shows.
DEFAULT_FAULTS = {
    "fail_rate": 0.05,
    "transient_rate": 0.1,
    "compensation_fail_rate": 0.1,
    "duplicate_rate": 0.1,
}
FAULT_FLAGS = {
    "fail_rate": "--fail-rate",
    "fail_step": "--fail-step",
    "transient_rate": "--transient-rate",
    "compensation_fail_rate": "--compensation-fail-rate",
    "duplicate_rate": "--duplicate-rate",
    "crash_rate": "--crash-rate",
    "kill_workers": "--kill-workers",
    "kill_worker_host": "--kill-worker-host",
    "freeze_worker": "--freeze-worker",
    "restart_broker": "--restart-broker",
    "flush_broker": "--flush-broker",
    "restart_database": "--restart-database",
    "drop_db_connections": "--drop-db-connections",
}
# Broker URL schemes a FLUSHDB can reach.
REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+socket")
LOCAL_DATABASE_HOSTS = ("", "localhost", "127.0.0.1", "::1")
# Faults of the saga type's own world, carried out by its plug-in
# (``SagaHarness.chaos_flags`` lists those it supports).
DOMAIN_FLAGS = {
    "cancel_rate": "--cancel-rate",
    "gateway_timeout_rate": "--gateway-timeout-rate",
    "gateway_brownout": "--gateway-brownout",
    "gateway_late_rate": "--gateway-late-rate",
}
MAX_BROWNOUT_S = 600


class ChaosConfigError(ValueError):
    """An option is out of range or does not combine with another; names the flag."""


@dataclass(frozen=True)
class Backends:
    """What the run would break: the database Django uses and the app's broker URL."""

    database: dict[str, Any]
    broker_url: str

    @property
    def postgresql(self) -> bool:
        return self.database.get("ENGINE", "").startswith("django.db.backends.postgresql")

    @property
    def database_host(self) -> str:
        return str(self.database.get("HOST") or "")

    @property
    def local_database(self) -> bool:
        host = self.database_host
        return host in LOCAL_DATABASE_HOSTS or host.startswith("/")  # a socket directory

    @property
    def broker_scheme(self) -> str:
        return self.broker_url.partition("://")[0].lower() if "://" in self.broker_url else ""


@dataclass(frozen=True)
class ChaosOptions:
    saga_type: str = "trip_booking"
    sagas: int = 200
    concurrency: int = 20
    seed: int | None = None
    fail_rate: float = 0.0
    fail_step: str = ""
    transient_rate: float = 0.0
    compensation_fail_rate: float = 0.0
    duplicate_rate: float = 0.0
    workers: int = 0
    topology: str = "shared"
    kill_workers: int = 0
    restart_broker: bool = False
    crash_rate: float = 0.0
    kill_worker_host: int = 0
    freeze_worker: float = 0.0
    flush_broker: bool = False
    restart_database: bool = False
    drop_db_connections: bool = False
    timeout: float = 300.0
    json_path: str = ""
    capacity: int | None = None
    keep: bool = False
    # Domain faults (the plug-in's): see DOMAIN_FLAGS.
    cancel_rate: float = 0.0
    gateway_timeout_rate: float = 0.0
    gateway_brownout: float = 0.0
    gateway_late_rate: float = 0.0
    operator_retry: bool = False
    no_faults: bool = False
    default_faults: bool = False  # set by with_faults(): no fault flag was given
    faults_given: bool = False  # a fault flag was on the command line, zero or not

    def with_faults(self) -> ChaosOptions:
        """These options, with the default fault mix if no fault flag was given.

        ``--no-faults`` asks for a clean run and contradicts every fault flag.
        """
        given = [
            flag for name, flag in {**FAULT_FLAGS, **DOMAIN_FLAGS}.items() if getattr(self, name)
        ]
        if self.no_faults:
            if given:
                raise ChaosConfigError(f"--no-faults contradicts {', '.join(given)}")
            return self
        if given or self.faults_given or self.default_faults:
            return self
        return replace(self, **DEFAULT_FAULTS, default_faults=True)

    def validate(self, *, actions: list[str], backends: Backends | None = None) -> None:
        """Raise ChaosConfigError naming the first flag that is wrong, and why.

        With ``backends``, the infrastructure faults are also checked against
        the database and broker the run would use.
        """
        _count("--sagas", self.sagas, maximum=MAX_SAGAS)
        _count("--concurrency", self.concurrency, maximum=MAX_CONCURRENCY)
        for flag, rate in (
            ("--fail-rate", self.fail_rate),
            ("--transient-rate", self.transient_rate),
            ("--compensation-fail-rate", self.compensation_fail_rate),
            ("--duplicate-rate", self.duplicate_rate),
            ("--crash-rate", self.crash_rate),
            ("--cancel-rate", self.cancel_rate),
            ("--gateway-timeout-rate", self.gateway_timeout_rate),
            ("--gateway-late-rate", self.gateway_late_rate),
        ):
            if not (isinstance(rate, int | float) and 0 <= rate <= 1):
                raise ChaosConfigError(f"{flag} must be a probability between 0 and 1, not {rate}")
        if self.gateway_timeout_rate + self.gateway_late_rate > 1:
            raise ChaosConfigError(
                "--gateway-timeout-rate and --gateway-late-rate pick one card per saga: "
                f"together at most 1, not {self.gateway_timeout_rate + self.gateway_late_rate:g}"
            )
        brownout = self.gateway_brownout
        if not (
            isinstance(brownout, int | float)
            and math.isfinite(brownout)
            and 0 <= brownout <= MAX_BROWNOUT_S
        ):
            raise ChaosConfigError(
                f"--gateway-brownout must be seconds between 0 and {MAX_BROWNOUT_S}, not {brownout}"
            )
        if self.fail_step and self.fail_step not in actions:
            raise ChaosConfigError(
                f"--fail-step {self.fail_step!r} is not a step of the {self.saga_type} saga; "
                f"use one of {', '.join(actions)}"
            )
        if self.workers:
            _count("--workers", self.workers, maximum=MAX_WORKERS)
        if self.topology not in TOPOLOGIES:
            raise ChaosConfigError(
                f"--topology must be one of {', '.join(TOPOLOGIES)}, not {self.topology!r}"
            )
        if self.topology == "split" and not self.workers:
            raise ChaosConfigError(
                "--topology split needs --workers: the run can only split workers it starts"
            )
        if self.kill_workers:
            if not self.workers:
                raise ChaosConfigError(
                    "--kill-workers needs --workers: the run only kills workers it started"
                )
            _count("--kill-workers", self.kill_workers, maximum=min(MAX_KILLS, self.sagas))
        if self.restart_broker and not self.workers:
            raise ChaosConfigError(
                "--restart-broker needs --workers: the run can only restart a Redis it owns, "
                "and only workers it starts can be pointed at that Redis"
            )
        if self.crash_rate and not self.workers:
            raise ChaosConfigError(
                "--crash-rate needs --workers: a crash ends the worker process that runs "
                "the step, and only workers the run started are its to crash"
            )
        if self.kill_worker_host:
            if not self.workers:
                raise ChaosConfigError(
                    "--kill-worker-host needs --workers: the run only kills workers it started"
                )
            _count("--kill-worker-host", self.kill_worker_host, maximum=min(MAX_KILLS, self.sagas))
        freeze = self.freeze_worker
        if freeze:
            if not (
                isinstance(freeze, int | float)
                and not isinstance(freeze, bool)
                and math.isfinite(freeze)
                and 0 < freeze <= MAX_FREEZE_S
            ):
                raise ChaosConfigError(
                    f"--freeze-worker must be seconds between 0 and {MAX_FREEZE_S}, not {freeze}"
                )
            if self.workers < 2:
                raise ChaosConfigError(
                    "--freeze-worker needs --workers 2 or more: the frozen worker does nothing "
                    "while it is stopped, and another one must do the work"
                )
        if self.drop_db_connections and not self.workers:
            raise ChaosConfigError(
                "--drop-db-connections needs --workers: it ends the sessions of the workers "
                "the run started, which it knows by their application_name"
            )
        if backends is not None:
            self._validate_backends(backends)
        if not (isinstance(self.timeout, int | float) and math.isfinite(self.timeout)):
            raise ChaosConfigError(f"--timeout must be a number of seconds, not {self.timeout}")
        if self.timeout <= 0:
            raise ChaosConfigError(f"--timeout must be more than 0 seconds, not {self.timeout}")
        if self.capacity is not None:
            _count("--capacity", self.capacity, maximum=10**9)
        if self.json_path:
            path = Path(self.json_path)
            if path.is_dir():
                raise ChaosConfigError(f"--json {self.json_path} is a directory; name a file")
            if not path.parent.resolve().is_dir():
                raise ChaosConfigError(
                    f"--json {self.json_path}: directory {path.parent} does not exist"
                )

    def _validate_backends(self, backends: Backends) -> None:
        if self.flush_broker and backends.broker_scheme not in REDIS_SCHEMES:
            raise ChaosConfigError(
                f"--flush-broker empties a Redis database (FLUSHDB); the broker is "
                f"{backends.broker_scheme or 'not set'}://, not Redis"
            )
        engine = backends.database.get("ENGINE", "?").rsplit(".", 1)[-1]
        if self.drop_db_connections and not backends.postgresql:
            raise ChaosConfigError(
                f"--drop-db-connections ends the workers' PostgreSQL sessions "
                f"(pg_terminate_backend); the database is {engine}, not PostgreSQL"
            )
        if self.restart_database and not backends.postgresql:
            raise ChaosConfigError(
                f"--restart-database restarts a PostgreSQL server; the database is {engine}, "
                "not PostgreSQL"
            )

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _count(flag: str, value: Any, *, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ChaosConfigError(f"{flag} must be a whole number of at least 1, not {value}")
    if value > maximum:
        raise ChaosConfigError(f"{flag} must be at most {maximum}, not {value}")


@dataclass(frozen=True)
class SagaPlan:
    """The faults of one saga: its chaos plan, and which action to deliver twice."""

    chaos: dict[str, Any]
    fails_at: str | None = None
    # Index of the action whose message is published again once the saga passed it.
    duplicate_step: int | None = None
    faults: Counter = field(default_factory=Counter)


def draw_plans(
    options: ChaosOptions, *, seed: int, actions: list[str], compensations: dict[str, str]
) -> list[SagaPlan]:
    """One plan per saga. ``compensations`` maps an action to its compensation's name.

    - ``--fail-rate``: each action fails for good with that probability; the
      first failing one (or ``--fail-step``, if earlier) is the saga's failure.
    - ``--transient-rate``: each action that will run fails 1-2 times first.
    - ``--compensation-fail-rate``: each compensation that will run (those of
      the steps before the failure) fails 1-2 times first; all must heal.
      With ``--operator-retry`` it fails for good instead: the saga ends
      FAILED until the run retries it as an operator would.
    - ``--duplicate-rate``: one action k that the saga will pass is delivered
      a second time; action k + 1 (never the last) waits DUPLICATE_HOLD_MS
      first, so the copy finds the saga still running.
    - ``--crash-rate``: each action that will be delivered, and each
      compensation that will run, ends its worker process on its first delivery.
    """
    rng = random.Random(seed)
    crash_rng = random.Random(f"{seed}:crash")
    return [
        draw_plan(rng, options, actions, compensations, crash_rng=crash_rng)
        for _ in range(options.sagas)
    ]


def draw_plan(
    rng: random.Random,
    options: ChaosOptions,
    actions: list[str],
    compensations: dict[str, str],
    *,
    crash_rng: random.Random,
) -> SagaPlan:
    """One saga's plan. Crashes are drawn from ``crash_rng``, a stream of their own,
    so the plans a seed gave before ``--crash-rate`` existed are the same today."""
    fail_draws = [rng.random() < options.fail_rate for _ in actions]
    transient_draws = [
        (rng.random() < options.transient_rate, rng.choice(TRANSIENT_FAILURES)) for _ in actions
    ]
    undo_draws = [
        (rng.random() < options.compensation_fail_rate, rng.choice(TRANSIENT_FAILURES))
        for _ in actions
    ]
    duplicate = rng.random() < options.duplicate_rate
    duplicate_at = rng.random()
    crash_draws = [crash_rng.random() < options.crash_rate for _ in actions]
    undo_crash_draws = [crash_rng.random() < options.crash_rate for _ in actions]

    failing = [i for i, fails in enumerate(fail_draws) if fails]
    if options.fail_step:
        failing.append(actions.index(options.fail_step))
    fail_index = min(failing) if failing else None
    # Actions 0 .. reach-1 succeed; the failing action itself never gets past chaos.
    reach = len(actions) if fail_index is None else fail_index

    chaos: dict[str, Any] = {}
    faults: Counter = Counter()
    if fail_index is not None:
        chaos["fail"] = [actions[fail_index]]
        faults[FAIL] += 1
    transient = {actions[i]: n for i, (hit, n) in enumerate(transient_draws[:reach]) if hit}
    if transient:
        chaos["transient"] = transient
        faults[TRANSIENT] += len(transient)
    if fail_index is not None:
        undo = {
            compensations[actions[i]]: n
            for i, (hit, n) in enumerate(undo_draws[:reach])
            if hit and compensations.get(actions[i])
        }
        if undo and options.operator_retry:
            chaos["compensation_fail"] = sorted(undo)
            faults[COMPENSATION_FAIL] += len(undo)
        elif undo:
            chaos["compensation_transient"] = undo
            faults[COMPENSATION_TRANSIENT] += len(undo)
    # The failing action is delivered too; only compensations of passed steps run.
    crash = [actions[i] for i, hit in enumerate(crash_draws[: reach + 1]) if hit]
    if fail_index is not None:
        crash += [
            compensations[actions[i]]
            for i, hit in enumerate(undo_crash_draws[:reach])
            if hit and compensations.get(actions[i])
        ]
    if crash:
        chaos["crash"] = crash
        faults[CRASH] += len(crash)
    passable = min(reach, len(actions) - 2)
    duplicate_step = int(duplicate_at * passable) if duplicate and passable > 0 else None
    if duplicate_step is not None:
        chaos["delay_ms"] = {actions[duplicate_step + 1]: DUPLICATE_HOLD_MS}
    return SagaPlan(
        chaos=chaos,
        fails_at=actions[fail_index] if fail_index is not None else None,
        duplicate_step=duplicate_step,
        faults=faults,
    )
