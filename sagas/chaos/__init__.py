"""Chaos runs: many sagas of one type through real workers, with faults, against the invariants.

``run_chaos`` is the one entry point (the ``chaos`` management command calls it).
Any saga type whose definition names a plug-in (``SagaDefinition(harness=...)``)
can be run; the plug-in starts its sagas and checks its domain invariants.

- ``plan``: the run's options, their validation and the seeded per-saga fault plans;
- ``workers``: worker processes and a Redis broker owned by the run;
- ``runner``: dispatching, watching, killing and restarting while sagas run;
- ``invariants``: the engine's own checks of DESIGN.md section 4 over the run's rows;
- ``report``: the report as text and JSON, and the progress line.
"""

from sagas.chaos.plan import ChaosConfigError, ChaosOptions
from sagas.chaos.runner import ChaosError, run_chaos

__all__ = ["ChaosConfigError", "ChaosError", "ChaosOptions", "run_chaos"]
