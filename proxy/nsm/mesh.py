"""The full mesh: one NSM connection from the proxy to every load-balancer of its conduit.

The mesh task owns one task per load-balancer, started on `LbSeen` and cancelled on `LbGone`.
Each connection task:

* requests `NSM_NETWORK_SERVICE_NAME` from the local NSM manager, naming the LB's endpoint, with
  the kernel mechanism and an interface name derived from the connection id, and the IP context
  of the NSC side (`ipcontext.nsc_context`; addresses from IPAM keyed by the connection id);
  every try is bounded by NSM_REQUEST_TIMEOUT and retried with backoff; the mechanism names the
  proxy's network namespace, which goes as a descriptor on NSM's UNIX socket (`nsm.sendfd`:
  Requests and Closes carry it, the answer's URL is mapped back);
* tells the router the LB's interface and addresses (`SetLoadBalancer`): the router makes the
  interface a bridge port and the addresses nexthops while the interface exists;
* refreshes the connection before its tokens expire (NSM's refresh client: at 0.2 of the time
  left for a client at index 0 of a multi-hop path, 1/3 for a single segment);
* on cancellation (LB gone, or the proxy stopping) closes it within NSM_REQUEST_TIMEOUT and the
  shutdown budget, takes it out of the router, and lets IPAM release its addresses later.

The connection id is `<NSM_NAME>-<network service>-<endpoint>` (upstream's, no random part) and
the interface name is derived from it. After a restart, before its first Request, a connection
task asks the manager for the connection it had (MonitorConnections selecting its id, first
event only, as upstream) and, when found, sends it as a refresh: NSM keeps the interface (and
IPAM the addresses), nothing is duplicated. Upstream forces a reselect there, which tears the
LB's interface down and up again; with the bridge's stable MAC the reason for it (stale
neighbour entries) is gone, and a refresh loses no traffic.
Closes of several LBs run in parallel (upstream closed them one after another, §11.6).

`Mesh.settled` is set once every load-balancer registered at start (`LbListed`) is connected
(or gone): the load-balancer nexthops a previous instance left that nobody claimed by then are
stale. The proxy waits for it at most NSM_REQUEST_TIMEOUT, so an LB that vanished while the proxy
was down stops taking egress traffic as soon as the others are back, not a timeout later.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

import attrs
import trio
from loguru import logger

from proxy.api.networkservice import connection_grpc
from proxy.api.networkservice.connection_pb2 import (
    Connection,
    ConnectionEvent,
    Mechanism,
    MonitorScopeSelector,
    PathSegment,
)
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.kernel.model import IPAddress
from proxy.kernel.router import RemoveLoadBalancer, RouterEvent, SetLoadBalancer
from proxy.nsm import nsc
from proxy.nsm.discovery import LbEvent, LbGone, LbListed, LbSeen
from proxy.nsm.endpoint import Addresses
from proxy.nsm.hoptoken import Signer, call_metadata
from proxy.nsm.ipcontext import nsc_context
from proxy.nsm.sendfd import (
    INODE_URL,
    NETNS_URL,
    FdPassError,
)
from proxy.nsm.wire import interface_name, seconds
from proxy.rpc import Backoff, ReconnectingChannel, RpcFailedError, server_stream
from proxy.rpc.status import describe_status
from proxy.shutdown import Shutdown

REFRESH_RETRY = 0.2


@attrs.frozen
class MeshSettings:
    name: str  # NSM_NAME
    service: str  # NSM_NETWORK_SERVICE_NAME
    mtu: int
    request_timeout: float
    max_backoff: float
    default_lifetime: float  # when the answer's path carries no expiry
    signer: Signer | None = None  # NSM's per-hop tokens (None: plain text, no tokens)


def connection_key_prefix(name: str, service: str) -> str:
    """What every LB connection id (and so its IPAM key) starts with: `<name>-<service>-`."""
    return f"{name}-{service}-"


def connection_id(settings: MeshSettings, nse: str) -> str:
    return connection_key_prefix(settings.name, settings.service) + nse


def time_left(connection: Connection, wall_now: float, default: float) -> float:
    """Until the first token of the path expires (`default` when no segment says)."""
    left = [
        seconds(s.expires) - wall_now
        for s in connection.path.path_segments
        if s.HasField("expires")
    ]
    return max(0.0, min(left)) if left else default


def refresh_in(connection: Connection, wall_now: float, default: float) -> float:
    """When to refresh: NSM's share of the time left (1/3 for one segment, else
    0.2 + 0.2 * index / segments: 0.2 for the first hop)."""
    segments = len(connection.path.path_segments)
    scale = 1 / 3 if segments <= 1 else 0.2 + 0.2 * connection.path.index / segments
    return time_left(connection, wall_now, default) * scale


def recoverable(event: ConnectionEvent, conn_id: str) -> Connection | None:
    """From the manager's first monitor event: our connection (its hop at index 1, our segment
    first, the kernel mechanism), as the client side sends it (index 0, our id)."""
    for connection in event.connections.values():
        path = connection.path
        if (
            path.index == 1
            and path.path_segments
            and path.path_segments[0].id == conn_id
            and connection.mechanism.type == "KERNEL"
        ):
            ours = Connection()
            ours.CopyFrom(connection)
            ours.id = conn_id
            ours.path.index = 0
            return ours
    return None


def lb_addresses(connection: Connection) -> frozenset[IPAddress]:
    """The load-balancer's addresses: `dst_ip_addrs` of the answer, without prefix length."""
    found = set()
    for text in connection.context.ip_context.dst_ip_addrs:
        try:
            found.add(ipaddress.ip_interface(text).ip)
        except ValueError:
            logger.warning("load-balancer address ignored", address=text)
    return frozenset(found)


class LbConnection:
    def __init__(
        self,
        nse: str,
        settings: MeshSettings,
        *,
        nsm: ReconnectingChannel,
        addresses: Addresses,
        router: trio.MemorySendChannel[RouterEvent],
        shutdown: Shutdown,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.nse = nse
        self.settings = settings
        self.id = connection_id(settings, nse)
        self.interface = interface_name(settings.service, self.id)
        self._nsm = nsm
        self._addresses = addresses
        self._router = router
        self._shutdown = shutdown
        self._wall = wall_clock
        self._backoff = Backoff(maximum=settings.max_backoff)
        self.connection: Connection | None = None  # the last answer
        self.requests = 0
        # Connected once, or stopped: this LB no longer holds up `Mesh.settled`.
        self.settled = trio.Event()

    async def run(self) -> None:
        default = self.settings.default_lifetime
        try:
            while True:
                self.connection = await self._establish()
                self.settled.set()
                while True:
                    connection = self.connection
                    expires_at = trio.current_time() + time_left(connection, self._wall(), default)
                    await trio.sleep(refresh_in(connection, self._wall(), default))
                    refreshed = await self._refresh(until=expires_at)
                    if refreshed is None:
                        logger.warning(
                            "connection expired unrefreshed, reconnecting", conn_id=self.id
                        )
                        break
                    self.connection = refreshed
        finally:
            self.settled.set()
            with self._shutdown.cleanup(self.settings.request_timeout):
                await self._close()

    async def _establish(self) -> Connection:
        failures = 0
        if self.connection is None:
            self.connection = await self._recover()
        while True:
            try:
                answer = await self._request(self.connection)
                self._backoff.reset()
                logger.info(
                    "load-balancer connected",
                    conn_id=self.id,
                    nse=self.nse,
                    interface=self.interface,
                )
                return answer
            except Exception as exc:  # RPC, IPAM or a timeout: all retried
                if failures == 0:
                    logger.warning(
                        "load-balancer request failed, retrying",
                        conn_id=self.id,
                        reason=_reason(exc),
                    )
                failures += 1
                if self.connection is None:
                    self._addresses.release_later(self.id)
            await trio.sleep(self._backoff.next_delay())

    async def _recover(self) -> Connection | None:
        """The connection NSM still has for our id (a previous instance's), ready to refresh."""
        selector = MonitorScopeSelector(path_segments=[PathSegment(id=self.id)])
        try:
            with trio.move_on_after(self.settings.request_timeout):
                channel = await self._nsm.get()
                stub = connection_grpc.MonitorConnectionStub(channel)
                metadata = call_metadata(self.settings.signer, channel)
                async with server_stream(
                    stub.MonitorConnections, selector, metadata=metadata
                ) as events:
                    async for event in events:
                        found = recoverable(event, self.id)
                        if found is not None:
                            logger.info("load-balancer connection recovered", conn_id=self.id)
                        return found
        except RpcFailedError as exc:
            logger.debug("no connection to recover", conn_id=self.id, reason=describe_status(exc))
        return None

    async def _refresh(self, *, until: float) -> Connection | None:
        while trio.current_time() < until:
            try:
                return await self._request(self.connection)
            except (RpcFailedError, trio.TooSlowError, FdPassError) as exc:
                logger.debug("refresh failed, retrying", conn_id=self.id, reason=_reason(exc))
            await trio.sleep(REFRESH_RETRY)
        return None

    async def _request(self, previous: Connection | None) -> Connection:
        with trio.fail_after(self.settings.request_timeout):
            pair = await self._addresses.allocate_pair(self.id)
            connection = Connection()
            if previous is not None:
                connection.CopyFrom(previous)
            else:
                connection.id = self.id
                connection.network_service = self.settings.service
                connection.network_service_endpoint_name = self.nse
                connection.payload = "ETHERNET"
                connection.path.path_segments.append(
                    PathSegment(name=self.settings.name, id=self.id)
                )
            connection.id = self.id
            connection.path.index = 0
            connection.context.ip_context.CopyFrom(
                nsc_context(connection.context.ip_context, src=pair.src, dst=pair.dst)
            )
            connection.context.MTU = self.settings.mtu
            if connection.mechanism.type == "KERNEL":
                # Our namespace now, whatever an earlier answer (or a previous instance of the
                # proxy, for a recovered connection) said: NSM prefers the connection's own.
                connection.mechanism.parameters[INODE_URL] = NETNS_URL
            mechanism = Mechanism(
                cls="LOCAL",
                type="KERNEL",
                parameters={"name": self.interface, INODE_URL: NETNS_URL},
            )
            request = NetworkServiceRequest(
                connection=connection, mechanism_preferences=[mechanism]
            )
            answer = await nsc.request(await self._nsm.get(), request, self.settings.signer)
        self.requests += 1
        interface = answer.mechanism.parameters.get("name", self.interface) or self.interface
        await self._router.send(SetLoadBalancer(self.id, interface, lb_addresses(answer)))
        return answer

    async def _close(self) -> None:
        await self._router.send(RemoveLoadBalancer(self.id))
        if self.connection is not None:
            try:
                await nsc.close(await self._nsm.get(), self.connection, self.settings.signer)
                logger.info("load-balancer connection closed", conn_id=self.id, nse=self.nse)
            except (RpcFailedError, FdPassError) as exc:
                logger.warning("close failed", conn_id=self.id, reason=_reason(exc))
        self._addresses.release_later(self.id)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, RpcFailedError):
        return describe_status(exc)
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


class Mesh:
    """Owns the load-balancer connections: one task each, started and stopped by discovery."""

    def __init__(
        self,
        settings: MeshSettings,
        *,
        nsm: ReconnectingChannel,
        addresses: Addresses,
        router: trio.MemorySendChannel[RouterEvent],
        shutdown: Shutdown,
    ) -> None:
        self.settings = settings
        self._nsm = nsm
        self._addresses = addresses
        self._router = router
        self._shutdown = shutdown
        self.connections: dict[str, tuple[LbConnection, trio.CancelScope]] = {}
        self.settled = trio.Event()  # every LB listed at start connected (or gone)

    async def run(
        self,
        events: trio.MemoryReceiveChannel[LbEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            task_status.started()
            async for event in events:
                if isinstance(event, LbSeen) and event.name not in self.connections:
                    lb = LbConnection(
                        event.name,
                        self.settings,
                        nsm=self._nsm,
                        addresses=self._addresses,
                        router=self._router,
                        shutdown=self._shutdown,
                    )
                    scope = await nursery.start(self._run_one, lb)
                    self.connections[event.name] = (lb, scope)
                elif isinstance(event, LbGone) and event.name in self.connections:
                    self.connections.pop(event.name)[1].cancel()
                elif isinstance(event, LbListed):
                    listed = [self.connections[n][0] for n in event.names if n in self.connections]
                    nursery.start_soon(self._settle, listed)

    async def _settle(self, listed: list[LbConnection]) -> None:
        for lb in listed:
            await lb.settled.wait()
        self.settled.set()

    async def _run_one(
        self, lb: LbConnection, *, task_status: trio.TaskStatus[trio.CancelScope]
    ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await lb.run()
