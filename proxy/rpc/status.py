"""gRPC status and deadline conventions shared by client and server (pure functions)."""

from __future__ import annotations

import math

import trio
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import Status, StatusCode

# grpc-timeout units, smallest first (PROTOCOL-HTTP2.md: "TimeoutValue: at most 8 digits").
_UNITS: tuple[tuple[str, float], ...] = (
    ("n", 1e-9),
    ("u", 1e-6),
    ("m", 1e-3),
    ("S", 1.0),
    ("M", 60.0),
    ("H", 3600.0),
)
_MAX_TIMEOUT_VALUE = 99_999_999


def encode_timeout(seconds: float) -> str:
    """The grpc-timeout header for `seconds` left: the finest unit whose value fits 8 digits.

    Rounds up, so the peer never gives up before we do; never below 1 unit.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"timeout must be finite and non-negative, got {seconds}")
    for unit, size in _UNITS:
        scaled = seconds / size
        if scaled <= _MAX_TIMEOUT_VALUE:
            return f"{max(math.ceil(scaled), 1)}{unit}"
    return f"{_MAX_TIMEOUT_VALUE}H"


def describe_status(error: RpcFailedError) -> str:
    """`CODE: message` for logs."""
    status: Status = error.status
    name = status.status_code.name if isinstance(status.status_code, StatusCode) else "UNKNOWN"
    return f"{name}: {status.status_message}" if status.status_message else name


def describe_failure(error: BaseException) -> str:
    """Why a call failed, for logs: `CODE: message` for a gRPC status, "timed out" for a trio
    deadline, else the exception's own words."""
    if isinstance(error, RpcFailedError):
        return describe_status(error)
    if isinstance(error, trio.TooSlowError):
        return "timed out"
    return str(error)
