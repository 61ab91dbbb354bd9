"""The JSON API under /api/: each context publishes its own urls module."""

from django.urls import include, path

from config.api import ApiRootApi, TokenObtainApi

urlpatterns = [
    path("", ApiRootApi.as_view(), name="api-root"),
    path("auth/token/", TokenObtainApi.as_view(), name="auth-token"),
    path("bookings/", include("bookings.urls")),
    path("inventory/", include("inventory.urls")),
    path("sagas/", include("sagas.urls")),
]
