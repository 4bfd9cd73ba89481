"""One total budget for a graceful stop (NSM_SHUTDOWN_TIMEOUT, below Kubernetes' 30 s grace).

The supervisor calls `begin()` when a stop signal arrives, then cancels everything. Each task's
cleanup (unregister, close LB connections, release addresses) runs in `cleanup(limit)`: a
shielded scope that ends at its own limit or at the end of the total budget, whichever is
first, so cleanups run in parallel and the process still exits in time.
"""

from __future__ import annotations

import math

import trio


class Shutdown:
    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.deadline = math.inf  # trio time; set by begin()

    def begin(self) -> None:
        if self.deadline == math.inf:
            self.deadline = trio.current_time() + self.budget

    def cleanup(self, limit: float) -> trio.CancelScope:
        """A shielded scope for cleanup work: at most `limit` seconds, never past the budget."""
        deadline = trio.current_time() + limit
        if self.deadline != math.inf:
            deadline = min(deadline, self.deadline)
        return trio.CancelScope(shield=True, deadline=deadline)
