"""What the chaos and bench commands share: plug-ins, worker processes, a Redis of their own.

- ``plugin``: the :class:`~sagas.harness.plugin.SagaHarness` a saga type
  provides, and how the commands find it;
- ``processes``: ``celery worker`` subprocesses pointed at this process's
  database and broker, that die with it;
- ``redis_server``: a ``redis-server`` on a free port (also used by
  ``config.devstack``, so this package imports nothing at its top).
"""
