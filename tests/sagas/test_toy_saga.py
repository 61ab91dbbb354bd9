"""The engine on its own: a saga type with no domain app, through chaos and bench.

``tests/toy`` declares a three-step saga whose steps touch nothing but the
saga's rows, and a plug-in that only knows how to start one. If these runs
pass, ``sagas/`` could be lifted into another Django project with its
harness: nothing here needs bookings, inventory or payments.
"""

from __future__ import annotations

import json
from io import StringIO
from numbers import Number

import pytest
from django.core.management import call_command
from django.db import connection

from sagas.models import Saga, SagaLog
from tests.toy.saga_steps import TOY_QUEUE, TOY_SAGA

pytestmark = [pytest.mark.saga, pytest.mark.django_db(transaction=True)]

GENERIC_INVARIANTS = ["all_terminal", "no_failed", "one_success_per_step", "compensation_order"]


def test_the_toy_saga_runs_through_chaos_with_the_generic_invariants(celery_worker, tmp_path):
    path = tmp_path / "toy.json"
    err = StringIO()

    call_command(
        "chaos",
        f"--saga-type={TOY_SAGA}",
        "--sagas=40",
        "--concurrency=10",
        "--fail-rate=0.15",
        "--transient-rate=0.2",
        "--compensation-fail-rate=0.3",
        "--duplicate-rate=0.3",
        "--workers=1",
        "--topology=split",
        "--kill-workers=1",
        "--seed=42",
        "--timeout=120",
        "--keep",
        f"--json={path}",
        stdout=StringIO(),
        stderr=err,
    )

    report = json.loads(path.read_text())
    assert report["saga_type"] == TOY_SAGA
    assert [check["name"] for check in report["invariants"]] == GENERIC_INVARIANTS
    assert report["passed"] is True, [c for c in report["invariants"] if not c["passed"]]
    by_status = report["sagas"]["by_status"]
    assert set(by_status) == {"COMPLETED", "COMPENSATED"}
    assert sum(by_status.values()) == 40
    assert report["faults"]["fail"] == by_status["COMPENSATED"]
    assert report["faults"]["worker_kill"] == 1
    assert report["duplicates"]["published"] > 0
    # One worker per queue of the toy saga's definition: its own and the saga queue.
    assert sorted(name.split("-")[2] for name in report["workers"]["names"]) == [
        "sagas",
        TOY_QUEUE,
    ]
    sagas = Saga.objects.filter(saga_type=TOY_SAGA)
    assert sagas.count() == 40
    compensated = sagas.filter(status=Saga.Status.COMPENSATED).first()
    undone = SagaLog.objects.filter(
        saga=compensated, phase=SagaLog.Phase.COMPENSATION, status__in=SagaLog.DONE
    ).order_by("started_at", "id")
    done = SagaLog.objects.filter(
        saga=compensated, phase=SagaLog.Phase.ACTION, status=SagaLog.Status.SUCCEEDED
    ).values_list("step", flat=True)
    undo = {"reserve": "release", "charge": "refund"}
    assert list(undone.values_list("step", flat=True)) == [
        undo[step] for step in reversed(list(done)) if step in undo
    ]


@pytest.mark.timeout(180)
def test_the_toy_saga_runs_through_a_short_bench(celery_worker, tmp_path):
    path = tmp_path / "bench.json"
    before = Saga.objects.count()

    call_command(
        "bench",
        f"--saga-type={TOY_SAGA}",
        *("--sagas", "4", "--lone", "2", "--failures", "2", "--half-load-sagas", "2"),
        *("--warmup", "0", "--json", str(path)),
        "--allow-foreign-workers",
        "--purge",
        stdout=StringIO(),
    )

    report = json.loads(path.read_text())
    assert report["saga_type"] == TOY_SAGA
    assert report["steps"] == 3
    assert isinstance(report["sagas_per_s"], Number)
    assert isinstance(report["noop_chains_per_s"], Number)
    assert isinstance(report["noop_ratio"], Number)
    # No bare chain for the toy: those figures are absent, not invented.
    assert report["bare_chains_per_s"] is None
    assert report["overhead_ratio"] is None
    assert report["targets"]["overhead_ratio"]["pass"] is None
    # Claim the saga, append the log row (the toy has no external step); on
    # SQLite the last action's end stamp is a statement of its own.
    assert report["sql_per_step"]["compensation"]["bookkeeping"] == 2
    assert report["sql_per_step"]["action"]["bookkeeping"] == (
        2 if connection.vendor == "postgresql" else round((2 + 2 + 3) / 3, 2)
    )
    # Counted through the real step wrapper: three actions, two compensations.
    steps = [(row["phase"], row["step"]) for row in report["sql_per_step"]["steps"]]
    assert steps == [
        ("action", "reserve"),
        ("action", "charge"),
        ("action", "notify"),
        ("compensation", "refund"),
        ("compensation", "release"),
    ]
    # And it cleaned up after itself.
    assert Saga.objects.count() == before
