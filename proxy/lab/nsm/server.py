"""The lab's nsmgr: the registry and the manager on one UNIX socket, as NSM serves them to a
node's clients and endpoints.

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_nsm, "/tmp/lab/nsm.sock", forwarder=NoKernel()))

Served: `registry.NetworkServiceRegistry`, `registry.NetworkServiceEndpointRegistry`
(`proxy.lab.nsm.registry`), `networkservice.NetworkService` and `connection.MonitorConnection`
(`proxy.lab.nsm.manager`). A UNIX socket only: clients and endpoints pass their network
namespaces and endpoint sockets as descriptors on it (NSM's grpcfd), and the manager falls back
to a socket peer's pid for one that does not.
"""

from __future__ import annotations

from functools import partial

import trio
from loguru import logger

from proxy.lab.listen import serve
from proxy.lab.nsm.forwarding import Forwarder
from proxy.lab.nsm.manager import (
    CLOSE_TIMEOUT,
    DEFAULT_NAME,
    REQUEST_TIMEOUT,
    Manager,
    ManagerSettings,
    MonitorConnectionServicer,
    NetworkServiceServicer,
)
from proxy.lab.nsm.registry import (
    DEFAULT_LIFETIME,
    WATCH_BUFFER,
    NetworkServiceEndpointRegistryServicer,
    NetworkServiceRegistryServicer,
    Registry,
    WallClock,
)
from proxy.nsm.hoptoken import RegistryGuard, Signer
from proxy.rpc import UnixAddress
from proxy.security.tls import SpiffeTls


async def serve_nsm(
    path: str,
    *,
    forwarder: Forwarder,
    default_lifetime: float = DEFAULT_LIFETIME,
    name: str = DEFAULT_NAME,
    request_timeout: float = REQUEST_TIMEOUT,
    close_timeout: float = CLOSE_TIMEOUT,
    watch_buffer: int = WATCH_BUFFER,
    clock: WallClock | None = None,
    path_map: tuple[str, str] | None = None,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on the UNIX socket `path` until cancelled (the socket file is removed after);
    `nursery.start` returns the path once it listens, or raises the OSError of a failure to.

    `default_lifetime`: an NSE registration without expiration_time, and a connection not
    refreshed, last this long. `name`: the manager's path segment name. `request_timeout`: the
    deadline towards an NSE when the caller set none; `close_timeout`: that of a Close towards
    an NSE. `watch_buffer`: the changes (and monitor events) a watcher may fall behind before it
    is dropped. `clock`: wall-clock time (default: now, advancing with trio's clock).
    `path_map`: (container path, host path) for endpoint URLs in containers (see
    `ManagerSettings.path_map`).
    """
    clock = clock or WallClock()
    registry = Registry(clock, default_lifetime=default_lifetime, watch_buffer=watch_buffer)
    settings = ManagerSettings(
        name=name,
        lifetime=default_lifetime,
        request_timeout=request_timeout,
        close_timeout=close_timeout,
        monitor_buffer=watch_buffer,
        path_map=path_map,
        client_tls=tls.client() if tls else None,
        signer=Signer.of(tls, default_lifetime) if tls else None,
    )
    manager = Manager(registry, forwarder, clock, settings)
    guard = RegistryGuard(settings.signer) if settings.signer else None
    servicers = [
        NetworkServiceRegistryServicer(registry, guard),
        NetworkServiceEndpointRegistryServicer(registry, guard),
        NetworkServiceServicer(manager),
        MonitorConnectionServicer(manager),
    ]
    failure: OSError | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await nursery.start(manager.run)
        try:
            await nursery.start(partial(serve, servicers, UnixAddress(path), tls=tls))
        except OSError as exc:
            # Raised below, outside the nursery: the bare OSError, not an exception group.
            failure = exc
            nursery.cancel_scope.cancel()
        else:
            logger.info(
                "serving",
                service="nsm",
                address=f"unix://{path}",
                forwarder=type(forwarder).__name__,
                lifetime=default_lifetime,
                security="mutual TLS" if tls else "plain text",
            )
            task_status.started(path)
    if failure is not None:
        raise failure
