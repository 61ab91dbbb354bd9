"""Where a step's time goes, as a real worker runs it: the bench's per-step profile.

A worker started with ``BENCH_PROFILE_KEY`` in its environment (and this
module in its ``--include``) records, for every task it runs, the moments
and durations below, and pushes them to that Redis list from a background
thread (so the pushing is off the timed path). Production workers never
import this module; a bench worker without the variable installs nothing.

In the worker's main process:
  ``received``   the message was taken from Redis and became a request (``task_received``)
  ``ack``        acknowledging it (``task_acks_late``: after the child's result came back)
  ``events``     publishing the task events (received, started, succeeded): the
                 dispatcher buffers them and the event loop sends them in batches, so
                 they are timed per batch and shared out per event
In the pool process that ran it:
  ``prerun``     the task is about to run (after every other ``task_prerun`` receiver)
  ``run``        the task function, step wrapper included
  ``body``       the step's own action or compensation (the domain's code)
  ``sql``        every statement's execute, by kind (bookkeeping, domain, result backend)
  ``commit``     each COMMIT, inside the task function or after it (the result store's)
  ``publish``    each message it published (the next hop), with its size in bytes
  ``success``    Celery's ``task_success`` (the chain published, the result stored)
  ``postrun``    Celery's ``task_postrun`` (the "succeeded" log line is before it)
In the publishing process (a worker's pool process, or the bench for a chain's first task):
  ``published``  when the message was in Redis.

:func:`profile_summary` joins them per task and splits each hop into
segments; the times of different processes are compared on one clock, so the
bench, the worker and Redis must be on one machine (they are).
"""

from __future__ import annotations

import base64
import json
import os
import statistics
import threading
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ENV = "BENCH_PROFILE_KEY"
MODULE = "sagas.bench.profile"
# The worker's threads push what they recorded at least this often.
FLUSH_S = 0.3

# The segments of one hop, in the order they happen, and what each covers.
SEGMENTS: list[tuple[str, str]] = [
    ("broker", "published -> the worker's main process has the request (Redis, receive, decode)"),
    ("to_child", "request -> the pool process starts the task (pipe, trace set-up, prerun)"),
    ("wrapper", "the step wrapper's own Python (the task function minus body, SQL, commit)"),
    ("sql_bookkeeping", "bookkeeping statements' execute (saga row, saga log)"),
    ("body", "the step's action or compensation, its SQL excluded"),
    ("sql_domain", "the domain's statements' execute"),
    ("commit", "COMMIT of the step's transaction"),
    ("publish", "publishing the next message (serialize + Redis)"),
    ("result", "storing the result (a chain's last task) and Celery's own bookkeeping"),
    ("after", "task_success -> task_postrun (the INFO 'succeeded' line, on_success)"),
    ("to_main", "task_postrun -> the main process has the result (clean-up, pipe)"),
    ("ack", "acknowledging the message (acks_late)"),
]


# --- the worker side -----------------------------------------------------------------


class _Sink:
    """Records pushed to a Redis list by a thread of their own, per process."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.queue: deque[str] = deque()
        self.pid: int | None = None

    def put(self, record: dict[str, Any]) -> None:
        if self.pid != os.getpid():  # a forked pool process starts its own thread
            self.pid = os.getpid()
            self.queue = deque()
            threading.Thread(target=self._flush, daemon=True, name="bench-profile").start()
        self.queue.append(json.dumps(record))

    def _flush(self) -> None:
        import redis

        client = redis.Redis.from_url(self.url)
        while True:
            time.sleep(FLUSH_S / 4)
            batch = []
            while self.queue:
                batch.append(self.queue.popleft())
            if batch:
                client.rpush(self.key, *batch)


class _Recorder:
    """The worker's hooks; one per process, installed by :func:`install`."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink
        self.task: dict[str, Any] | None = None
        self.publishing: dict[str, float] = {}

    # the pool process ------------------------------------------------------------
    def prerun(self, task_id: str, task: Any, **_kwargs: Any) -> None:
        from django.db import connection

        self.task = {
            "kind": "task",
            "id": task_id,
            "name": task.name,
            "prerun": time.time(),
            "sql": defaultdict(float),
            "sql_n": 0,
            "commit": {"run": 0.0, "after": 0.0},
            "body": 0.0,
            "publish": [],
        }
        if not getattr(connection, "_bench_profiled", False):
            connection.commit = self._timed_commit(connection.commit)
            connection._bench_profiled = True
        connection.execute_wrappers.append(self.execute)

    def postrun(self, **_kwargs: Any) -> None:
        from django.db import connection

        record, self.task = self.task, None
        if record is None:
            return
        record["postrun"] = time.time()
        if self.execute in connection.execute_wrappers:
            connection.execute_wrappers.remove(self.execute)
        self.sink.put(record)

    def success(self, **_kwargs: Any) -> None:
        if self.task is not None:
            self.task["success"] = time.time()

    def execute(self, execute, sql, params, many, context):
        from sagas.bench.sqlcount import classify

        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            if self.task is not None:
                self.task["sql"][classify(sql)] += time.perf_counter() - start
                self.task["sql_n"] += 1

    def _timed_commit(self, commit):
        def timed_commit(*args: Any, **kwargs: Any):
            start = time.perf_counter()
            try:
                return commit(*args, **kwargs)
            finally:
                if self.task is not None:
                    where = "after" if "run_end" in self.task else "run"
                    self.task["commit"][where] += time.perf_counter() - start

        return timed_commit

    def timed_run(self, run):
        def run_timed(*args: Any, **kwargs: Any):
            if self.task is not None:
                self.task["run_start"] = time.time()
            try:
                return run(*args, **kwargs)
            finally:
                if self.task is not None:
                    self.task["run_end"] = time.time()

        return run_timed

    def timed_body(self, body):
        def body_timed(*args: Any, **kwargs: Any):
            start = time.perf_counter()
            try:
                return body(*args, **kwargs)
            finally:
                if self.task is not None:
                    self.task["body"] += time.perf_counter() - start

        return body_timed

    # any publishing process ------------------------------------------------------
    def before_publish(self, headers: dict | None = None, **_kwargs: Any) -> None:
        if headers and headers.get("id"):
            self.publishing[headers["id"]] = time.perf_counter()

    def after_publish(self, sender: str, body: Any, headers: dict | None = None, **_kw) -> None:
        task_id = (headers or {}).get("id")
        start = self.publishing.pop(task_id, None)
        if start is None:
            return
        end_perf, end = time.perf_counter(), time.time()
        record = {"id": task_id, "task": sender, "ms": (end_perf - start) * 1000, "at": end}
        record.update(message_size(body, headers))
        if self.task is not None:
            self.task["publish"].append(record)
        else:
            self.sink.put({"kind": "publish", **record})

    # the main process ------------------------------------------------------------
    def received(self, request: Any, **_kwargs: Any) -> None:
        self.sink.put({"kind": "received", "id": request.id, "at": time.time()})

    def timed_acknowledge(self, acknowledge):
        recorder = self

        def acknowledge_timed(request):
            start, start_perf = time.time(), time.perf_counter()
            try:
                return acknowledge(request)
            finally:
                recorder.sink.put(
                    {
                        "kind": "ack",
                        "id": request.id,
                        "at": start,
                        "ms": (time.perf_counter() - start_perf) * 1000,
                    }
                )

        return acknowledge_timed

    def timed_event_publish(self, publish):
        recorder = self

        def publish_timed(dispatcher, event, *args: Any, **kwargs: Any):
            start = time.perf_counter()
            try:
                return publish(dispatcher, event, *args, **kwargs)
            finally:
                # Task events go out in batches ("task.multi"), worker events one by one.
                events = event if isinstance(event, list) else [event]
                tasks = [e for e in events if str(e.get("type", "")).startswith("task-")]
                if tasks:
                    recorder.sink.put(
                        {
                            "kind": "events",
                            "n": len(tasks),
                            "ms": (time.perf_counter() - start) * 1000 * len(tasks) / len(events),
                        }
                    )

        return publish_timed


def message_size(body: Any, headers: dict | None) -> dict[str, Any]:
    """A message's size as the JSON serializer writes it, and what (de)serializing costs."""
    from kombu.serialization import dumps, loads

    start = time.perf_counter()
    content_type, encoding, data = dumps(body, serializer="json")
    dumped = time.perf_counter()
    loads(data, content_type, encoding)
    loaded = time.perf_counter()
    encoded = base64.b64encode(data.encode() if isinstance(data, str) else data)
    return {
        "body_bytes": len(data),
        # The Redis transport stores the body base64-encoded in a JSON envelope
        # beside the headers: roughly what goes over the wire and sits in Redis.
        "wire_bytes": len(encoded) + len(json.dumps(headers or {}, default=str)),
        "dumps_ms": (dumped - start) * 1000,
        "loads_ms": (loaded - dumped) * 1000,
    }


_recorder: _Recorder | None = None


def install(url: str, key: str) -> _Recorder:
    """Connect the hooks in this (worker) process; its pool processes inherit them."""
    global _recorder
    if _recorder is not None:
        return _recorder
    from celery import current_app, signals
    from celery.events.dispatcher import EventDispatcher
    from celery.worker.request import Request

    from sagas.definitions import registry

    recorder = _recorder = _Recorder(_Sink(url, key))
    signals.task_prerun.connect(recorder.prerun, weak=False)
    signals.task_postrun.connect(recorder.postrun, weak=False)
    signals.task_success.connect(recorder.success, weak=False)
    signals.task_received.connect(recorder.received, weak=False)
    signals.before_task_publish.connect(recorder.before_publish, weak=False)
    signals.after_task_publish.connect(recorder.after_publish, weak=False)
    Request.acknowledge = recorder.timed_acknowledge(Request.acknowledge)
    EventDispatcher._publish = recorder.timed_event_publish(EventDispatcher._publish)
    # Tracers are built when the consumer starts, after this import: they
    # pick up the timed ``run``.
    for task in current_app.tasks.values():
        if not task.name.startswith("celery."):
            task.run = recorder.timed_run(task.run)
    for definition in registry.all():
        for step in definition.steps:
            # Steps are frozen declarations; only a profiling worker swaps
            # their callables for timed ones.
            object.__setattr__(step, "action", recorder.timed_body(step.action))
            if step.compensation is not None:
                object.__setattr__(step, "compensation", recorder.timed_body(step.compensation))
    return recorder


if os.environ.get(ENV):  # a bench worker started to profile: see the module docstring
    install(os.environ.get("REDIS_URL", ""), os.environ[ENV])


# --- the bench side ------------------------------------------------------------------


@contextmanager
def publishes_recorded() -> Iterator[list[dict[str, Any]]]:
    """The messages this process publishes meanwhile (a chain's first task), as the worker records.

    The worker is profiled through the Redis list; the bench publishes the
    first message of every saga and chain itself, and records those here.
    """
    from celery import signals

    published: list[dict[str, Any]] = []

    starts: dict[str, float] = {}

    def before(headers: dict | None = None, **_kwargs: Any) -> None:
        if headers and headers.get("id"):
            starts[headers["id"]] = time.perf_counter()

    def after(sender: str, body: Any, headers: dict | None = None, **_kwargs: Any) -> None:
        task_id = (headers or {}).get("id")
        start = starts.pop(task_id, None)
        if start is not None:
            ms, at = (time.perf_counter() - start) * 1000, time.time()
            record = {"id": task_id, "task": sender, "ms": ms, "at": at}
            published.append({**record, **message_size(body, headers)})

    signals.before_task_publish.connect(before, weak=False)
    signals.after_task_publish.connect(after, weak=False)
    try:
        yield published
    finally:
        signals.before_task_publish.disconnect(before)
        signals.after_task_publish.disconnect(after)


def read_records(client: Any, key: str) -> list[dict[str, Any]]:
    records = [json.loads(raw) for raw in client.lrange(key, 0, -1)]
    client.delete(key)
    return records


def hops(records: list[dict[str, Any]], first_publishes: list[dict[str, Any]]) -> list[dict]:
    """One row per task the worker ran: its segments in ms, and its message's size."""
    tasks = {r["id"]: r for r in records if r["kind"] == "task"}
    received = {r["id"]: r["at"] for r in records if r["kind"] == "received"}
    acks = {r["id"]: r for r in records if r["kind"] == "ack"}
    batches = [r for r in records if r["kind"] == "events"]
    per_event_ms = sum(r["ms"] for r in batches) / max(1, sum(r["n"] for r in batches))
    events_per_task = sum(r["n"] for r in batches) / max(1, len(tasks))
    published = {p["id"]: p for p in first_publishes}
    for r in records:
        if r["kind"] == "publish":
            published[r["id"]] = r
    for task in tasks.values():
        for p in task["publish"]:
            published[p["id"]] = p

    rows = []
    for task_id, t in tasks.items():
        pub, got, ack = published.get(task_id), received.get(task_id), acks.get(task_id)
        if pub is None or got is None or ack is None or "run_end" not in t or "success" not in t:
            continue  # a task whose start or end fell outside the profiled window
        sql = t["sql"]
        run_s = t["run_end"] - t["run_start"]
        publish_s = sum(p["ms"] for p in t["publish"]) / 1000
        sql_bk, sql_dom = sql.get("bookkeeping", 0.0), sql.get("domain", 0.0)
        body = t["body"]
        commit_run = t["commit"]["run"]
        seconds = {
            "broker": got - pub["at"],
            "to_child": t["run_start"] - got,
            "wrapper": run_s - sql_bk - commit_run - body if body else 0.0,
            "sql_bookkeeping": sql_bk,
            # A no-op task has no step body: its function is all "body".
            "body": body - sql_dom if body else run_s - sql_bk - sql_dom - commit_run,
            "sql_domain": sql_dom,
            "commit": commit_run,
            "publish": publish_s,
            "result": t["success"] - t["run_end"] - publish_s,
            "after": t["postrun"] - t["success"],
            "to_main": ack["at"] - t["postrun"],
            "ack": ack["ms"] / 1000,
        }
        row = {name: round(value * 1000, 3) for name, value in seconds.items()}
        row["total"] = round((ack["at"] + ack["ms"] / 1000 - pub["at"]) * 1000, 3)
        # Not on the hop's path: the main process's event loop sends them in between.
        row["events"] = round(per_event_ms * events_per_task, 3)
        row["sql_n"] = t["sql_n"]
        row["task"] = t["name"]
        row["prerun_gap"] = round((t["run_start"] - t["prerun"]) * 1000, 3)
        row.update({k: pub[k] for k in ("body_bytes", "wire_bytes", "dumps_ms", "loads_ms")})
        rows.append(row)
    return rows


NUMERIC = [name for name, _ in SEGMENTS] + [
    "total",
    "events",
    "body_bytes",
    "wire_bytes",
    "dumps_ms",
    "loads_ms",
]


def _median_row(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {key: round(statistics.median(row[key] for row in rows), 2) for key in NUMERIC} | {
        "n": len(rows)
    }


def profile_summary(
    rows: list[dict[str, Any]], *, step_names: list[str], noop_name: str, covered: str
) -> dict[str, Any]:
    """Medians per step of the saga, their sum per saga, and the no-op task's per hop."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    steps = {name: _median_row(by_task[name]) for name in step_names if by_task.get(name)}
    per_saga = {key: round(sum(step[key] for step in steps.values()), 2) for key in NUMERIC}
    noop = _median_row(by_task[noop_name]) if by_task.get(noop_name) else None
    return {
        "covered": covered,
        "segments": dict(SEGMENTS),
        "steps": steps,
        "per_saga": per_saga,
        "noop_per_hop": noop,
        "noop_per_chain": (
            {key: round(noop[key] * len(step_names), 2) for key in NUMERIC} if noop else None
        ),
    }


COLUMNS = [
    ("broker", "broker"),
    ("to_child", "child"),
    ("wrapper", "wrap"),
    ("sql_bookkeeping", "sqlBk"),
    ("body", "body"),
    ("sql_domain", "sqlDom"),
    ("commit", "commit"),
    ("publish", "pub"),
    ("result", "result"),
    ("after", "after"),
    ("to_main", "main"),
    ("ack", "ack"),
    ("total", "total"),
    ("events", "events"),
    ("wire_bytes", "bytes"),
]


def profile_lines(profile: dict[str, Any]) -> list[str]:
    """The profile as a table: ms per segment, per step, per saga, and the no-op floor."""
    head = f"{'':<24}" + "".join(f"{label:>7}" for _, label in COLUMNS)

    def line(name: str, row: dict[str, Any] | None) -> str:
        if row is None:
            return f"{name:<24}" + "".join(f"{'-':>7}" for _ in COLUMNS)
        cells = []
        for key, _label in COLUMNS:
            value = row[key]
            cells.append(f"{value:>7.0f}" if key == "wire_bytes" else f"{value:>7.2f}")
        return f"{name[:24]:<24}" + "".join(cells)

    return [
        f"per-step profile, ms (medians; {profile['covered']}):",
        head,
        *(line(name, row) for name, row in profile["steps"].items()),
        line("per saga (sum)", profile["per_saga"]),
        line("no-op task, per hop", profile["noop_per_hop"]),
        line("no-op chain (x steps)", profile["noop_per_chain"]),
        "  broker: published -> main process has it; child: -> task function starts; "
        "wrap: step wrapper's Python;",
        "  sqlBk/sqlDom: execute time of bookkeeping/domain SQL; body: the step's code "
        "without its SQL; pub: publishing",
        "  the next hop; result: result store + Celery after the function; after: success "
        "-> postrun; main: -> main",
        "  process has the result; ack: acks_late ack; total: published -> acked; "
        "events: publishing its",
        "  task events (main process, batched, beside the path); bytes: the message as "
        "stored in Redis.",
    ]
