"""Sagas over HTTP: list, detail with the whole log, stats, and the operator's retry.

Customers see their saga's story: steps, phases, statuses, timing and a short
public reason. Worker hosts, task ids, raw errors and operators' names are for
staff, who get a serializer that extends the public one.
"""

from __future__ import annotations

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

from sagas import selectors, services
from sagas.definitions import registry
from sagas.errors import SagaNotFound, UnknownSagaType
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


class SagaDetailApi(APIView):
    permission_classes = [IsAuthenticated]

    class OutputSerializer(SagaOutputSerializer):
        log = serializers.SerializerMethodField()

        class Meta(SagaOutputSerializer.Meta):
            fields = [*SagaOutputSerializer.Meta.fields, "log"]

        @extend_schema_field(SagaLogOutputSerializer(many=True))
        def get_log(self, saga: Saga) -> list[dict]:
            return SagaLogOutputSerializer(selectors.saga_log(saga_id=saga.id), many=True).data

    @extend_schema_serializer(component_name="SagaDetailApiOutput")
    class StaffOutputSerializer(SagaStaffOutputSerializer):
        """A saga and its whole log. Staff also get the fields marked "Staff only"."""

        log = serializers.SerializerMethodField()

        class Meta(SagaStaffOutputSerializer.Meta):
            fields = [*SagaStaffOutputSerializer.Meta.fields, "log"]

        @extend_schema_field(SagaLogStaffOutputSerializer(many=True))
        def get_log(self, saga: Saga) -> list[dict]:
            return SagaLogStaffOutputSerializer(selectors.saga_log(saga_id=saga.id), many=True).data

    @extend_schema(operation_id="sagas_retrieve", responses={200: StaffOutputSerializer})
    def get(self, request: Request, saga_id) -> Response:
        saga = selectors.sagas_visible_to(request.user).filter(pk=saga_id).first()
        if saga is None:
            raise SagaNotFound(f"saga {saga_id} does not exist")
        output = self.StaffOutputSerializer if request.user.is_staff else self.OutputSerializer
        return Response(output(saga).data)


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
