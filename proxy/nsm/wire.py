"""Small helpers for NSM's messages, shared by the proxy's client and endpoint sides."""

from __future__ import annotations

import base64
import hashlib
import math

from google.protobuf.timestamp_pb2 import Timestamp


def interface_name(service: str, key: str) -> str:
    """NSM's shape for kernel interface names (the first 10 characters of the service, '-', 4
    characters: 15, Linux's maximum), but derived from `key`, so that the same connection gets
    the same name on every refresh and after a restart, and its port is reused."""
    digest = base64.b32encode(hashlib.sha256(key.encode()).digest()).decode().lower()
    return f"{service[:10]}-{digest[:4]}"


def timestamp(seconds: float) -> Timestamp:
    """A protobuf Timestamp for a wall-clock time in seconds (negative ones too: the seconds
    are floored, so that nanos stay in [0, 1e9) as protobuf requires)."""
    whole = math.floor(seconds)
    return Timestamp(seconds=whole, nanos=min(int((seconds - whole) * 1e9), 999_999_999))


def seconds(stamp: Timestamp) -> float:
    """A protobuf Timestamp as wall-clock seconds."""
    return stamp.seconds + stamp.nanos / 1e9
