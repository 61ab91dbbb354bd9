"""Saga-level tasks: the errbacks, the end of compensation and the reconciler.

The errbacks are declared ``bind=True`` so Celery queues them as tasks of
their own (visible in Flower and the result store) with the failed task's id
as first argument, instead of running them inline in the failing process.
"""

from typing import Any

from celery import shared_task

from sagas import services


@shared_task(bind=True, name="sagas.step_failed", acks_late=True)
def step_failed(self, failed_task_id: str = "", *, saga_id: str, **_ignored: Any) -> bool:
    return services.saga_begin_compensation(saga_id=saga_id, failed_task_id=failed_task_id)


@shared_task(bind=True, name="sagas.compensation_failed", acks_late=True)
def compensation_failed(self, failed_task_id: str = "", *, saga_id: str, **_ignored: Any) -> bool:
    return services.saga_fail_compensation(saga_id=saga_id, failed_task_id=failed_task_id)


@shared_task(name="sagas.finish_compensation", acks_late=True)
def finish_compensation(*, saga_id: str, **_ignored: Any) -> bool:
    return services.saga_finish_compensation(saga_id=saga_id)


@shared_task(name="sagas.reconcile_pending", acks_late=True)
def reconcile_pending(**_ignored: Any) -> int:
    return services.sagas_reconcile_pending()


@shared_task(name="sagas.recover_stalled", acks_late=True)
def recover_stalled(**_ignored: Any) -> dict[str, int]:
    return services.sagas_recover_stalled()
