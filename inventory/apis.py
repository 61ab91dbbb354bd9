from django_filters import rest_framework as filters
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import APIView

from inventory import selectors
from inventory.models import Item


class ItemListApi(APIView):
    """What can be booked, with live availability."""

    permission_classes = [IsAuthenticated]
    pagination_class = api_settings.DEFAULT_PAGINATION_CLASS

    class FilterSet(filters.FilterSet):
        kind = filters.ChoiceFilter(choices=Item.Kind.choices)

        class Meta:
            model = Item
            fields = ["kind"]

    class OutputSerializer(serializers.Serializer):
        sku = serializers.CharField()
        kind = serializers.CharField()
        name = serializers.CharField()
        price = serializers.DecimalField(max_digits=12, decimal_places=2)
        currency = serializers.CharField()
        available = serializers.IntegerField()

    @extend_schema(
        operation_id="inventory_items_list",
        parameters=[
            OpenApiParameter("kind", str, enum=Item.Kind.values, description="Only this kind."),
        ],
        responses={200: OutputSerializer(many=True)},
    )
    def get(self, request: Request) -> Response:
        filterset = self.FilterSet(request.query_params, queryset=selectors.item_list())
        if not filterset.is_valid():
            raise serializers.ValidationError(filterset.errors)
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(filterset.qs, request, view=self)
        return paginator.get_paginated_response(self.OutputSerializer(page, many=True).data)
