"""The result store: django-celery-results' database backend, surviving a database restart.

Celery stores a task's failure from the process that saw it, which for a hard
time limit or a lost pool process is the worker's main process. That
process's connection is never checked before use: after a database restart
its first write fails, and the failure (which the errback reads to tell a
hard time limit) would be lost. With ``result_backend_always_retry`` Celery
retries what this backend calls safe to retry, with backoff; this backend
says so of every lost or broken connection, and drops it first so the retry
connects afresh. Loaded by Celery (``CELERY_RESULT_BACKEND``) once Django is
set up.
"""

from __future__ import annotations

from django.db import connection
from django_celery_results.backends.database import DatabaseBackend

from sagas.errors import database_unavailable


class ResilientDatabaseBackend(DatabaseBackend):
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        if database_unavailable(exc):
            connection.close()
            return True
        return super().exception_safe_to_retry(exc)
