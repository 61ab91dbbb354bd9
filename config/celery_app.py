import gc
import os
from fnmatch import fnmatchcase

from celery import Celery
from celery.signals import (
    task_prerun,
    worker_before_create_process,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from config.tracing import configure_tracing, shutdown_tracing
from sagas.events import BatchedTaskEvents
from sagas.leases import MessageLeases

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")


class QuietMaintenanceTasks:
    """Task annotation (CELERY_TASK_ANNOTATIONS): maintenance tasks send no task events.

    Beat publishes the reconciler and the stall sweeper every 5 s each, 1,440
    tasks an hour that would bury a saga's tasks in Flower, which lists tasks
    from the workers' events. ``send_events = False`` on the task wins over
    whatever turns a worker's events on (CELERY_WORKER_SEND_TASK_EVENTS, -E,
    or Flower's enable_events broadcast every 5 s), so the tasks routed to the
    maintenance queue need no worker of their own to stay out of Flower.
    """

    def annotate(self, task) -> dict | None:
        from django.conf import settings

        routes = task.app.conf.task_routes
        if not isinstance(routes, dict):  # a router function or list: not ours to read
            return None
        quiet = any(
            fnmatchcase(task.name, pattern)
            for pattern, route in routes.items()
            if isinstance(route, dict) and route.get("queue") == settings.MAINTENANCE_QUEUE
        )
        return {"send_events": False} if quiet else None


app = Celery("backtrack")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# Live workers renew their lease on the messages they hold (see sagas.broker).
app.steps["consumer"].add(MessageLeases)
# Task events go out in batches, not one Redis round trip each (see sagas.events).
app.steps["consumer"].add(BatchedTaskEvents)


@task_prerun.connect
def _drop_broken_db_connections(**_kwargs) -> None:
    """Workers reuse DB connections (CELERY_DB_REUSE_MAX); drop one that broke.

    Without this a connection broken by a database restart would fail every
    later task in the process. Django's close_old_connections() is not used:
    it also honours CONN_MAX_AGE, which is 0 here, and would reconnect before
    every task (measured: ~20 ms per step on PostgreSQL).
    """
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if (
            connection.connection is not None
            and connection.errors_occurred
            and not connection.is_usable()
        ):
            connection.close()


@task_prerun.connect
def _drop_debug_query_log(**_kwargs) -> None:
    """With DEBUG on, forget the queries of earlier tasks, as Django does per request.

    Django keeps the last 9000 queries of each connection when DEBUG is on and
    empties the log when a request starts; a worker serves no requests, so each
    prefork child would hold a full log (measured: 11 MB). A log someone is
    reading (CaptureQueriesContext, with its debug cursor forced) is left alone.
    """
    from django.conf import settings
    from django.db import connections

    if not settings.DEBUG:
        return
    for connection in connections.all(initialized_only=True):
        if not connection.force_debug_cursor:
            connection.queries_log.clear()


@worker_before_create_process.connect
def _freeze_before_fork(**_kwargs) -> None:
    """Keep what the main process imported out of the pool children's garbage collections.

    A failed task leaves reference cycles (Celery's ExceptionInfo copies the
    position table of every code object in the traceback: ~0.5 MB a failure)
    that only a full collection frees. CPython runs one only once the objects
    that survived the last full collection grew by a quarter; in a child those
    are everything imported before the fork (~110,000 objects), so the cycles
    piled up (measured: 23 MB in one child after the bench). Frozen, those
    objects are never scanned again (nor copied on write by the collector):
    the children's full collections look at their own objects only, and come
    as often as those grow. Collected first, so no garbage is frozen.
    """
    gc.collect()
    gc.freeze()


@worker_process_init.connect
def _count_long_lived_afresh(**_kwargs) -> None:
    """A child's first collection (of its unfrozen objects only) resets the long-lived count."""
    gc.collect()


@worker_process_init.connect
def _trace_pool_process(**_kwargs) -> None:
    """Set up tracing in each prefork child, after the fork (config.tracing; off by default).

    Never in the main process before the fork: a BatchSpanProcessor's export
    thread would not exist in the children.
    """
    configure_tracing("worker")


@worker_init.connect
def _trace_unforked_worker(sender=None, **_kwargs) -> None:
    """A solo or threads worker runs its tasks in this process: set up tracing here."""
    pool = getattr(sender, "pool_cls", None) or "prefork"
    name = pool if isinstance(pool, str) else f"{pool.__module__}.{pool.__qualname__}"
    if not any(forking in name.lower() for forking in ("prefork", "processes")):
        configure_tracing("worker")


@worker_process_shutdown.connect
@worker_shutdown.connect
def _flush_spans(**_kwargs) -> None:
    """Export the spans still queued before the process goes (a child exits with os._exit)."""
    shutdown_tracing()
