"""How long sagas took to move on after each injected fault: the run's recovery figures.

The monitor loop reports every open saga's (status, steps_done, undo_cursor)
on each poll (``observe``) and every fault as it is injected (``fault``).
A saga is affected by a fault if it was open at that moment; it has moved on
at its first observed change of state after the fault (reaching a terminal
status counts), or at the end of the first attempt of one of its steps that a
worker recorded after the fault, whichever came first: a saga whose
compensation keeps retrying by design (a gateway down, an injected failure
waiting for an operator) is being worked on, not stuck, though its state
does not change. Times are the run's seconds since it started.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from sagas.chaos.report import percentile

State = tuple[str, int, int]  # status, steps_done, undo_cursor


@dataclass
class FaultEvent:
    kind: str
    at_s: float
    detail: str = ""
    # Affected saga id -> its state when the fault hit (None: not observed yet).
    waiting: dict[str, State | None] = field(default_factory=dict)
    moved_on: dict[str, float] = field(default_factory=dict)  # saga id -> seconds after
    # The newest SagaLog id when the fault hit: rows above it were written after.
    log_mark: int | None = None

    def worked_on(self, saga_id: str, seconds_after: float) -> None:
        """A worker recorded an attempt of ``saga_id`` ``seconds_after`` the fault."""
        seconds_after = max(0.0, seconds_after)
        if saga_id in self.waiting:
            del self.waiting[saga_id]
            self.moved_on[saga_id] = seconds_after
        elif saga_id in self.moved_on:
            self.moved_on[saga_id] = min(self.moved_on[saga_id], seconds_after)

    @property
    def affected(self) -> int:
        return len(self.waiting) + len(self.moved_on)

    def as_dict(self) -> dict[str, Any]:
        times = list(self.moved_on.values())
        return {
            "kind": self.kind,
            "at_s": round(self.at_s, 2),
            "detail": self.detail,
            "affected": self.affected,
            "moved_on": len(times),
            "never_moved_on": len(self.waiting),
            # Until the last affected saga moved on; None if one never did.
            "recovered_s": _round(max(times, default=0.0)) if not self.waiting else None,
            "moving_on_p50_s": _round(percentile(times, 50)),
            "moving_on_p99_s": _round(percentile(times, 99)),
        }


class RecoveryTracker:
    def __init__(self) -> None:
        self.events: list[FaultEvent] = []
        self.last: dict[str, State] = {}
        self.affected: set[str] = set()
        # Saga id -> the faults it has not moved on from yet: a poll touches only those.
        self.pending: dict[str, list[FaultEvent]] = {}

    def fault(
        self, kind: str, *, at_s: float, open_ids, detail: str = "", log_mark: int | None = None
    ) -> FaultEvent:
        """A fault was injected at ``at_s``; ``open_ids`` are the sagas not terminal then."""
        event = FaultEvent(kind=kind, at_s=at_s, detail=detail, log_mark=log_mark)
        for saga_id in open_ids:
            event.waiting[saga_id] = self.last.get(saga_id)
            self.affected.add(saga_id)
            self.pending.setdefault(saga_id, []).append(event)
        self.events.append(event)
        return event

    def observe(self, saga_id: str, state: State, *, at_s: float, terminal: bool) -> None:
        """A poll saw ``saga_id`` in ``state`` at ``at_s``."""
        events = self.pending.get(saga_id)
        for event in list(events or ()):
            if at_s < event.at_s:
                continue
            before = event.waiting[saga_id]
            if before is None:
                # Not seen before the fault: its first sighting is its state then.
                event.waiting[saga_id] = state
                if not terminal:
                    continue
            elif state == before and not terminal:
                continue
            del event.waiting[saga_id]
            event.moved_on[saga_id] = at_s - event.at_s
            events.remove(event)
        if events is not None and not events:
            del self.pending[saga_id]
        self.last[saga_id] = state
        if terminal:
            self.last.pop(saga_id, None)

    def figures(self, durations_ms: dict[str, int]) -> dict[str, Any]:
        """Per fault, and the extra latency of affected sagas over the unaffected median.

        ``durations_ms`` maps terminal sagas to their duration.
        """
        baseline = [d for saga_id, d in durations_ms.items() if saga_id not in self.affected]
        median = statistics.median(baseline) if baseline else None
        extra = (
            [max(0, d - median) for saga_id, d in durations_ms.items() if saga_id in self.affected]
            if median is not None
            else []
        )
        return {
            "faults": [event.as_dict() for event in self.events],
            "affected_sagas": len(self.affected),
            "unaffected_median_ms": _round(median, 0),
            "extra_latency_ms": {
                "p50": _round(percentile(extra, 50), 0),
                "p99": _round(percentile(extra, 99), 0),
            },
        }


def _round(value, digits: int = 2):
    if value is None:
        return None
    return round(value) if digits == 0 else round(value, digits)
