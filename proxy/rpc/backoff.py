"""Jittered exponential backoff (pure): how long to wait before the next attempt."""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs


@attrs.define
class Backoff:
    """`initial * multiplier**n`, +-`jitter` (a fraction), never above `maximum`.

    The cap is NSM_GRPC_MAX_BACKOFF; the shape follows gRPC's connection-backoff document
    (multiplier 1.6, jitter 0.2) with a shorter start, as the peers are local services.
    """

    maximum: float
    initial: float = 0.2
    multiplier: float = 1.6
    jitter: float = 0.2
    uniform: Callable[[float, float], float] = random.uniform
    _attempt: int = 0

    def __attrs_post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum, got {self.initial}, {self.maximum}"
            )

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.multiplier**self._attempt)
        if base < self.maximum:  # stop counting once capped (no float overflow after days)
            self._attempt += 1
        return min(self.maximum, base * self.uniform(1 - self.jitter, 1 + self.jitter))

    def reset(self) -> None:
        self._attempt = 0
