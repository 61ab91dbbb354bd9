"""Starting `celery worker` subprocesses for the bench and chaos commands.

Both run workers of their own against the database and broker the command
itself uses (under pytest: the test database), and both must not leave them
behind if the command dies. Both also say, before they start, which database
and broker they are about to use.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import dj_database_url
from django.conf import settings

from sagas.definitions import SAGA_QUEUE, SagaDefinition


def database_url(database: dict) -> str:
    """A DATABASE_URL for the database Django uses now; ValueError if workers can't share it.

    The environment's own DATABASE_URL is passed on unchanged when it names
    that database, so options such as ``sslmode`` survive.
    """
    engine = database["ENGINE"]
    name = str(database["NAME"])
    inherited = os.environ.get("DATABASE_URL", "")
    if inherited and dj_database_url.parse(inherited).get("NAME") == database["NAME"]:
        return inherited
    if engine == "django.db.backends.sqlite3":
        if name == ":memory:" or name.startswith("file:"):
            raise ValueError("an in-memory SQLite database cannot be shared with worker processes")
        return f"sqlite:///{Path(name).resolve()}"
    if engine.startswith("django.db.backends.postgresql"):
        user = quote(database.get("USER") or "", safe="")
        password = quote(database.get("PASSWORD") or "", safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = quote(database.get("HOST") or "localhost", safe="")  # a socket directory too
        port = f":{database['PORT']}" if database.get("PORT") else ""
        return f"postgres://{auth}{host}{port}/{quote(name, safe='')}"
    raise ValueError(f"workers can run on PostgreSQL or SQLite, not {engine}")


def worker_environment(*, broker_url: str) -> dict[str, str]:
    """This process's environment, pointed at its own settings, database and broker."""
    env = dict(os.environ)
    env.update(
        # Under override_settings the holder has no module: the environment's is the same one.
        DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE or os.environ["DJANGO_SETTINGS_MODULE"],
        DATABASE_URL=database_url(settings.DATABASES["default"]),
        REDIS_URL=broker_url,
    )
    return env


def describe_backends(*, broker_url: str, database: dict | None = None) -> str:
    """The database (default: Django's) and broker a run uses, in one line, no passwords."""
    database = database or settings.DATABASES["default"]
    engine = database["ENGINE"].rsplit(".", 1)[-1]
    if engine == "sqlite3":
        where = f"SQLite {database['NAME']}"
    else:
        host = database.get("HOST") or "localhost"
        port = f":{database['PORT']}" if database.get("PORT") else ""
        where = f"{engine} database {database['NAME']!r} on {host}{port}"
    return f"{where}; broker {_without_password(broker_url)}"


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def queues_of(definition: SagaDefinition) -> tuple[str, ...]:
    """The saga queue and every queue a step of ``definition`` runs on."""
    return tuple(sorted({SAGA_QUEUE, *(step.queue for step in definition.steps)}))


def worker_argv(
    *,
    name: str,
    queues: tuple[str, ...],
    concurrency: int,
    includes: tuple[str, ...] = (),
    events: bool = False,
    loglevel: str = "WARNING",
    gossip: bool = False,
    prefetch: int | None = None,
) -> list[str]:
    """The Procfile's worker (prefork) for a harness: no gossip or mingle, warnings only.

    ``python -m config.worker`` takes ``celery -A config worker``'s options and
    imports less (see config/worker.py), as production workers do. ``gossip``
    and ``loglevel`` let the bench measure what they cost; ``prefetch`` overrides
    the prefetch multiplier of the settings (``bench --pipeline``).
    """
    return [
        *(sys.executable, "-m", "config.worker", "-P", "prefork", "-c", str(concurrency)),
        *(("-E",) if events else ()),
        *("-n", name, "-Q", ",".join(queues)),
        *(("--include", ",".join(includes)) if includes else ()),
        *(() if gossip else ("--without-gossip", "--without-mingle")),
        *("--loglevel", loglevel),
        *(("--prefetch-multiplier", str(prefetch)) if prefetch is not None else ()),
    ]


def die_with_parent() -> Callable[[], None] | None:
    """A preexec function: the kernel sends the child SIGTERM if this process dies (Linux).

    libc is looked up here, before forking, so the child only makes one call.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


def child_pids(pid: int) -> list[int]:
    """The children of ``pid``, forked by any of its threads (a prefork pool respawns from one)."""
    children: list[int] = []
    readable = False
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
            readable = True
        except OSError:
            continue
    return sorted(set(children)) if readable else _children_by_scan(pid)


def _children_by_scan(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name is in parentheses and may hold spaces: split after it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return sorted(children)
