"""The toy saga: three steps on a queue of its own, two of them undoable.

``reserve -> charge -> notify``; a failure at ``notify`` undoes ``charge``
(``refund``), then ``reserve`` (``release``). The steps return what they did,
and that is all they do: the engine's log is the whole record.
"""

from sagas.definitions import RetryPolicy, SagaDefinition, Step
from sagas.models import Saga

TOY_SAGA = "toy_saga"
TOY_QUEUE = "toy"


def reserve(saga: Saga) -> dict:
    return {"reserved": saga.business_key}


def release(saga: Saga) -> dict:
    return {"released": saga.business_key}


def charge(saga: Saga) -> dict:
    return {"charged": saga.context.get("amount", 1)}


def refund(saga: Saga) -> dict:
    return {"refunded": saga.context.get("amount", 1)}


def notify(saga: Saga) -> dict:
    return {"notified": True}


toy_saga = SagaDefinition(
    TOY_SAGA,
    steps=[
        Step("reserve", reserve, release, queue=TOY_QUEUE),
        Step("charge", charge, refund, queue=TOY_QUEUE, retry=RetryPolicy(max_retries=2)),
        Step("notify", notify, queue=TOY_QUEUE),
    ],
    harness="tests.toy.harness.ToyHarness",
)
