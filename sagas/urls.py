from django.urls import path

from sagas.apis import (
    SagaDetailApi,
    SagaListApi,
    SagaLiveApi,
    SagaRetryCompensationApi,
    SagaStatsApi,
)

urlpatterns = [
    path("", SagaListApi.as_view(), name="sagas"),
    path("stats/", SagaStatsApi.as_view(), name="saga-stats"),
    path("live/", SagaLiveApi.as_view(), name="saga-live"),
    path("<uuid:saga_id>/", SagaDetailApi.as_view(), name="saga-detail"),
    path(
        "<uuid:saga_id>/retry-compensation/",
        SagaRetryCompensationApi.as_view(),
        name="saga-retry-compensation",
    ),
]
