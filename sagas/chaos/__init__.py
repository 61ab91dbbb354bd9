"""Chaos runs: book many trips through real workers, inject faults, check the invariants.

``run_chaos`` is the one entry point (the ``chaos`` management command calls it):

- ``plan``: the run's options, their validation and the seeded per-saga fault plans;
- ``workers``: worker processes and a Redis broker owned by the run;
- ``runner``: dispatching, watching, killing and restarting while sagas run;
- ``invariants``: the checks of DESIGN.md section 4 over the run's rows;
- ``report``: the report as text and JSON, and the progress line.
"""

from bookings.chaos.plan import ChaosConfigError, ChaosOptions
from bookings.chaos.runner import ChaosError, run_chaos

__all__ = ["ChaosConfigError", "ChaosError", "ChaosOptions", "run_chaos"]
