"""Step tasks are made from the registry, with the options the barrier relies on."""

from celery import current_app

from sagas import tasks
from sagas.definitions import SagaDefinition, Step, registry


def noop(saga):
    return None


def test_declaring_a_saga_type_builds_no_task_and_registering_builds_its_steps(
    scratch_registry,
):
    SagaDefinition(
        "scratch_saga",
        steps=[Step("one", noop, noop, queue="q1", timeout_s=7), Step("two", noop)],
    )
    assert "scratch_saga.one" not in current_app.tasks

    created = tasks.register_step_tasks()

    assert created == ["scratch_saga.one", "scratch_saga.noop", "scratch_saga.two"]
    one = current_app.tasks["scratch_saga.one"]
    assert (one.soft_time_limit, one.time_limit) == (7, 12)
    assert one.acks_late is True
    assert one.reject_on_worker_lost is True
    assert one.ignore_result is True
    # A second call finds nothing new to make.
    assert tasks.register_step_tasks() == []


def test_every_registered_saga_type_has_its_tasks():
    for definition in registry.all():
        for index, step in enumerate(definition.steps):
            assert definition.action_task_name(index) in current_app.tasks
            if step.compensation is not None:
                assert definition.compensation_task_name(index) in current_app.tasks
