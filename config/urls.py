from django.contrib import admin
from django.urls import path

from config.health import HealthApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", HealthApi.as_view(), name="healthz"),
]
