"""Project-wide API wiring: the token endpoint, one error format, and its OpenAPI description.

Every error answers ``{"code": ..., "detail": ..., "errors": {field path: [messages]}}``;
field paths are dotted (``lines.1.sku``, ``payment.amount``), the same for
serializer validation and for domain errors that name the input at fault.
"""

from __future__ import annotations

from typing import Any

from django.urls import Resolver404, resolve, reverse
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from bookings.errors import (
    BookingError,
    BookingNotCancellable,
    BookingNotFound,
    IdempotencyConflict,
)
from inventory.errors import InventoryError
from payments.errors import PaymentError
from sagas.errors import InvalidSagaState, SagaError, SagaNotFound

# First match wins; any other domain error is the client's fault (400).
DOMAIN_ERROR_STATUS: list[tuple[type[Exception], int]] = [
    (BookingNotFound, status.HTTP_404_NOT_FOUND),
    (SagaNotFound, status.HTTP_404_NOT_FOUND),
    (BookingNotCancellable, status.HTTP_409_CONFLICT),
    (InvalidSagaState, status.HTTP_409_CONFLICT),
    (IdempotencyConflict, status.HTTP_422_UNPROCESSABLE_ENTITY),
    (BookingError, status.HTTP_400_BAD_REQUEST),
    (InventoryError, status.HTTP_400_BAD_REQUEST),
    (PaymentError, status.HTTP_400_BAD_REQUEST),
    (SagaError, status.HTTP_400_BAD_REQUEST),
]
DOMAIN_ERRORS = tuple(error for error, _ in DOMAIN_ERROR_STATUS)


def flatten_errors(detail: Any, prefix: str = "") -> dict[str, list[str]]:
    """DRF's nested error detail as {"lines.1.sku": ["..."]}."""
    if isinstance(detail, dict):
        flat: dict[str, list[str]] = {}
        for key, value in detail.items():
            # A nested object's own errors belong to the object's path.
            path = prefix if key == "non_field_errors" and prefix else str(key)
            if prefix and path != prefix:
                path = f"{prefix}.{key}"
            flat.update(flatten_errors(value, path))
        return flat
    if isinstance(detail, list):
        if all(not isinstance(item, dict | list) for item in detail):
            return {prefix or "non_field_errors": [str(item) for item in detail]}
        flat = {}
        for index, item in enumerate(detail):
            flat.update(flatten_errors(item, f"{prefix}.{index}" if prefix else str(index)))
        return flat
    return {prefix or "non_field_errors": [str(detail)]}


def exception_handler(exc: Exception, context: dict) -> Response | None:
    if isinstance(exc, DOMAIN_ERRORS):
        status_code = next(code for error, code in DOMAIN_ERROR_STATUS if isinstance(exc, error))
        field = getattr(exc, "field", None) or "non_field_errors"
        body = {"code": exc.code, "detail": str(exc), "errors": {field: [str(exc)]}}
        return Response(body, status=status_code)

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a server error: Django logs it and answers 500
    if isinstance(exc, ValidationError):
        errors = flatten_errors(exc.detail)
        summary = "; ".join(f"{field}: {' '.join(messages)}" for field, messages in errors.items())
        response.data = {"code": "invalid", "detail": summary, "errors": errors}
    elif isinstance(exc, APIException):
        codes = exc.get_codes()
        response.data = {
            "code": codes if isinstance(codes, str) else exc.default_code,
            "detail": str(exc.detail),
            "errors": {},
        }
    return response


class AutoSchema(SpectacularAutoSchema):
    """Name schema components after their nesting: BookingCollectionApi.InputSerializer
    becomes ``BookingCollectionApiInput``, so views' nested serializers never collide."""

    def get_serializer_name(self, serializer, direction) -> str:
        return type(serializer).__qualname__.replace(".", "").replace("Serializer", "")


class TokenObtainApi(ObtainAuthToken):
    """Exchange a username and password for an API token (send it as `Authorization: Token …`)."""

    permission_classes = [AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "auth"

    @extend_schema(
        operation_id="auth_token_create",
        auth=[],
        request=AuthTokenSerializer,
        responses={
            200: inline_serializer("Token", {"token": serializers.CharField()}),
            400: OpenApiResponse(description="Wrong username or password."),
            429: OpenApiResponse(description="Too many attempts; retry after the given time."),
        },
    )
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)


# What the API root lists: name -> URL name (see config/urls.py and config/api_urls.py).
API_INDEX = {
    "docs": "docs",
    "schema": "schema",
    "health": "healthz",
    "auth_token": "auth-token",
    "bookings": "bookings",
    "inventory_items": "inventory-items",
    "sagas": "sagas",
    "saga_stats": "saga-stats",
    "saga_live": "saga-live",
}


class ApiRootApi(APIView):
    """Where everything is: the docs, the schema and each collection's URL."""

    permission_classes = [AllowAny]

    @extend_schema(
        operation_id="api_root",
        auth=[],
        responses=inline_serializer(
            "ApiRoot", {name: serializers.URLField() for name in API_INDEX}
        ),
    )
    def get(self, request):
        return Response(
            {name: request.build_absolute_uri(reverse(url)) for name, url in API_INDEX.items()}
        )


class ApiNotFoundApi(APIView):
    """Any other path under /api/ (a malformed id too): the JSON error body, never HTML."""

    permission_classes = [AllowAny]
    renderer_classes = [JSONRenderer]

    @extend_schema(exclude=True)
    def get(self, request):  # pragma: no cover - initial() answers every method
        raise NotFound()

    def initial(self, request, *args, **kwargs):
        detail = f"no API endpoint at {request.path}; GET /api/ lists them"
        if not request.path.endswith("/") and _resolves_elsewhere(request.path + "/"):
            detail = f"no API endpoint at {request.path}; did you mean {request.path}/ ?"
        raise NotFound(detail)


def _resolves_elsewhere(path: str) -> bool:
    try:
        return resolve(path).url_name != "api-not-found"
    except Resolver404:
        return False


ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "Machine-readable error code."},
        "detail": {"type": "string", "description": "What went wrong, for people."},
        "errors": {
            "type": "object",
            "description": "Messages by dotted input path, e.g. lines.1.sku.",
            "additionalProperties": {"type": "array", "items": {"type": "string"}},
        },
    },
    "required": ["code", "detail", "errors"],
}
STANDARD_ERRORS = {
    "400": "The request is malformed or invalid: see errors by field.",
    "401": "No valid credentials were sent.",
    "403": "These credentials may not do this.",
    "404": "There is no such resource, or it belongs to someone else.",
    "415": "The body is not in a media type this operation accepts, or cannot be parsed as one.",
}


def add_error_responses(result: dict, generator, request, public) -> dict:
    """Describe every error response with the one Error schema (drf-spectacular hook)."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in result.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            anonymous = operation.get("security") in ([], [{}]) or {} in operation.get(
                "security", []
            )
            expected = []
            if method in {"post", "put", "patch"} or operation.get("parameters"):
                expected.append("400")
            if "requestBody" in operation:
                # DRF's parsers answer 415 for a body they cannot read as its media type.
                expected.append("415")
            if not anonymous:
                expected += ["401", "403"]
            if "{" in path:
                expected.append("404")
            for code in expected:
                responses.setdefault(code, {"description": STANDARD_ERRORS[code]})
            for code, response in responses.items():
                if code.startswith("4") and "content" not in response:
                    response["content"] = error_content
    return result
