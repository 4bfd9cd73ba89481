"""A value that tasks can wait on: the owner sets it, anyone may wait for it to change."""

from __future__ import annotations

from typing import Generic, TypeVar

import trio

T = TypeVar("T")


class Watched(Generic[T]):
    """Holds the latest value; `wait_change(seen)` returns as soon as the value is not `seen`.

    Intermediate values between two wake-ups may be skipped: waiters get the latest state, which
    is what level-triggered consumers (health, reconcilers) want.
    """

    def __init__(self, value: T) -> None:
        self._value = value
        self._changed = trio.Event()

    @property
    def value(self) -> T:
        return self._value

    def set(self, value: T) -> None:
        if value == self._value:
            return
        self._value = value
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self, seen: T) -> T:
        while self._value == seen:
            await self._changed.wait()
        return self._value

    async def wait_for(self, wanted: T) -> None:
        while self._value != wanted:
            await self._changed.wait()
