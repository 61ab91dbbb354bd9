from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from config.api import ApiNotFoundApi
from config.health import HealthApi
from sagas.metrics import MetricsApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", HealthApi.as_view(), name="healthz"),
    path("metrics", MetricsApi.as_view(), name="metrics"),
    path("api/", include("config.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    # Last: any other path under /api/ answers the API's JSON error, not Django's HTML page.
    re_path(r"^api/", ApiNotFoundApi.as_view(), name="api-not-found"),
]
