from django.db.models import QuerySet

from sagas.errors import SagaNotFound
from sagas.models import Saga, SagaLog


def saga_get(*, saga_id) -> Saga:
    saga = Saga.objects.filter(pk=saga_id).first()
    if saga is None:
        raise SagaNotFound(f"saga {saga_id} does not exist")
    return saga


def saga_log(*, saga_id) -> QuerySet[SagaLog]:
    return SagaLog.objects.filter(saga_id=saga_id).order_by("started_at", "id")


def saga_status(*, saga_id) -> str | None:
    return Saga.objects.filter(pk=saga_id).values_list("status", flat=True).first()
