"""Serving a lab peer's servicers on a parsed listen address (unix or tcp)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any

import trio
from loguru import logger

from proxy.rpc import Address, Server, TcpAddress, UnixAddress
from proxy.security.tls import SpiffeTls


async def serve(
    servicers: Iterable[Any],
    address: Address,
    *,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (a unix socket file is removed after), over mutual TLS with the
    identity `tls` holds (plain text without).
    `nursery.start` returns the address bound (for `TcpAddress(host, 0)`, with the port the
    kernel picked); a failure to listen is raised from it as the bare OSError."""
    server = Server(servicers)
    server_tls = tls.server() if tls else None
    if isinstance(address, UnixAddress):
        await server.serve_unix(
            address.path, ssl_context=server_tls, task_status=_Relay(task_status, lambda _: address)
        )
    else:
        await server.serve_tcp(
            address.host or None,
            address.port,
            ssl_context=server_tls,
            task_status=_Relay(task_status, lambda port: TcpAddress(address.host, port)),
        )


class _Relay(trio.TaskStatus[Any]):
    """Reports `convert(value)` to the outer task status (no nursery in between, so nothing
    wraps a failure in an exception group)."""

    def __init__(self, outer: trio.TaskStatus[Address], convert: Callable[[Any], Address]) -> None:
        self._outer = outer
        self._convert = convert

    def started(self, value: Any = None) -> None:
        self._outer.started(self._convert(value))


async def serve_with_tasks(
    name: str,
    servicers: Iterable[Any],
    address: Address,
    tasks: Iterable[Callable[[], Awaitable[Any]]] = (),
    *,
    context: Mapping[str, Any] | None = None,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve, and run `tasks` beside the server once it listens, until cancelled. A failure to
    listen is raised from `nursery.start` as the bare OSError, before any task starts."""
    failure: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            bound = await nursery.start(partial(serve, servicers, address, tls=tls))
        except OSError as exc:
            failure = exc
        else:
            for task in tasks:
                nursery.start_soon(task)
            security = "mutual TLS" if tls else "plain text"
            logger.info(
                "serving", service=name, address=str(bound), security=security, **(context or {})
            )
            task_status.started(bound)
    if failure is not None:
        raise failure
