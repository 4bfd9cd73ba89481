"""One total budget for a graceful stop (NSM_SHUTDOWN_TIMEOUT, below Kubernetes' 30 s grace).

The supervisor calls `begin()` when a stop signal arrives: it cancels the work running under
`until_stopping()` (now or later: a scope entered after `begin()` starts cancelled). Each task's
cleanup (unregister, close LB connections, release addresses) runs in `cleanup(limit)`: a
shielded scope that ends at its own limit or at the end of the total budget, whichever is
first, so cleanups run in parallel and the process still exits in time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Shutdown:
    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.deadline = math.inf  # trio time; set by begin()
        self.stopping = False
        self._scopes: set[trio.CancelScope] = set()

    def begin(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.deadline = trio.current_time() + self.budget
        for scope in self._scopes:
            scope.cancel()

    @contextmanager
    def until_stopping(self) -> Iterator[trio.CancelScope]:
        """A scope cancelled when the stop begins (its `cancelled_caught` says if it was)."""
        scope = trio.CancelScope()
        if self.stopping:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def cleanup(self, limit: float) -> trio.CancelScope:
        """A shielded scope for cleanup work: at most `limit` seconds, never past the budget."""
        deadline = trio.current_time() + limit
        if self.deadline != math.inf:
            deadline = min(deadline, self.deadline)
        return trio.CancelScope(shield=True, deadline=deadline)
