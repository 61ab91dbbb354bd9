class SagaError(Exception):
    """Base of the saga engine's errors; ``code`` is stable and machine-readable."""

    code = "saga_error"


class TransientError(SagaError):
    """A failure worth retrying: the step's retry policy retries it with backoff."""

    code = "transient"


class EffectUncertain(TransientError):
    """The call left the process and its answer was lost (a timeout).

    Retried like any transient error; if the retries run out the step may still
    have had its effect, so the errback compensates it too.
    """

    code = "effect_uncertain"


class UnknownSagaType(SagaError):
    code = "unknown_saga_type"


class StepTaskMissing(SagaError):
    """A chain names a step task this process never made (a type declared too late)."""

    code = "step_task_missing"


class SagaNotFound(SagaError):
    code = "saga_not_found"


class InvalidSagaState(SagaError):
    code = "invalid_saga_state"


class ChaosFailure(SagaError):
    """A permanent failure injected by the saga's chaos plan."""

    code = "chaos_failure"


class ChaosTransientError(TransientError):
    """A failure injected by the chaos plan that goes away on a later attempt."""

    code = "chaos_transient"
