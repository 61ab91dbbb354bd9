"""The toy saga's chaos and bench plug-in: how to start one, and nothing else to check."""

from typing import Any

from django.db import transaction

from sagas.harness.plugin import SagaHarness, unpublished_saga
from sagas.services import saga_start


class ToyHarness(SagaHarness):
    def _key(self, index: int) -> str:
        return f"toy:{self.run_id}:{index}"

    def start(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        context: dict[str, Any] = {"amount": index + 1}
        if chaos:
            context["chaos"] = chaos
        with transaction.atomic():
            saga = saga_start(
                saga_type=self.definition.name, business_key=self._key(index), context=context
            )
        return str(saga.id)

    def start_unpublished(self, index: int, *, chaos: dict[str, Any] | None = None) -> str:
        context: dict[str, Any] = {"amount": index + 1, **({"chaos": chaos} if chaos else {})}
        saga = unpublished_saga(
            definition=self.definition, business_key=self._key(index), context=context
        )
        return str(saga.id)
