"""``manage.py bench`` and ``manage.py seed_sagas``: what the saga engine costs, measured.

Any saga type with a plug-in (``SagaDefinition(harness=...)``) can be benched;
the plug-in starts its sagas and, optionally, a bare-chain baseline that does
the same domain work without the saga's bookkeeping.

- ``tasks``: the no-op chain, Celery's own floor (only the bench's workers import it).
- ``workers``: the Celery worker a run starts, watches and stops.
- ``sqlcount``: SQL statements per step, counted through the real step wrapper.
- ``throughput``: bursts, open-loop arrivals and lone sagas against the workers.
- ``runner``: one whole run, phase by phase, and its clean-up.
- ``scale``: seeding a million sagas and timing the pages that must stay fast.
- ``report``: targets, the printed table and the JSON report.

Nothing here is imported by the product's request or task paths.
"""
