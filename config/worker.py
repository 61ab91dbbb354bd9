"""``python -m config.worker``: Celery's ``worker`` command without the rest of ``celery``.

Takes the options of ``celery -A config worker`` (``-Q``, ``-c``, ``-n``,
``-E``, ``-P``, ``--loglevel``, ...). Everything a worker imports before its
pool forks is resident in the main process and again in every prefork child,
so two things ``celery -A config worker`` would load are left out:

- The ``celery`` umbrella command imports all its subcommands and every
  installed plug-in before it reads its arguments: Flower (tornado, its web
  app, prometheus_client) and ``celery amqp``'s shell (click_repl,
  prompt_toolkit). Measured: 21 MB per process.
- Celery's Django fixup runs every system check at startup (and discards
  what they report). The admin, template and URL checks import the URLconf,
  each API module, DRF's template tags (with ``requests``) and
  drf-spectacular. Measured: 14 MB per process. The other checks run here
  and what they report is logged; ``manage.py check`` runs all of them.
"""

from __future__ import annotations

import logging
import os
import sys

# Only the web process serves the admin, templates and URLs.
WEB_ONLY_CHECK_TAGS = frozenset({"admin", "templates", "urls"})

logger = logging.getLogger(__name__)


def run_worker_checks() -> list:
    """Run the system checks that concern a worker; log and return what they report."""
    from django.core.checks import registry

    messages = []
    for check in registry.registry.get_checks():
        if WEB_ONLY_CHECK_TAGS.isdisjoint(getattr(check, "tags", ())):
            messages.extend(check(app_configs=None, databases=None))
    reported = [message for message in messages if not message.is_silenced()]
    for message in reported:
        level = logging.ERROR if message.is_serious() else logging.WARNING
        logger.log(level, "system check: %s", message)
    return reported


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    # The fixup's checks would import what run_worker_checks leaves out.
    os.environ["CELERY_SKIP_CHECKS"] = "true"

    from celery import maybe_patch_concurrency

    maybe_patch_concurrency(["worker", *argv])  # eventlet/gevent, as `celery` does

    import django
    from celery.bin.base import CLIContext
    from celery.bin.worker import worker

    from config.celery_app import app

    django.setup()
    run_worker_checks()
    worker.main(
        args=argv,
        prog_name="python -m config.worker",
        # `celery` reads CELERY_WORKER_<OPTION> from the environment for the
        # worker's options (click's auto_envvar_prefix "CELERY" + "worker").
        auto_envvar_prefix="CELERY_WORKER",
        obj=CLIContext(app=app, no_color=False, workdir=None),
    )


if __name__ == "__main__":
    main()
