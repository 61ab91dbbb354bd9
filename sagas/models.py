import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now


class Saga(models.Model):
    """One run of a saga type, acting for one business key.

    ``steps_done`` counts the actions that committed, in order; ``undo_cursor``
    counts the steps still to undo while compensating. Both move only through
    conditional UPDATEs in the same transaction as a step's effect, which is
    what makes redelivered and concurrent step messages harmless.
    """

    class Status(models.TextChoices):
        PENDING = "PENDING", "Pending"
        RUNNING = "RUNNING", "Running"
        COMPENSATING = "COMPENSATING", "Compensating"
        COMPLETED = "COMPLETED", "Completed"
        COMPENSATED = "COMPENSATED", "Compensated"
        FAILED = "FAILED", "Failed"

    TERMINAL = (Status.COMPLETED, Status.COMPENSATED, Status.FAILED)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    saga_type = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    business_key = models.CharField(max_length=128, db_index=True)
    # Whom the saga acts for: the API shows users their own sagas only.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    context = models.JSONField(default=dict, blank=True)
    # The last step or compensation that moved the saga (what runs now: sagas.graph.step_now).
    current_step = models.CharField(max_length=64, blank=True)
    steps_done = models.PositiveSmallIntegerField(default=0)
    undo_cursor = models.PositiveSmallIntegerField(default=0)
    # Compensation rounds: 1 when compensation begins, one more per operator
    # retry. Failure reports of an earlier round change nothing.
    round = models.PositiveSmallIntegerField(default=0, db_default=0)
    # Stamped by the database's clock, as are ``updated_at`` (every UPDATE sets
    # it to Now()) and ``deadline``: deadlines and stall checks compare them
    # with the database's clock, never with one host's against another's.
    created_at = models.DateTimeField(db_default=Now())
    dispatched_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    # Stored when the saga ends, so stats and metrics aggregate a column.
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    deadline = models.DateTimeField(null=True, blank=True)
    # When compensating must have ended (set as it begins, and again by each
    # operator retry); the sweeper sets one on a COMPENSATING saga that has none.
    compensation_deadline = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    # An operator who settled a FAILED saga by hand says so here.
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolved_by = models.CharField(max_length=150, blank=True)
    resolution = models.TextField(blank=True)
    # The W3C traceparent of the saga's span (sagas.tracing), written with the
    # row when tracing is on: every step attempt, in whatever process, joins
    # that trace from the row it loads anyway. Blank when tracing was off.
    trace_context = models.CharField(max_length=64, blank=True, default="", db_default="")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["status", "-created_at"], name="saga_status_created"),
            models.Index(fields=["saga_type", "-created_at"], name="saga_type_created"),
            models.Index(fields=["-created_at"], name="saga_created"),
            models.Index(fields=["saga_type", "finished_at"], name="saga_type_finished"),
            models.Index(fields=["owner", "-created_at"], name="saga_owner_created"),
            # Stats at millions of rows: counts and duration percentiles by type
            # come from index-only scans.
            models.Index(fields=["saga_type", "status"], name="saga_type_status"),
            models.Index(
                fields=["saga_type", "duration_ms"],
                name="saga_type_duration",
                condition=Q(duration_ms__isnull=False),
            ),
            # FAILED sagas no operator has settled, newest first (the live page polls
            # them every second): only those rows, so resolved failures cost nothing.
            models.Index(
                fields=["-created_at"],
                name="saga_awaiting_operator",
                condition=Q(status="FAILED", resolved_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.saga_type} {self.id} ({self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL

    @property
    def is_resolved(self) -> bool:
        return self.resolved_at is not None


class SagaLog(models.Model):
    """Append-only history: one row per step attempt and phase.

    A SUCCEEDED or SKIPPED row is also the barrier of its (saga, step, phase):
    the partial unique constraint lets at most one exist, written in the same
    transaction as the step's effect.
    """

    class Phase(models.TextChoices):
        ACTION = "action", "Action"
        COMPENSATION = "compensation", "Compensation"
        OPERATOR = "operator", "Operator"

    class Status(models.TextChoices):
        STARTED = "started", "Called out, answer pending"
        SUCCEEDED = "succeeded", "Succeeded"
        SKIPPED = "skipped", "Skipped"
        RETRYING = "retrying", "Failed, will retry"
        FAILED = "failed", "Failed"
        TIMED_OUT = "timed_out", "Timed out (may have had an effect)"
        DUPLICATE = "duplicate", "Duplicate delivery, ignored"
        IGNORED = "ignored", "Arrived too late, ignored"
        LOST = "lost", "Delivered again: the worker running it was lost"
        NOTE = "note", "Operator note"

    DONE = (Status.SUCCEEDED, Status.SKIPPED)

    # Lookups by saga use sagalog_saga_started (saga, started_at): an index
    # on the key alone would only cost every insert.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="logs", db_index=False)
    step = models.CharField(max_length=64)
    step_index = models.PositiveSmallIntegerField()
    phase = models.CharField(max_length=16, choices=Phase.choices)
    status = models.CharField(max_length=16, choices=Status.choices)
    attempt = models.PositiveSmallIntegerField(default=1)
    # The compensation round the row belongs to (0 for actions and notes).
    round = models.PositiveSmallIntegerField(default=0, db_default=0)
    # This attempt may have had its effect although it failed (its answer was
    # lost, it hit a time limit, or an earlier delivery was lost with its worker).
    may_have_effect = models.BooleanField(default=False, db_default=False)
    task_id = models.CharField(max_length=255, blank=True)
    worker = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True)

    class Meta:
        # Insertion order, which the database assigns: hosts whose clocks
        # disagree cannot reorder a saga's history.
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["saga", "step", "phase"],
                condition=Q(status__in=["succeeded", "skipped"]),
                name="sagalog_one_success_per_step_phase",
            ),
        ]
        indexes = [models.Index(fields=["saga", "started_at"], name="sagalog_saga_started")]

    def __str__(self) -> str:
        return f"{self.step} {self.phase} #{self.attempt}: {self.status}"
