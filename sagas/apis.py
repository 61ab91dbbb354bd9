"""Sagas over HTTP: list, detail with the whole log, stats, and the operator's retry.

Customers see their saga's story: steps, phases, statuses, timing and a short
public reason. Worker hosts, task ids, raw errors and operators' names are for
staff, who get a serializer that extends the public one.
"""

from __future__ import annotations

from django.core.cache import cache
from django_filters import rest_framework as filters
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_serializer,
)
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.permissions import IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from sagas import feed, selectors, services
from sagas.definitions import registry
from sagas.errors import SagaNotFound, UnknownSagaType
from sagas.graph import CELL_STATES
from sagas.models import Saga, SagaLog


class SagaFilterSet(filters.FilterSet):
    status = filters.ChoiceFilter(choices=Saga.Status.choices)
    saga_type = filters.ChoiceFilter(choices=[])
    created_after = filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Saga
        fields = ["status", "saga_type", "created_after", "created_before"]

    def __init__(self, data=None, *args, **kwargs):
        if data is not None and data.get("status"):
            data = data.copy()  # a request's QueryDict is immutable
            data["status"] = data["status"].upper()  # ?status=failed reads as FAILED
        super().__init__(data, *args, **kwargs)
        self.filters["saga_type"].extra["choices"] = [(name, name) for name in registry.names()]


WINDOW_PARAMETERS = [
    OpenApiParameter("created_after", str, description="ISO 8601 time; sagas created at or after."),
    OpenApiParameter("created_before", str, description="ISO 8601 time; sagas created before."),
]


def staff_only(**descriptions: str) -> dict[str, dict]:
    """``Meta.extra_kwargs`` for fields only staff get: documented as optional."""
    return {
        name: {"required": False, "help_text": f"Staff only: {text}"}
        for name, text in descriptions.items()
    }


# Public reasons come from statuses, phases and step names alone, never from the
# raw error text: that holds exception messages, idempotency keys and operators' names.
LOG_REASONS = {
    SagaLog.Status.STARTED: "in progress",
    SagaLog.Status.SUCCEEDED: "",
    SagaLog.Status.SKIPPED: "nothing to undo",
    SagaLog.Status.RETRYING: "temporary problem; tried again",
    SagaLog.Status.FAILED: "could not be completed",
    SagaLog.Status.TIMED_OUT: "no answer in time; undone to be safe",
    SagaLog.Status.DUPLICATE: "repeated delivery; ignored",
    SagaLog.Status.IGNORED: "arrived out of turn; ignored",
    SagaLog.Status.NOTE: "reviewed by our team",
}
# A compensation that timed out is retried, not undone in turn.
COMPENSATION_LOG_REASONS = {**LOG_REASONS, SagaLog.Status.TIMED_OUT: "no answer in time"}


def saga_step_name(saga: Saga, index: int | None) -> str:
    """The name of step ``index`` of the saga's type, or "a step" if there is none."""
    try:
        steps = registry.get(saga.saga_type).steps
    except UnknownSagaType:
        return "a step"
    return steps[index].name if index is not None and index < len(steps) else "a step"


def saga_public_reason(saga: Saga) -> str:
    # ``current_step`` names the last step that succeeded, not the one that
    # failed: that one is the step after the actions done, and the compensation
    # that failed is the next one due below the undo cursor.
    failed = saga_step_name(saga, saga.steps_done)
    if saga.status == Saga.Status.COMPENSATING:
        return f"{failed} could not be completed; undoing the steps already done"
    if saga.status == Saga.Status.COMPENSATED:
        return f"{failed} could not be completed; every step already done was undone"
    if saga.status == Saga.Status.FAILED:
        try:
            due = registry.get(saga.saga_type).next_to_undo(saga.undo_cursor)
        except UnknownSagaType:
            due = None
        outcome = "settled by our team" if saga.is_resolved else "our team has been alerted"
        return f"undoing {saga_step_name(saga, due)} failed; {outcome}"
    return ""


class SagaLogOutputSerializer(serializers.ModelSerializer):
    reason = serializers.SerializerMethodField(
        help_text="A short public account of this row, from its status and phase alone."
    )

    class Meta:
        model = SagaLog
        fields = [
            "id",
            "step",
            "step_index",
            "phase",
            "status",
            "attempt",
            "started_at",
            "finished_at",
            "duration_ms",
            "reason",
        ]

    def get_reason(self, row: SagaLog) -> str:
        reasons = (
            COMPENSATION_LOG_REASONS if row.phase == SagaLog.Phase.COMPENSATION else LOG_REASONS
        )
        return reasons.get(row.status, "")


# One component documents both shapes: the fields only staff get are optional.
@extend_schema_serializer(component_name="SagaDetailApiOutputLog")
class SagaLogStaffOutputSerializer(SagaLogOutputSerializer):
    """One attempt of a step, or an operator's note. Staff also get its task, worker and error."""

    class Meta(SagaLogOutputSerializer.Meta):
        extra_kwargs = staff_only(
            task_id="the Celery task id of this attempt.",
            worker="the worker that ran it.",
            error="the raw error, or the operator's note.",
        )
        fields = [*SagaLogOutputSerializer.Meta.fields, *extra_kwargs]


class SagaOutputSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()
    reason = serializers.SerializerMethodField(
        help_text="A short public account of how the saga went, from its status and step names."
    )

    class Meta:
        model = Saga
        fields = [
            "id",
            "url",
            "saga_type",
            "status",
            "business_key",
            "current_step",
            "steps_done",
            "created_at",
            "started_at",
            "finished_at",
            "duration_ms",
            "deadline",
            "reason",
            "resolved_at",
        ]

    def get_url(self, saga: Saga) -> str:
        return f"/api/sagas/{saga.id}/"

    def get_reason(self, saga: Saga) -> str:
        return saga_public_reason(saga)


@extend_schema_serializer(component_name="SagaOutput")
class SagaStaffOutputSerializer(SagaOutputSerializer):
    """A saga. Staff also get the raw failure reason and how an operator settled it."""

    class Meta(SagaOutputSerializer.Meta):
        extra_kwargs = staff_only(
            failure_reason="the raw cause of the failure.",
            resolved_by="the operator who settled it by hand.",
            resolution="how the operator settled it.",
        )
        fields = [*SagaOutputSerializer.Meta.fields, *extra_kwargs]


class SagaCursorPagination(CursorPagination):
    """Newest first, by an indexed column: no COUNT(*) and no OFFSET, at any table size."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def paginate_queryset(self, queryset, request, view=None):
        try:
            return super().paginate_queryset(queryset, request, view)
        except NotFound as exc:
            raise serializers.ValidationError(
                {self.cursor_query_param: [str(exc.detail)]}
            ) from None


class SagaListApi(APIView):
    permission_classes = [IsAuthenticated]
    pagination_class = SagaCursorPagination

    @extend_schema(
        operation_id="sagas_list",
        parameters=[
            OpenApiParameter("status", str, enum=Saga.Status.values),
            OpenApiParameter("saga_type", str, description="A registered saga type."),
            *WINDOW_PARAMETERS,
        ],
        responses={200: SagaStaffOutputSerializer(many=True)},
    )
    def get(self, request: Request) -> Response:
        filterset = SagaFilterSet(
            request.query_params, queryset=selectors.sagas_visible_to(request.user)
        )
        if not filterset.is_valid():
            raise serializers.ValidationError(filterset.errors)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(filterset.qs, request, view=self)
        output = SagaStaffOutputSerializer if request.user.is_staff else SagaOutputSerializer
        return paginator.get_paginated_response(output(page, many=True).data)


class CursorSerializer(serializers.Serializer):
    after = serializers.IntegerField(
        required=False,
        min_value=0,
        error_messages={"invalid": "must be the cursor of an earlier answer (a whole number)."},
    )


AFTER_PARAMETER = OpenApiParameter(
    "after",
    str,
    description=(
        "The `cursor` of an earlier answer: only log rows recorded after it are listed. "
        "Rows of the last few seconds can come again on the next poll (a row may commit "
        "after a newer one, and a called-out step's row gets its outcome later): keep the "
        "latest copy of each row by id."
    ),
)


class GraphCellSerializer(serializers.Serializer):
    """One node: a step's action or its compensation."""

    name = serializers.CharField()
    state = serializers.ChoiceField(choices=CELL_STATES)
    label = serializers.CharField()
    attempts = serializers.IntegerField()
    retries = serializers.IntegerField()
    duplicates = serializers.IntegerField(help_text="Repeated or out-of-turn deliveries, ignored.")
    redelivered = serializers.IntegerField(
        help_text="Deliveries run again because the worker running one was lost."
    )
    failing = serializers.BooleanField(help_text="The step whose failure made the saga undo.")
    healed = serializers.BooleanField(help_text="Failed once, then succeeded on a retry.")
    order = serializers.IntegerField(help_text="Compensations: 1-based order they ran in.")
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)


class GraphStepSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    action = GraphCellSerializer()
    compensation = GraphCellSerializer(allow_null=True)
    flows_right = serializers.BooleanField(help_text="The forward path reached this step.")
    flows_left = serializers.BooleanField(help_text="The rollback path went back past it.")
    turn = serializers.BooleanField(help_text="The rollback began here.")


class GraphSerializer(serializers.Serializer):
    """The saga as a graph, from its type's definition and its log."""

    status = serializers.ChoiceField(choices=Saga.Status.choices)
    terminal = serializers.BooleanField(help_text="Ended: the graph no longer changes.")
    resolved = serializers.BooleanField(help_text="FAILED, and settled by an operator.")
    steps = GraphStepSerializer(many=True)
    compensating = serializers.BooleanField()
    failing_action = serializers.CharField()
    failing_compensation = serializers.CharField()
    notes = serializers.IntegerField(help_text="Operators' notes in the log.")
    step_now = serializers.CharField(help_text="The action or compensation running now.")


class SagaDetailApi(APIView):
    """A saga, its graph and its log; with ``?after=``, the rows since an earlier answer."""

    permission_classes = [IsAuthenticated]

    class OutputSerializer(SagaOutputSerializer):
        log = serializers.SerializerMethodField()
        cursor = serializers.SerializerMethodField(
            help_text="Pass as `after` to get only what was recorded since."
        )
        graph = serializers.SerializerMethodField()
        log_serializer = SagaLogOutputSerializer

        class Meta(SagaOutputSerializer.Meta):
            fields = [*SagaOutputSerializer.Meta.fields, "cursor", "graph", "log"]

        @extend_schema_field(SagaLogOutputSerializer(many=True))
        def get_log(self, saga: Saga) -> list[dict]:
            return self.log_serializer(self.context["log"], many=True).data

        def get_cursor(self, saga: Saga) -> str:
            return str(self.context["cursor"])

        @extend_schema_field(GraphSerializer(allow_null=True))
        def get_graph(self, saga: Saga) -> dict | None:
            return self.context["graph"]

    @extend_schema_serializer(component_name="SagaDetailApiOutput")
    class StaffOutputSerializer(SagaStaffOutputSerializer, OutputSerializer):
        """A saga, its graph and its log. Staff also get the fields marked "Staff only"."""

        log_serializer = SagaLogStaffOutputSerializer

        class Meta(SagaStaffOutputSerializer.Meta):
            fields = [*SagaStaffOutputSerializer.Meta.fields, "cursor", "graph", "log"]

        @extend_schema_field(SagaLogStaffOutputSerializer(many=True))
        def get_log(self, saga: Saga) -> list[dict]:
            return self.log_serializer(self.context["log"], many=True).data

    @extend_schema(
        operation_id="sagas_retrieve",
        parameters=[AFTER_PARAMETER],
        responses={200: StaffOutputSerializer},
    )
    def get(self, request: Request, saga_id) -> Response:
        cursor = CursorSerializer(data=request.query_params)
        cursor.is_valid(raise_exception=True)
        after = cursor.validated_data.get("after")
        saga = selectors.sagas_visible_to(request.user).filter(pk=saga_id).first()
        if saga is None:
            raise SagaNotFound(f"saga {saga_id} does not exist")
        rows = list(selectors.saga_log(saga_id=saga.id))
        new = rows if after is None else [row for row in rows if row.id > after]
        context = {
            "log": new,
            "cursor": feed.next_cursor(new, after or 0),
            "graph": feed.graph_data(saga, rows),
        }
        output = self.StaffOutputSerializer if request.user.is_staff else self.OutputSerializer
        return Response(output(saga, context=context).data)


LIVE_SUMMARY_CACHE_S = 1


class SagaLiveApi(APIView):
    """What is happening now: transitions since a cursor, sagas in flight, rates, FAILED sagas."""

    permission_classes = [IsAuthenticated]

    class OutputSerializer(serializers.Serializer):
        class EventSerializer(serializers.Serializer):
            id = serializers.IntegerField()
            saga_id = serializers.UUIDField()
            saga_type = serializers.CharField()
            saga_status = serializers.ChoiceField(choices=Saga.Status.choices)
            step = serializers.CharField()
            phase = serializers.ChoiceField(choices=SagaLog.Phase.choices)
            status = serializers.ChoiceField(choices=SagaLog.Status.choices)
            attempt = serializers.IntegerField()
            kind = serializers.ChoiceField(choices=feed.KINDS)
            at = serializers.DateTimeField()
            duration_ms = serializers.IntegerField()

        class InFlightSerializer(serializers.Serializer):
            saga_type = serializers.CharField()
            status = serializers.ChoiceField(choices=Saga.Status.choices)
            step = serializers.CharField(help_text="The action or compensation running now.")
            count = serializers.IntegerField()

        class RatesSerializer(serializers.Serializer):
            started = serializers.IntegerField()
            completed = serializers.IntegerField()
            compensated = serializers.IntegerField()
            failed = serializers.IntegerField()

        class AwaitingSerializer(serializers.Serializer):
            count = serializers.IntegerField(help_text=f"Capped at {feed.AWAITING_COUNTED + 1}.")
            sagas = SagaStaffOutputSerializer(many=True)

        cursor = serializers.CharField(help_text="Pass as `after` on the next poll.")
        events = EventSerializer(many=True, help_text="Transitions after the cursor, oldest first.")
        in_flight = InFlightSerializer(many=True)
        rates_per_minute = serializers.DictField(
            child=RatesSerializer(), help_text="By saga type, over the last minute."
        )
        awaiting_operator = AwaitingSerializer(help_text="FAILED sagas no operator settled yet.")

    @extend_schema(
        operation_id="sagas_live",
        parameters=[
            OpenApiParameter(
                "after",
                str,
                description=(
                    "The `cursor` of the previous answer: only transitions recorded since "
                    "are listed, each once (rows that commit late come when they appear)."
                ),
            )
        ],
        responses={200: OutputSerializer},
    )
    def get(self, request: Request) -> Response:
        after = request.query_params.get("after")
        try:
            cursor = None if after is None else feed.FleetCursor.parse(after)
        except ValueError as exc:
            raise serializers.ValidationError({"after": [str(exc)]}) from None
        user = request.user
        events, next_cursor = feed.transitions(owner=None if user.is_staff else user, after=cursor)
        # The fleet's numbers change by the second, and every open page asks for them:
        # read them once a second per process and viewer, however many pages poll.
        viewer = "staff" if user.is_staff else f"owner:{user.pk}"
        summary = cache.get_or_set(
            f"sagas:live:{viewer}", lambda: self.summary(user), LIVE_SUMMARY_CACHE_S
        )
        return Response(
            {
                "cursor": str(next_cursor),
                "events": self.OutputSerializer.EventSerializer(events, many=True).data,
                **summary,
            }
        )

    @staticmethod
    def summary(user) -> dict:
        sagas = selectors.sagas_visible_to(user)
        failed, failed_count = feed.awaiting_operator(sagas)
        output = SagaStaffOutputSerializer if user.is_staff else SagaOutputSerializer
        return {
            "in_flight": feed.in_flight(sagas),
            "rates_per_minute": feed.rates(sagas),
            "awaiting_operator": {"count": failed_count, "sagas": output(failed, many=True).data},
        }


class SagaStatsApi(APIView):
    permission_classes = [IsAuthenticated]

    class WindowSerializer(serializers.Serializer):
        created_after = serializers.DateTimeField(required=False)
        created_before = serializers.DateTimeField(required=False)

        def validate(self, data):
            after, before = data.get("created_after"), data.get("created_before")
            if after and before and after >= before:
                raise serializers.ValidationError(
                    {"created_before": "must be later than created_after"}
                )
            return data

    class OutputSerializer(serializers.Serializer):
        class RatesSerializer(serializers.Serializer):
            total = serializers.IntegerField()
            by_status = serializers.DictField(child=serializers.IntegerField())
            success_rate = serializers.FloatField(allow_null=True)
            compensation_rate = serializers.FloatField(allow_null=True)

        class TypeSerializer(RatesSerializer):
            class DurationSerializer(serializers.Serializer):
                p50 = serializers.FloatField(allow_null=True)
                p95 = serializers.FloatField(allow_null=True)

            duration_ms = DurationSerializer()

        class WindowSerializer(serializers.Serializer):
            created_after = serializers.DateTimeField(allow_null=True)
            created_before = serializers.DateTimeField(allow_null=True)

        window = WindowSerializer()
        total = serializers.IntegerField()
        by_status = serializers.DictField(child=serializers.IntegerField())
        success_rate = serializers.FloatField(allow_null=True)
        compensation_rate = serializers.FloatField(allow_null=True)
        by_type = serializers.DictField(child=TypeSerializer())

    @extend_schema(
        operation_id="sagas_stats",
        parameters=WINDOW_PARAMETERS,
        responses={200: OutputSerializer},
    )
    def get(self, request: Request) -> Response:
        window = self.WindowSerializer(data=request.query_params)
        window.is_valid(raise_exception=True)
        stats = selectors.saga_stats(
            sagas=selectors.sagas_visible_to(request.user), **window.validated_data
        )
        return Response(self.OutputSerializer(stats).data)


class SagaRetryCompensationApi(APIView):
    """Staff only: compensate a FAILED saga again from where it stopped."""

    permission_classes = [IsAdminUser]

    @extend_schema(
        operation_id="sagas_retry_compensation",
        request=None,
        responses={
            202: OpenApiResponse(SagaStaffOutputSerializer, description="Compensating again."),
            409: OpenApiResponse(description="The saga is not FAILED, or was resolved by hand."),
        },
    )
    def post(self, request: Request, saga_id) -> Response:
        saga = services.saga_retry_compensation(
            saga_id=saga_id, operator=request.user.get_username()
        )
        return Response(SagaStaffOutputSerializer(saga).data, status=202)
