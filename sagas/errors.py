from django.db import InterfaceError, OperationalError


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


class PoisonMessage(SagaError):
    """A step's message lost its worker too many times: it fails for good, whatever its policy.

    Each delivery that came back after its worker died (crashed, killed, or
    frozen past its lease) is counted in SagaLog; past
    ``SAGA_MAX_LOST_DELIVERIES`` the step stops being retried, so a message
    that kills every worker it reaches cannot keep a saga from ending.
    """

    code = "poison_message"


# What a lost or restarted session, or a bounded wait that ran out, raises.
DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached or a bounded wait ran out.

    A dropped or restarted session, a lock or statement timeout: none of them
    is the step's fault, and none left an effect behind (its transaction
    rolled back), so the work is tried again later rather than failed.
    """
    return isinstance(exc, DATABASE_UNAVAILABLE)
