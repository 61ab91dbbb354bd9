"""A prefork worker subprocess for a saga type a test module declares itself.

The worker imports the test module (``--include``) with ``flag`` set in its
environment, which makes the module declare its saga type there too, as it
does in the test process. Used where the step under test must run in a real
pool process (it crashes it, or outlives its hard time limit).
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from django.conf import settings

from sagas.harness.processes import die_with_parent, worker_argv, worker_environment


@contextmanager
def probe_worker(
    *, module: str, flag: str, queues: tuple[str, ...], logfile: Path, name: str
) -> Iterator[subprocess.Popen]:
    """Run the worker until the block ends; then stop it and drop what it left on ``queues[0]``."""
    from config.celery_app import app

    env = {**worker_environment(broker_url=app.conf.broker_url), flag: "1"}
    argv = worker_argv(
        name=f"{name}-{uuid.uuid4().hex[:8]}@%h", queues=queues, concurrency=1, includes=(module,)
    )
    with logfile.open("wb") as log:
        worker = subprocess.Popen(  # noqa: S603 - our own celery, our own arguments
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=settings.BASE_DIR,
            preexec_fn=die_with_parent(),
        )
    try:
        yield worker
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=5)
        # Whatever the worker left unconsumed must not reach the next run's worker.
        redis.Redis.from_url(app.conf.broker_url).delete(queues[0])
