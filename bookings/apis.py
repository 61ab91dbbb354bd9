"""Bookings over HTTP: one view per operation, nested input/output serializers."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal, InvalidOperation

from django.conf import settings
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import PermissionDenied
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from bookings import services
from bookings.errors import BookingNotFound, InvalidBooking
from bookings.models import Booking

IDEMPOTENCY_HEADER = "Idempotency-Key"


def visible_bookings(user):
    """Staff see every booking; anyone else only their own (others' are a 404)."""
    bookings = Booking.objects.prefetch_related("lines")
    return bookings if user.is_staff else bookings.filter(user=user)


def saga_path(saga_id) -> str | None:
    return f"/api/sagas/{saga_id}/" if saga_id else None


class BookingOutputSerializer(serializers.ModelSerializer):
    class LineSerializer(serializers.Serializer):
        sku = serializers.CharField()
        kind = serializers.CharField()
        name = serializers.CharField()
        quantity = serializers.IntegerField()
        unit_price = serializers.DecimalField(max_digits=12, decimal_places=2)
        currency = serializers.CharField()

    class CustomerSerializer(serializers.Serializer):
        name = serializers.CharField(source="customer_name")
        email = serializers.EmailField(source="customer_email")

    customer = CustomerSerializer(source="*")
    lines = LineSerializer(many=True)
    total = serializers.DecimalField(max_digits=12, decimal_places=2)
    saga_url = serializers.SerializerMethodField()
    cancel_saga_url = serializers.SerializerMethodField()

    class Meta:
        model = Booking
        fields = [
            "id",
            "status",
            "customer",
            "lines",
            "total",
            "currency",
            "saga_id",
            "saga_url",
            "cancel_saga_id",
            "cancel_saga_url",
            "created_at",
            "updated_at",
        ]

    def get_saga_url(self, booking: Booking) -> str | None:
        return saga_path(booking.saga_id)

    def get_cancel_saga_url(self, booking: Booking) -> str | None:
        return saga_path(booking.cancel_saga_id)


def render_booking(booking: Booking) -> dict:
    return json.loads(json.dumps(BookingOutputSerializer(booking).data, default=str))


def chaos_allowed(request: Request) -> bool:
    return settings.SAGA_CHAOS_ENABLED or request.user.is_staff


def chaos_from_request(request: Request, body_chaos: dict | None) -> dict | None:
    """The chaos plan from the body or the `?chaos=car` shortcut, if this caller may send one."""
    shortcut = request.query_params.get("chaos")
    if body_chaos is None and not shortcut:
        return None
    if not chaos_allowed(request):
        raise PermissionDenied(
            "chaos plans are accepted only when SAGA_CHAOS_ENABLED is on, or from staff"
        )
    if body_chaos is not None and shortcut:
        raise InvalidBooking("send chaos in the body or as ?chaos=, not both", field="chaos")
    return body_chaos if body_chaos is not None else services.chaos_shortcut(shortcut)


class DecimalStringField(serializers.DecimalField):
    """Money travels as a decimal string ("380.00"): a JSON number may already be rounded."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("not_a_string")
        try:
            Decimal(data)
        except InvalidOperation:
            self.fail("invalid")
        return super().to_internal_value(data)

    default_error_messages = {
        **serializers.DecimalField.default_error_messages,
        "not_a_string": 'Send the amount as a decimal string, e.g. "380.00".',
    }


class BookingCollectionApi(APIView):
    """GET lists the caller's bookings; POST books a trip and starts its saga."""

    permission_classes = [IsAuthenticated]
    pagination_class = api_settings.DEFAULT_PAGINATION_CLASS

    class InputSerializer(serializers.Serializer):
        class CustomerSerializer(serializers.Serializer):
            name = serializers.CharField(max_length=200)
            email = serializers.EmailField()

        class LineSerializer(serializers.Serializer):
            sku = serializers.CharField(max_length=64)
            quantity = serializers.IntegerField(min_value=1, max_value=100)

        class PaymentSerializer(serializers.Serializer):
            amount = DecimalStringField(max_digits=12, decimal_places=2, min_value=Decimal("0.01"))
            currency = serializers.ChoiceField(choices=[])
            card_token = serializers.CharField(max_length=100)

            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.fields["currency"].choices = settings.PAYMENTS_CURRENCIES

        customer = CustomerSerializer()
        lines = LineSerializer(many=True, allow_empty=False, max_length=20)
        payment = PaymentSerializer()
        chaos = serializers.DictField(required=False, help_text="A chaos plan (see the README).")

    @extend_schema(
        operation_id="bookings_list",
        responses={200: BookingOutputSerializer(many=True)},
    )
    def get(self, request: Request) -> Response:
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(
            visible_bookings(request.user).order_by("-created_at"), request, view=self
        )
        return paginator.get_paginated_response(BookingOutputSerializer(page, many=True).data)

    @extend_schema(
        operation_id="bookings_create",
        request=InputSerializer,
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                str,
                OpenApiParameter.HEADER,
                description="Same key and body: the first response again, no second booking.",
            ),
            OpenApiParameter(
                "chaos",
                str,
                enum=list(services.CHAOS_SHORTCUTS),
                description="Shortcut for a chaos plan that fails one step.",
            ),
        ],
        responses={
            202: OpenApiResponse(BookingOutputSerializer, description="Accepted: the saga runs."),
            422: OpenApiResponse(description="The Idempotency-Key was used for another request."),
        },
    )
    def post(self, request: Request) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        booking_request = {
            "user": request.user,
            "customer_name": data["customer"]["name"],
            "customer_email": data["customer"]["email"],
            "lines": [services.LineRequest(**line) for line in data["lines"]],
            "payment": services.PaymentRequest(**data["payment"]),
            "chaos": chaos_from_request(request, data.get("chaos")),
        }
        key = request.headers.get(IDEMPOTENCY_HEADER)
        headers = {}
        if key is None:
            body = render_booking(services.booking_create(**booking_request))
        else:
            if not key.strip() or len(key) > 255:
                raise InvalidBooking(
                    "Idempotency-Key must be 1 to 255 characters", field=IDEMPOTENCY_HEADER
                )
            created = services.booking_create_once(
                idempotency_key=key,
                fingerprint=fingerprint(request),
                render=render_booking,
                **booking_request,
            )
            body = created.response
            if created.replayed:
                headers["Idempotent-Replayed"] = "true"
        headers["Location"] = body["saga_url"]
        return Response(body, status=status.HTTP_202_ACCEPTED, headers=headers)


def fingerprint(request: Request) -> str:
    canonical = json.dumps(
        {"body": request.data, "chaos": request.query_params.get("chaos")},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


class BookingDetailApi(APIView):
    permission_classes = [IsAuthenticated]

    @extend_schema(operation_id="bookings_retrieve", responses={200: BookingOutputSerializer})
    def get(self, request: Request, booking_id) -> Response:
        booking = visible_bookings(request.user).filter(pk=booking_id).first()
        if booking is None:
            raise BookingNotFound(f"booking {booking_id} does not exist")
        return Response(BookingOutputSerializer(booking).data)


class BookingCancelApi(APIView):
    """Starts the cancellation saga of a confirmed booking."""

    permission_classes = [IsAuthenticated]

    class InputSerializer(serializers.Serializer):
        chaos = serializers.DictField(required=False, help_text="A chaos plan (see the README).")

    @extend_schema(
        operation_id="bookings_cancel",
        request=InputSerializer,
        responses={
            202: OpenApiResponse(BookingOutputSerializer, description="Accepted: cancelling."),
            409: OpenApiResponse(description="The booking is not confirmed."),
        },
    )
    def post(self, request: Request, booking_id) -> Response:
        serializer = self.InputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if not visible_bookings(request.user).filter(pk=booking_id).exists():
            raise BookingNotFound(f"booking {booking_id} does not exist")
        chaos = serializer.validated_data.get("chaos")
        if chaos is not None and not chaos_allowed(request):
            raise PermissionDenied(
                "chaos plans are accepted only when SAGA_CHAOS_ENABLED is on, or from staff"
            )
        booking = services.booking_cancel(booking_id=booking_id, chaos=chaos)
        body = BookingOutputSerializer(booking).data
        return Response(
            body, status=status.HTTP_202_ACCEPTED, headers={"Location": body["cancel_saga_url"]}
        )
