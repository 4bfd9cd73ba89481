"""Waiting for a state that nothing signals: poll a condition until it holds, or fail once the
deadline has passed, saying what did not happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

import trio

T = TypeVar("T")


class Diagnosed(Protocol):
    """What a failed wait shows besides its own message (a lab's proxy log, say)."""

    def diagnostics(self) -> str: ...


def wait_until(
    condition: Callable[[], T], timeout: float, what: str, lab: Diagnosed, interval: float = 0.2
) -> T:
    """Call `condition` every `interval` seconds (blocking) until it returns something true,
    and return that; AssertionError naming `what` and showing `lab.diagnostics()` if it has
    not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout}s\n{lab.diagnostics()}")


async def eventually(condition: Callable[[], object], within: float, interval: float) -> None:
    """Check `condition` every `interval` seconds until it holds; trio.TooSlowError if it does
    not within `within` seconds. For what has no event to wait on (the records of a fake, the
    kernel state another process makes)."""
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110  (no event to wait on: that is the point)
            await trio.sleep(interval)
