"""Sagas over HTTP: list, detail with the whole log, stats, and the operator's retry."""

from __future__ import annotations

from django_filters import rest_framework as filters
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
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
from sagas.errors import SagaNotFound
from sagas.models import Saga, SagaLog


class SagaFilterSet(filters.FilterSet):
    status = filters.ChoiceFilter(choices=Saga.Status.choices)
    saga_type = filters.ChoiceFilter(choices=[])
    created_after = filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = filters.IsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = Saga
        fields = ["status", "saga_type", "created_after", "created_before"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.filters["saga_type"].extra["choices"] = [(name, name) for name in registry.names()]


WINDOW_PARAMETERS = [
    OpenApiParameter("created_after", str, description="ISO 8601 time; sagas created at or after."),
    OpenApiParameter("created_before", str, description="ISO 8601 time; sagas created before."),
]


class SagaOutputSerializer(serializers.ModelSerializer):
    url = serializers.SerializerMethodField()

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
            "failure_reason",
            "resolved_at",
            "resolved_by",
            "resolution",
        ]

    def get_url(self, saga: Saga) -> str:
        return f"/api/sagas/{saga.id}/"


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
        responses={200: SagaOutputSerializer(many=True)},
    )
    def get(self, request: Request) -> Response:
        filterset = SagaFilterSet(
            request.query_params, queryset=selectors.sagas_visible_to(request.user)
        )
        if not filterset.is_valid():
            raise serializers.ValidationError(filterset.errors)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(filterset.qs, request, view=self)
        return paginator.get_paginated_response(SagaOutputSerializer(page, many=True).data)


class SagaDetailApi(APIView):
    permission_classes = [IsAuthenticated]

    class OutputSerializer(SagaOutputSerializer):
        class LogSerializer(serializers.ModelSerializer):
            class Meta:
                model = SagaLog
                fields = [
                    "id",
                    "step",
                    "step_index",
                    "phase",
                    "status",
                    "attempt",
                    "task_id",
                    "worker",
                    "started_at",
                    "finished_at",
                    "duration_ms",
                    "error",
                ]

        log = serializers.SerializerMethodField()

        class Meta(SagaOutputSerializer.Meta):
            fields = [*SagaOutputSerializer.Meta.fields, "log"]

        @extend_schema_field(LogSerializer(many=True))
        def get_log(self, saga: Saga) -> list[dict]:
            return self.LogSerializer(selectors.saga_log(saga_id=saga.id), many=True).data

    @extend_schema(operation_id="sagas_retrieve", responses={200: OutputSerializer})
    def get(self, request: Request, saga_id) -> Response:
        saga = selectors.sagas_visible_to(request.user).filter(pk=saga_id).first()
        if saga is None:
            raise SagaNotFound(f"saga {saga_id} does not exist")
        return Response(self.OutputSerializer(saga).data)


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
            202: OpenApiResponse(SagaOutputSerializer, description="Compensating again."),
            409: OpenApiResponse(description="The saga is not FAILED, or was resolved by hand."),
        },
    )
    def post(self, request: Request, saga_id) -> Response:
        saga = services.saga_retry_compensation(
            saga_id=saga_id, operator=request.user.get_username()
        )
        return Response(SagaOutputSerializer(saga).data, status=202)
