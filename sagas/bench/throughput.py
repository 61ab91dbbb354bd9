"""Sagas and bare chains against running workers: bursts, open-loop arrivals, lone runs.

Times come from the rows, on one clock (every process runs on this machine):
a saga starts at its ``created_at`` (written by the plug-in's start, before
the commit and the publish) and ends at its ``finished_at`` (written by the
step or the compensation that ended it); a bare chain starts when the
plug-in created its rows and ends when its last task's transaction committed
(the ``done_at`` it returns, kept by the result backend). Polling only says when
to read them, so its interval does not enter any figure.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from django.db import connections
from django.db.models import Count
from django.utils import timezone
from django_celery_results.models import TaskResult

from sagas import selectors as saga_selectors
from sagas.bench.tasks import noop_chain
from sagas.bench.workers import BenchError
from sagas.definitions import SagaDefinition
from sagas.harness.plugin import SagaHarness
from sagas.models import Saga, SagaLog

POLL_S = 0.05
LONE_POLL_S = 0.005
# Idle time between lone sagas, so each one finds the workers idle.
LONE_GAP_S = 0.02
CHUNK = 500


@dataclass
class Submitted:
    key: str  # the saga id, or the bare chain's last task id
    started: float = 0.0  # a bare chain's rows created, a no-op chain published (epoch)
    lag_ms: float | None = None


@dataclass(frozen=True)
class Outcome:
    started: float
    finished: float
    status: str

    @property
    def latency_ms(self) -> float:
        return (self.finished - self.started) * 1000


@dataclass(frozen=True)
class Run:
    """What one phase produced: outcomes, and when its first submission happened."""

    first_submit: float
    submitted: list[Submitted]
    outcomes: dict[str, Outcome]

    @property
    def seconds(self) -> float:
        """From the first submission to the last end."""
        end = max(outcome.finished for outcome in self.outcomes.values())
        return max(end - self.first_submit, 1e-6)

    @property
    def per_s(self) -> float:
        return len(self.outcomes) / self.seconds

    @property
    def latencies_ms(self) -> list[float]:
        return [outcome.latency_ms for outcome in self.outcomes.values()]

    @property
    def lags_ms(self) -> list[float]:
        return [s.lag_ms for s in self.submitted if s.lag_ms is not None]


@dataclass(frozen=True)
class Bursts:
    """Bursts of one kind taken in turns: their outcomes over their summed durations."""

    runs: list[Run]

    @property
    def per_s(self) -> float:
        return sum(len(run.outcomes) for run in self.runs) / sum(run.seconds for run in self.runs)

    @property
    def rates(self) -> list[float]:
        return [round(run.per_s, 2) for run in self.runs]

    @property
    def latencies_ms(self) -> list[float]:
        return [latency for run in self.runs for latency in run.latencies_ms]


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


# --- submitting -----------------------------------------------------------------


Job = Callable[[int], Submitted]


def saga_job(harness: SagaHarness, *, offset: int = 0, chaos: dict | None = None) -> Job:
    """Start the plug-in's ``offset + i``-th saga, as its own product would."""

    def job(i: int) -> Submitted:
        saga_id = harness.start(offset + i, chaos=chaos)
        harness.saga_ids.append(saga_id)
        return Submitted(key=saga_id)

    return job


def bare_job(harness: SagaHarness, *, offset: int = 0) -> Job:
    def job(i: int) -> Submitted:
        last_task_id = str(uuid.uuid4())
        started = harness.bare_start(offset + i, last_task_id=last_task_id)
        return Submitted(key=last_task_id, started=started)

    return job


def noop_job(definition: SagaDefinition) -> Job:
    def job(_i: int) -> Submitted:
        last_task_id = str(uuid.uuid4())
        started = time.time()
        noop_chain(definition, last_task_id=last_task_id).apply_async()
        return Submitted(key=last_task_id, started=started)

    return job


def submit(
    job: Job, count: int, *, submitters: int, rate: float | None = None
) -> tuple[float, list[Submitted]]:
    """Run ``job`` for 0..count-1 on ``submitters`` threads.

    Without ``rate``, as fast as they can (a burst). With it, open loop: job
    ``i`` is due ``i / rate`` seconds after the start whatever has finished,
    and how late it actually went out is kept as its ``lag_ms``.
    """
    results: list[Submitted | None] = [None] * count
    errors: list[BaseException] = []
    numbers = itertools.count()
    lock = threading.Lock()
    start = time.monotonic()
    first_submit = time.time()

    def loop() -> None:
        try:
            while not errors:
                with lock:
                    i = next(numbers)
                if i >= count:
                    return
                lag = None
                if rate:
                    due = start + i / rate
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    lag = max(0.0, (time.monotonic() - due) * 1000)
                submitted = job(i)
                submitted.lag_ms = lag
                results[i] = submitted
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)
        finally:
            connections.close_all()  # this thread's own connection

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(min(submitters, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"submitting failed: {errors[0]!r}") from errors[0]
    return first_submit, [result for result in results if result is not None]


# --- waiting --------------------------------------------------------------------


def _deadline_passed(deadline: float, what: str, timeout: float, detail: Callable[[], str]):
    if time.monotonic() > deadline:
        raise BenchError(f"{what} not finished after {timeout:.0f}s: {detail()}")


def wait_sagas(ids: list[str], *, timeout: float, expect: str) -> dict[str, Outcome]:
    """Wait until every saga is terminal; all must have ended ``expect``."""
    deadline = time.monotonic() + timeout

    def unfinished() -> int:
        return sum(
            Saga.objects.filter(pk__in=chunk).exclude(status__in=Saga.TERMINAL).count()
            for chunk in _chunks(ids)
        )

    def statuses() -> str:
        counts: dict[str, int] = {}
        for chunk in _chunks(ids):
            rows = Saga.objects.filter(pk__in=chunk).values("status").annotate(n=Count("pk"))
            for row in rows.order_by():
                counts[row["status"]] = counts.get(row["status"], 0) + row["n"]
        return f"statuses {counts}"

    while unfinished():
        _deadline_passed(deadline, f"{len(ids)} sagas", timeout, statuses)
        time.sleep(POLL_S)
    outcomes: dict[str, Outcome] = {}
    for chunk in _chunks(ids):
        for saga_id, status, created, finished in Saga.objects.filter(pk__in=chunk).values_list(
            "id", "status", "created_at", "finished_at"
        ):
            outcomes[str(saga_id)] = Outcome(_epoch(created), _epoch(finished), status)
    wrong = sorted({o.status for o in outcomes.values()} - {expect})
    if wrong:
        raise BenchError(f"sagas ended {wrong} instead of {expect}: {statuses()}")
    return outcomes


def _bare_failures(since: datetime) -> list[str]:
    failed = TaskResult.objects.filter(
        task_name__startswith="bench.", status="FAILURE", date_done__gte=since
    ).values_list("task_name", "result")[:3]
    return [f"{name}: {result}" for name, result in failed]


def wait_bare(submitted: list[Submitted], *, timeout: float, since: datetime) -> dict[str, Outcome]:
    """Wait for every bare (or no-op) chain's last task to succeed; a failure stops the run."""
    keys = [s.key for s in submitted]
    deadline = time.monotonic() + timeout

    def done() -> int:
        return sum(
            TaskResult.objects.filter(task_id__in=chunk, status="SUCCESS").count()
            for chunk in _chunks(keys)
        )

    while (finished := done()) < len(keys):
        failures = _bare_failures(since)
        if failures:
            raise BenchError(f"bare chain tasks failed: {failures}")
        _deadline_passed(
            deadline, f"{len(keys)} bare chains", timeout, lambda f=finished: f"{f} done"
        )
        time.sleep(POLL_S)
    ends: dict[str, float] = {}
    for chunk in _chunks(keys):
        for task_id, result in TaskResult.objects.filter(task_id__in=chunk).values_list(
            "task_id", "result"
        ):
            ends[task_id] = float(json.loads(result)["done_at"])
    return {s.key: Outcome(s.started, ends[s.key], "SUCCESS") for s in submitted}


# --- phases ---------------------------------------------------------------------


def saga_run(
    job: Job,
    count: int,
    *,
    submitters: int,
    timeout: float,
    expect: str = Saga.Status.COMPLETED,
    rate: float | None = None,
) -> Run:
    first, submitted = submit(job, count, submitters=submitters, rate=rate)
    outcomes = wait_sagas([s.key for s in submitted], timeout=timeout, expect=expect)
    return Run(first, submitted, outcomes)


def bare_run(
    job: Job, count: int, *, submitters: int, timeout: float, rate: float | None = None
) -> Run:
    since = timezone.now()
    first, submitted = submit(job, count, submitters=submitters, rate=rate)
    return Run(first, submitted, wait_bare(submitted, timeout=timeout, since=since))


def lone_sagas(job: Job, count: int, *, timeout: float) -> Run:
    """One saga at a time: the next is booked once the last one ended and the workers idled."""
    first = time.time()
    submitted = []
    for i in range(count):
        one = job(i)
        submitted.append(one)
        deadline = time.monotonic() + timeout
        while saga_selectors.saga_status(saga_id=one.key) not in Saga.TERMINAL:
            _deadline_passed(deadline, f"lone saga {one.key}", timeout, lambda: "still running")
            time.sleep(LONE_POLL_S)
        time.sleep(LONE_GAP_S)
    outcomes = wait_sagas([s.key for s in submitted], timeout=timeout, expect=Saga.Status.COMPLETED)
    return Run(first, submitted, outcomes)


def lone_bare(job: Job, count: int, *, timeout: float) -> Run:
    since = timezone.now()
    first = time.time()
    submitted = []
    for i in range(count):
        one = job(i)
        submitted.append(one)
        deadline = time.monotonic() + timeout
        while not TaskResult.objects.filter(task_id=one.key, status="SUCCESS").exists():
            if _bare_failures(since):
                raise BenchError(f"bare chain tasks failed: {_bare_failures(since)}")
            _deadline_passed(deadline, f"lone bare chain {one.key}", timeout, lambda: "")
            time.sleep(LONE_POLL_S)
        time.sleep(LONE_GAP_S)
    return Run(first, submitted, wait_bare(submitted, timeout=timeout, since=since))


def compensation_latencies_ms(saga_ids: Iterable[str], outcomes: dict[str, Outcome], step: str):
    """From the failed step's last log row (its ``finished_at``) to the saga's COMPENSATED."""
    failed_at: dict[str, float] = {}
    ids = list(saga_ids)
    for chunk in _chunks(ids):
        rows = SagaLog.objects.filter(
            saga_id__in=chunk,
            step=step,
            phase=SagaLog.Phase.ACTION,
            status__in=(SagaLog.Status.FAILED, SagaLog.Status.TIMED_OUT),
        ).values_list("saga_id", "finished_at")
        for saga_id, finished in rows:
            key = str(saga_id)
            failed_at[key] = max(failed_at.get(key, 0.0), _epoch(finished))
    missing = [saga_id for saga_id in ids if saga_id not in failed_at]
    if missing:
        raise BenchError(f"{len(missing)} failed sagas have no failed {step} log row")
    return [(outcomes[saga_id].finished - failed_at[saga_id]) * 1000 for saga_id in ids]
