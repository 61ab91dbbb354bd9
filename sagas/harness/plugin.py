"""What the chaos and bench harness needs to know of one saga type: its plug-in.

The engine brings the generic parts (workers, faults, the run loop, the
generic invariants, the report). A saga type brings a :class:`SagaHarness`
subclass and names it next to its definition::

    SagaDefinition("trip_booking", steps=[...], harness="bookings.harness.TripHarness")

The path is imported only by ``manage.py chaos`` and ``manage.py bench``, so
web and worker processes never load any of it. A plug-in must be able to
start sagas of its type, say what its domain invariants are, and remove what
its runs created; the bench's bare-chain baseline is optional.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string
from django_celery_results.models import TaskResult

from sagas.definitions import SagaDefinition, registry
from sagas.harness.db import retry_db
from sagas.models import Saga

logger = logging.getLogger(__name__)

CHUNK = 500
DETAILS_KEPT = 10


class HarnessError(Exception):
    """A saga type cannot be run by chaos or bench; the message says why."""


def chunks(values: list, size: int = CHUNK) -> Iterator[list]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


@dataclass
class InvariantResult:
    """One invariant over a run: its offenders (saga ids, SKUs, ...) and why, for the first few."""

    name: str
    description: str
    offenders: list[str] = field(default_factory=list)
    details: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return not self.offenders

    def flag(self, offender: Any, reason: str) -> None:
        key = str(offender)
        if key in self.details or key in self.offenders:
            self.details[key] = f"{self.details.get(key, '')}; {reason}".lstrip("; ")
            return
        self.offenders.append(key)
        if len(self.details) < DETAILS_KEPT:
            self.details[key] = reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "passed": self.passed,
            "offenders": self.offenders,
            "offender_count": len(self.offenders),
            "details": self.details,
            "note": self.note,
        }


BareStep = tuple[str, Callable[[], Any]]


class SagaHarness:
    """The plug-in of one saga type. Subclass it; every run makes a new instance.

    ``purpose`` is ``"chaos"`` or ``"bench"``, ``run_id`` is unique per run:
    name what the run creates after them, so that ``cleanup`` finds it.
    """

    #: Modules the bench's worker imports besides the product's own tasks
    #: (the bare-chain baseline's tasks, say). Production workers never do.
    worker_includes: tuple[str, ...] = ()
    #: Settings that hold the broker's Redis URL besides REDIS_URL; a chaos run
    #: with its own broker points them at it too.
    follows_broker: tuple[str, ...] = ()
    #: Saga types and their shares for ``seed_sagas``; by default this type only.
    seed_mix: dict[str, float] | None = None
    #: The chaos command's domain flags this plug-in carries out (e.g. "--cancel-rate").
    chaos_flags: tuple[str, ...] = ()

    def __init__(self, definition: SagaDefinition, *, purpose: str, run_id: str) -> None:
        self.definition = definition
        self.purpose = purpose
        self.run_id = run_id
        # Every saga the harness started through this plug-in, for the clean-up.
        self.saga_ids: list[str] = []

    # --- what every plug-in provides ---------------------------------------------
    def prepare(self, *, sagas: int, capacity: int | None = None) -> None:
        """Create what ``sagas`` sagas of the run need (stock, a customer, ...)."""

    def start(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        """Start the run's ``index``-th saga, committed and published; return its id."""
        raise NotImplementedError

    def start_unpublished(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        """The ``index``-th saga RUNNING but not published: the bench runs its steps in-process.

        :func:`unpublished_saga` writes the saga row as ``saga_start`` and
        ``saga_publish`` would leave it.
        """
        raise NotImplementedError

    # --- a chaos run's domain faults (optional) ----------------------------------
    def configure(self, options: Any, *, seed: int) -> None:
        """Take a chaos run's options before it starts (the flags in ``chaos_flags``).

        Raise ``ValueError`` naming the flag if this world cannot honour it.
        """

    def follow_up(self, saga_id: str, *, chaos: dict[str, Any] | None) -> str | None:
        """Start the follow-up of a saga that just ended (``--cancel-rate``: a cancellation).

        Return the new saga's id, or None if this saga has none to follow it.
        """
        return None

    @property
    def follow_up_type(self) -> str:
        """The saga type ``follow_up`` starts; empty if it starts none."""
        return ""

    def tick(self, *, at_s: float, dispatched: int, total: int) -> list[str]:
        """Called on every tick of a chaos run: faults on a schedule. Returns what to report."""
        return []

    def domain_faults(self) -> dict[str, int]:
        """How many of each domain fault the run injected, for its report."""
        return {}

    def invariants(self, saga_ids: list[str]) -> list[InvariantResult]:
        """The domain's invariants over the run's sagas, once every saga has settled."""
        return []

    def cleanup(self) -> dict[str, int]:
        """Delete the domain rows the run created; return counts by kind. Sagas are the caller's."""
        return {}

    # --- the bench's bare-chain baseline (optional) ------------------------------
    def bare_task_names(self) -> list[str]:
        """Names of the bare chain's tasks; none means the bench has no bare baseline."""
        return []

    def bare_start(self, index: int, *, last_task_id: str) -> float:
        """Create the ``index``-th bare run's rows and publish its chain after commit.

        The chain's last task gets ``last_task_id`` and must return
        ``{"done_at": time.time()}`` after its commit; returns the epoch
        time at which the rows were created (the start of its latency).
        """
        raise NotImplementedError

    def bare_steps(self, index: int) -> list[BareStep]:
        """The bare chain's step bodies for the ``index``-th bare run, to run in-process."""
        raise NotImplementedError

    @property
    def has_bare_chain(self) -> bool:
        return bool(self.bare_task_names())


def harness_for(saga_type: str, *, purpose: str, run_id: str) -> SagaHarness:
    """The plug-in of ``saga_type`` for one run; HarnessError if it has none."""
    definition = registry.get(saga_type)
    return harness_class(definition)(definition, purpose=purpose, run_id=run_id)


def harness_class(definition: SagaDefinition) -> type[SagaHarness]:
    """The plug-in class a definition names; HarnessError naming the types that have one."""
    saga_type = definition.name
    if not definition.harness:
        usable = [d.name for d in registry.all() if d.harness]
        raise HarnessError(
            f"saga type {saga_type!r} has no chaos/bench plug-in "
            f"(SagaDefinition(..., harness='module.Class')); types that have one: "
            f"{', '.join(usable) or 'none'}"
        )
    try:
        plugin = import_string(definition.harness)
    except ImportError as exc:
        raise HarnessError(f"saga type {saga_type!r}: cannot import its plug-in: {exc}") from None
    if not (isinstance(plugin, type) and issubclass(plugin, SagaHarness)):
        raise HarnessError(f"{definition.harness} is not a sagas.harness.SagaHarness subclass")
    return plugin


def unpublished_saga(
    *,
    definition: SagaDefinition,
    business_key: str,
    context: dict[str, Any],
    owner=None,
) -> Saga:
    """A RUNNING saga as ``saga_start`` and ``saga_publish`` leave it, but published nowhere."""
    now = timezone.now()
    return Saga.objects.create(
        saga_type=definition.name,
        business_key=business_key,
        owner=owner,
        context=context,
        deadline=now + timedelta(seconds=definition.deadline_s),
        status=Saga.Status.RUNNING,
        dispatched_at=now,
        started_at=now,
    )


def clean_up_run(
    harness: SagaHarness, *, task_ids: list[str], since, say: Callable[[str], None]
) -> dict[str, int] | None:
    """Delete what a run created: its sagas, their stored results, the plug-in's rows.

    Call it once the run's workers stopped; it outlasts a database restart
    (``retry_db``). Sagas go first: a late copy of one
    of their steps then finds no saga and does nothing, so no domain row can
    appear behind the clean-up. Returns the counts by kind, or None (having
    said why) if it failed: a run's report matters more than its clean-up.
    """

    def delete() -> dict[str, int]:
        # Safe to run again: what a first try deleted is simply not found.
        counts = {"sagas": delete_sagas(harness.saga_ids)}
        counts["task_results"] = delete_task_results(
            task_ids=task_ids, saga_ids=harness.saga_ids, since=since
        )
        counts.update(harness.cleanup())
        return counts

    try:
        counts = retry_db(delete, what=f"cleaning up run {harness.run_id}")
    except Exception as exc:
        logger.warning("cleaning up run %s failed", harness.run_id, exc_info=True)
        say(f"warning: could not delete what run {harness.run_id} created: {exc}")
        return None
    done = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "nothing to delete"
    say(f"cleaned up: {done} (pass --keep to keep them)")
    return counts


def delete_sagas(saga_ids: list[str]) -> int:
    """Delete a run's sagas with their logs; returns how many sagas.

    Each chunk is locked first, so a step still holding one of them finishes
    before it goes, and a step arriving later finds no saga and does nothing.
    """
    deleted = 0
    for chunk in chunks([str(saga_id) for saga_id in saga_ids]):
        with transaction.atomic():
            list(Saga.objects.select_for_update().filter(pk__in=chunk).values_list("pk"))
            deleted += Saga.objects.filter(pk__in=chunk).delete()[1].get(Saga._meta.label, 0)
    return deleted


def delete_task_results(*, task_ids: list[str] = (), saga_ids: list[str] = (), since) -> int:
    """Delete the results stored for a run's tasks: by id, or by the saga id in their kwargs.

    Only results stored since the run began are looked at, so a busy result
    table is not scanned and other sagas' results are never touched.
    """
    wanted = {str(saga_id) for saga_id in saga_ids}
    doomed = [str(task_id) for task_id in task_ids]
    if wanted:
        recent = TaskResult.objects.filter(date_done__gte=since).values_list("id", "task_kwargs")
        doomed_pks = [pk for pk, kwargs in recent.iterator() if _names_saga(kwargs or "", wanted)]
    else:
        doomed_pks = []
    deleted = 0
    for chunk in chunks(doomed):
        deleted += TaskResult.objects.filter(task_id__in=chunk).delete()[0]
    for chunk in chunks(doomed_pks):
        deleted += TaskResult.objects.filter(pk__in=chunk).delete()[0]
    return deleted


# result_extended stores kwargs as their repr ("{'saga_id': '…'}") or, for
# some failures, as JSON ('{"saga_id": "…"}').
_SAGA_ID = re.compile(r"""saga_id['"]\s*:\s*['"]([0-9a-fA-F-]{36})""")


def _names_saga(kwargs: str, saga_ids: set[str]) -> bool:
    found = _SAGA_ID.search(kwargs)
    return found is not None and found.group(1) in saga_ids
