"""GET /healthz: can this process reach the database and the broker?"""

from django.db import connection
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.celery_app import app as celery_app

BROKER_TIMEOUT_S = 2


def check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def check_broker() -> str:
    with celery_app.connection_for_write(connect_timeout=BROKER_TIMEOUT_S) as conn:
        conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
    return "ok"


class HealthApi(APIView):
    """Liveness for load balancers and orchestrators: anonymous, cheap, no secrets."""

    authentication_classes = []
    permission_classes = [AllowAny]
    checks = {"database": check_database, "broker": check_broker}

    @extend_schema(
        operation_id="healthz",
        auth=[],
        responses={
            (200, "application/json"): inline_serializer(
                "Health",
                {"status": serializers.CharField(), "checks": serializers.DictField()},
            ),
            (503, "application/json"): inline_serializer(
                "Unhealthy",
                {"status": serializers.CharField(), "checks": serializers.DictField()},
            ),
        },
    )
    def get(self, request: Request) -> Response:
        results, healthy = {}, True
        for name, check in self.checks.items():
            try:
                results[name] = check()
            except Exception as exc:
                healthy = False
                results[name] = f"error: {type(exc).__name__}: {exc}"
        return Response(
            {"status": "ok" if healthy else "unavailable", "checks": results},
            status=200 if healthy else 503,
        )
