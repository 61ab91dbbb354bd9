import os

from celery import Celery
from celery.signals import task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

app = Celery("backtrack")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@task_prerun.connect
def _drop_broken_db_connections(**_kwargs) -> None:
    """Workers reuse DB connections (CELERY_DB_REUSE_MAX); drop one that errored.

    Django does this per HTTP request; Celery's fixup only closes connections
    when reuse is off, so without this a connection broken by a database
    restart would fail every later task in the process.
    """
    from django.db import close_old_connections

    close_old_connections()
