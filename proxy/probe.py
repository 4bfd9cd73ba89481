"""`meridio-proxy probe`: a gRPC health client for container probes (no Go binary needed).

Accepts grpc_health_probe's main flags, Go style (`-addr=x`, `-addr x` or `--addr x`):
`-addr` (unix:///path, host:port or [v6]:port), `-service`, `-connect-timeout`, `-rpc-timeout`
(Go durations). Exit status:

  0  the service answered SERVING
  1  it answered something else (NOT_SERVING, UNKNOWN) or is unknown to the server (NOT_FOUND)
  2  bad usage
  3  could not connect within -connect-timeout
  4  the call failed or timed out
"""

from __future__ import annotations

import argparse
import sys

import attrs
import trio

from proxy.api.health.v1 import health_grpc
from proxy.api.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from proxy.config import parse_duration
from proxy.rpc import (
    AddressError,
    ConnectFailed,
    RpcFailedError,
    StatusCode,
    Tls,
    open_channel,
    parse_address,
)
from proxy.rpc.status import describe_status

EXIT_SERVING, EXIT_NOT_SERVING, EXIT_USAGE, EXIT_CONNECT, EXIT_RPC = 0, 1, 2, 3, 4


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 1s, 400ms)") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return seconds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meridio-proxy probe",
        description="Check a gRPC health service; exit 0 only when it is SERVING.",
        epilog="Exit status: 0 SERVING, 1 not serving or unknown service, 2 bad usage, "
        "3 connection failed, 4 RPC failed or timed out.",
    )
    p.add_argument("-addr", "--addr", required=True, help="unix:///path, host:port or [v6]:port")
    p.add_argument("-service", "--service", default="", help="service name (default: '')")
    p.add_argument(
        "-connect-timeout", "--connect-timeout", type=_duration, default=1.0,
        help="time to connect (Go duration, default 1s)",
    )  # fmt: skip
    p.add_argument(
        "-rpc-timeout", "--rpc-timeout", type=_duration, default=1.0,
        help="time for the Check call (Go duration, default 1s)",
    )  # fmt: skip
    return p


@attrs.frozen
class Answer:
    code: int  # the exit status
    message: str
    to_stderr: bool


async def ask(
    address: str,
    service: str,
    connect_timeout: float,
    rpc_timeout: float,
    tls: Tls | None = None,
) -> Answer:
    """One Check of `service` at `address` (over `tls` if given): its answer as an exit status
    and a message."""
    try:
        async with open_channel(
            address, connect_timeout=connect_timeout, ssl_context=tls
        ) as channel:
            with trio.fail_after(rpc_timeout):
                reply = await health_grpc.HealthStub(channel).Check(
                    HealthCheckRequest(service=service)
                )
    except trio.TooSlowError:
        return Answer(EXIT_RPC, f"error: health rpc did not complete within {rpc_timeout:g}s", True)
    except ConnectFailed as exc:
        return Answer(EXIT_CONNECT, f"error: {exc.status.status_message}", True)
    except RpcFailedError as exc:
        if exc.status.status_code == StatusCode.NOT_FOUND:
            return Answer(
                EXIT_NOT_SERVING, f"service unhealthy: {service!r} is unknown to the server", True
            )
        return Answer(EXIT_RPC, f"error: {describe_status(exc)}", True)
    name = HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != HealthCheckResponse.SERVING:
        return Answer(EXIT_NOT_SERVING, f"service unhealthy (responded with {name})", True)
    return Answer(EXIT_SERVING, f"status: {name}", False)


async def check(address: str, service: str, connect_timeout: float, rpc_timeout: float) -> int:
    """Run one Check and return the exit status (the message goes to stdout/stderr)."""
    answer = await ask(address, service, connect_timeout, rpc_timeout)
    print(answer.message, file=sys.stderr if answer.to_stderr else sys.stdout)
    return answer.code


def main(argv: list[str]) -> int:
    try:
        args = parser().parse_args(argv)
        parse_address(args.addr)
    except SystemExit as exc:  # argparse: usage error (2) or --help (0)
        return int(exc.code or 0)
    except AddressError as exc:
        print(f"meridio-proxy probe: -addr {args.addr!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return trio.run(check, args.addr, args.service, args.connect_timeout, args.rpc_timeout)
