"""The API's default paginator (DEFAULT_PAGINATION_CLASS).

Its own module, importing nothing of the project: DRF resolves this setting
while rest_framework.generics is first imported.
"""

from rest_framework import pagination
from rest_framework.exceptions import NotFound, ValidationError


class PageNumberPagination(pagination.PageNumberPagination):
    """Pages of 50 (``page_size`` up to 200); a page that does not exist is a 400, not a 404."""

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def paginate_queryset(self, queryset, request, view=None):
        try:
            return super().paginate_queryset(queryset, request, view)
        except NotFound as exc:
            raise ValidationError({self.page_query_param: [str(exc.detail)]}) from None
