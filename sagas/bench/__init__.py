"""``manage.py bench`` and ``manage.py seed_sagas``: what the saga engine costs, measured.

- ``bare``: the baseline, the trip's five steps as a bare Celery chain
  (imported by ``bookings.tasks`` so that workers register its tasks).
- ``fixture``: the bench's own stock and customer.
- ``workers``: the Celery workers a run starts, watches and stops.
- ``sqlcount``: SQL statements per step, counted through the real step wrapper.
- ``throughput``: bursts, open-loop arrivals and lone sagas against the workers.
- ``runner``: one whole run, phase by phase.
- ``scale``: seeding a million sagas and timing the pages that must stay fast.
- ``report``: targets, the printed table and the JSON report.

Nothing here is imported by the product's request or task paths except ``bare``.
"""
