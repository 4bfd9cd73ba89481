"""The target-facing NSM endpoint: `proxy.<conduit>.<trench>.<namespace>` for the node's pods.

Per Request (initial, refresh or heal): validate (INVALID_ARGUMENT with a message, logged: no
path, no id, a first segment without id, no or another network service than ours, no supported
mechanism, an IP context holding something that is not an address), take our hop in the path,
allocate the target's addresses keyed by its first path segment id (so they survive a proxy
restart), set the IP context (`ipcontext.nse_context`), choose the mechanism (KERNEL, or NOOP
without an interface) with a stable interface name for our side and, for KERNEL, our network
namespace (`inodeURL`, as the sdk's kernel mechanism server sets it: sent back to nsmgr as a
descriptor on a UNIX socket, NSM's sendfd server, `nsm.sendfd`), set the MTU, and tell the
router to make the interface a bridge port. A connection that is not refreshed before it
expires is closed as NSM's timeout would: its port is released and its addresses go back to
IPAM after the release delay. Close does the same at once. MonitorConnections reports the
connections at our hop. Labels are not checked: NSM used them to choose this endpoint.

A target's key may not be one of the proxy's own LB connection keys (`reserved_prefix`): a
request with such a key is refused and such a Close ignored, or a target could take, or
release, an LB connection's addresses.

A key (and so its addresses and port) is released only when no connection we know holds it:
a Close for a connection we do not know, or the end of one of two connections of one target
(a target that requested afresh before its old connection was closed), names a key that may be
another connection's, and releasing it would cut a live target off.

The endpoint task owns the connection table; handlers run in the RPC server's tasks and only
touch the table synchronously (no await between reading and writing an entry), and requests for
one connection are taken one at a time.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import attrs
import trio
from google.protobuf.empty_pb2 import Empty
from loguru import logger

from proxy.api.networkservice import connection_grpc, networkservice_grpc
from proxy.api.networkservice.connection_pb2 import (
    Connection,
    ConnectionEvent,
    ConnectionEventType,
    Mechanism,
    MonitorScopeSelector,
)
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.kernel.model import IPInterface
from proxy.kernel.router import RouterEvent, SetTargetPort
from proxy.nsm.hoptoken import Signer
from proxy.nsm.ipcontext import context_problems, nse_context
from proxy.nsm.path import Hop, PathError, server_hop
from proxy.nsm.sendfd import INODE_URL, NETNS_URL, send_answer
from proxy.nsm.wire import interface_name, seconds, timestamp
from proxy.rpc import CallContext, InvalidArgumentError, UnavailableError
from proxy.watched import Watched

KERNEL, NOOP = "KERNEL", "NOOP"
MONITOR_BUFFER = 64


class AddressPair(Protocol):
    @property
    def src(self) -> Sequence[IPInterface]: ...

    @property
    def dst(self) -> Sequence[IPInterface]: ...


class Addresses(Protocol):
    """What the endpoint needs of the IPAM client."""

    async def allocate_pair(self, key: str) -> AddressPair: ...

    def release_later(self, key: str) -> None: ...


@attrs.frozen
class TargetConnection:
    key: str  # the target's first path segment id: the IPAM key
    interface: str | None  # our side's interface (None for NOOP)
    connection: Connection  # as answered, at our hop
    expires: float  # trio time


def expiry(connection: Connection, now: float, wall_now: float, default_lifetime: float) -> float:
    """When an un-refreshed connection is closed: at the previous hop's token expiry (NSM's
    timeout server), else after the default lifetime; in trio time."""
    path = connection.path
    if path.index >= 1 and path.path_segments[path.index - 1].HasField("expires"):
        left = seconds(path.path_segments[path.index - 1].expires) - wall_now
        return now + max(0.0, left)
    return now + default_lifetime


def selector_matches(selector: MonitorScopeSelector, connection: Connection) -> bool:
    """NSM's monitor scope: empty selects all; services must include the connection's; path
    segments must match a contiguous run (each non-empty name/id/token equal)."""
    if selector.network_services and connection.network_service not in selector.network_services:
        return False
    wanted = list(selector.path_segments)
    if not wanted:
        return True
    segments = list(connection.path.path_segments)
    for start in range(len(segments) - len(wanted) + 1):
        if all(
            (not w.name or w.name == s.name)
            and (not w.id or w.id == s.id)
            and (not w.token or w.token == s.token)
            for w, s in zip(wanted, segments[start:], strict=False)
        ):
            return True
    return False


class TargetEndpoint:
    def __init__(
        self,
        *,
        name: str,
        service_name: str,
        mtu: int,
        addresses: Addresses,
        gateways: Watched[frozenset[IPInterface]],
        router: trio.MemorySendChannel[RouterEvent],
        default_lifetime: float,
        allocation_timeout: float,
        reserved_prefix: str,
        signer: Signer | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._signer = signer  # NSM's tokens checked on every call (None: plain text)
        self.name = name
        self.reserved_prefix = reserved_prefix  # the LB connections' keys: never a target's
        self.service_name = service_name
        self.mtu = mtu
        self._addresses = addresses
        self._gateways = gateways
        self._router = router
        self._default_lifetime = default_lifetime
        self._allocation_timeout = allocation_timeout
        self._wall = wall_clock
        self.connections: dict[str, TargetConnection] = {}  # by our segment id
        self._busy: dict[str, trio.Event] = {}  # per our id: a request or close in progress
        self._changed = trio.Event()  # wakes the expiry task
        self._monitors: set[_Watcher] = set()

    def servicers(self) -> list[object]:
        """The purerpc servicers to serve on the endpoint socket."""
        return [_NetworkService(self), _Monitor(self)]

    # -- Request / Close ------------------------------------------------------------------------

    async def request(self, message: NetworkServiceRequest, context: CallContext) -> Connection:
        try:
            hop, mechanism = self._accepted(message)
        except InvalidArgumentError as exc:
            # The client only sees the status; the operator needs to see who sent what.
            logger.warning(
                "target request refused",
                conn_id=message.connection.id[:80] or "-",
                peer_pid=context.peer.pid or "-",
                reason=exc.status.status_message,
            )
            raise
        if self._signer is not None:  # NSM's tokens: before anything is allocated
            self._signer.server_check(hop.connection, context.custom_metadata, context.peer)
        our_id = hop.connection.id
        async with self._turn(our_id):
            # Bounded even when the caller set no deadline (the handler has the caller's).
            try:
                with trio.fail_after(self._allocation_timeout):
                    pair = await self._addresses.allocate_pair(hop.first_id)
            except trio.TooSlowError:
                raise UnavailableError("IPAM did not answer in time") from None
            except Exception as exc:
                logger.warning("target request failed", conn_id=our_id, reason=str(exc))
                raise UnavailableError(f"cannot allocate addresses: {exc}") from None
            connection = Connection()
            connection.CopyFrom(hop.connection)
            ip_context = nse_context(
                connection.context.ip_context,
                src=pair.src,
                dst=pair.dst,
                gateways=sorted(self._gateways.value, key=lambda g: g.version),
            )
            connection.context.ip_context.CopyFrom(ip_context)
            connection.context.MTU = self.mtu
            interface = None
            if mechanism.type == KERNEL:
                interface = interface_name(self.service_name, hop.first_id)
                mechanism.parameters["name"] = interface
                mechanism.parameters[INODE_URL] = NETNS_URL
            connection.mechanism.CopyFrom(mechanism)
            segment = connection.path.path_segments[connection.path.index]
            segment.expires.CopyFrom(timestamp(self._wall() + self._default_lifetime))
            previous = self.connections.get(our_id)
            self.connections[our_id] = TargetConnection(
                hop.first_id,
                interface,
                connection,
                expiry(connection, trio.current_time(), self._wall(), self._default_lifetime),
            )
            if interface is not None and (previous is None or previous.interface != interface):
                await self._router.send(SetTargetPort(interface))
            self._wake()
            self._publish(ConnectionEventType.UPDATE, connection)
            logger.info(
                "target connected" if previous is None else "target refreshed",
                conn_id=our_id,
                key=hop.first_id,
                interface=interface or "-",
            )
            answer = hop.answer(connection)
        send_answer(context.fds, answer)
        return answer

    def _accepted(self, message: NetworkServiceRequest) -> tuple[Hop, Mechanism]:
        """Our hop of a request we can serve, and the mechanism; InvalidArgumentError if not."""
        if not message.HasField("connection"):
            raise InvalidArgumentError("the request has no connection")
        incoming = message.connection
        if not incoming.id:
            raise InvalidArgumentError("the connection has no id")
        if not incoming.network_service:
            raise InvalidArgumentError("the connection names no network service")
        if incoming.network_service != self.service_name:
            raise InvalidArgumentError(
                f"network service {incoming.network_service[:80]!r} is not served here"
                f" (this endpoint serves {self.service_name!r})"
            )
        mechanism = self._choose_mechanism(message)
        problems = context_problems(incoming.context.ip_context)
        if problems:
            raise InvalidArgumentError("bad IP context: " + "; ".join(problems))
        try:
            hop = server_hop(incoming, self.name)
        except PathError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if not hop.first_id:
            raise InvalidArgumentError(
                "path segment 0 has no id (the client's identity, which keys its addresses)"
            )
        if hop.first_id.startswith(self.reserved_prefix):
            raise InvalidArgumentError(
                f"path segment 0 id {hop.first_id[:80]!r} is one of this proxy's own"
                " load-balancer connection keys"
            )
        return hop, mechanism

    async def close(self, message: Connection, context: CallContext) -> Empty:
        try:
            hop = server_hop(message, self.name, new_id=lambda: "")
        except PathError:
            return Empty()  # nothing of ours can be behind a path we could not take
        if self._signer is not None:
            self._signer.server_check(
                hop.connection, context.custom_metadata, context.peer, closing=True
            )
        async with self._turn(hop.connection.id):
            if hop.connection.id in self.connections:
                await self._forget(hop.connection.id, reason="closed")
            elif holders := self._holders(hop.first_id):
                # Not this connection, but its key is held by one we know: a stale or forged
                # Close. Releasing by key would take a live target's addresses and port.
                logger.warning(
                    "close of an unknown connection ignored: its key is in use",
                    conn_id=hop.connection.id or "-",
                    key=hop.first_id,
                    holder=next(iter(holders)),
                )
            elif hop.first_id.startswith(self.reserved_prefix):
                logger.warning(
                    "close naming a load-balancer connection's key ignored",
                    conn_id=hop.connection.id or "-",
                    key=hop.first_id,
                )
            elif hop.first_id:  # (no id, no key: nothing could have been allocated for it)
                # Not known here: a previous instance of the proxy served it (its table died
                # with it). The target is leaving all the same: release by its key and port.
                await self._forget_unknown(hop)
        return Empty()

    def _holders(self, key: str) -> dict[str, TargetConnection]:
        """The connections that hold `key`, by our id."""
        return {our_id: conn for our_id, conn in self.connections.items() if conn.key == key}

    async def _forget_unknown(self, hop: Hop) -> None:
        self._addresses.release_later(hop.first_id)
        if hop.connection.mechanism.type != NOOP:
            name = interface_name(self.service_name, hop.first_id)
            await self._router.send(SetTargetPort(name, wanted=False))
        logger.info("unknown target disconnected", key=hop.first_id)

    def _choose_mechanism(self, message: NetworkServiceRequest) -> Mechanism:
        chosen = Mechanism()
        if message.connection.HasField("mechanism") and message.connection.mechanism.type:
            if message.connection.mechanism.type not in (KERNEL, NOOP):
                raise InvalidArgumentError(
                    f"mechanism {message.connection.mechanism.type[:40]!r} is not supported "
                    "(KERNEL, NOOP)"
                )
            chosen.CopyFrom(message.connection.mechanism)
            return chosen
        for preference in message.mechanism_preferences:
            if preference.type in (KERNEL, NOOP):
                chosen.CopyFrom(preference)
                return chosen
        offered = ", ".join(p.type[:40] or "?" for p in message.mechanism_preferences) or "none"
        raise InvalidArgumentError(
            f"no supported mechanism (offered: {offered}; supported: KERNEL, NOOP)"
        )

    async def _forget(self, our_id: str, *, reason: str) -> None:
        gone = self.connections.pop(our_id, None)
        if gone is None:
            return
        others = self._holders(gone.key)
        if others:
            holder = next(iter(others))
            logger.info("key kept: another connection holds it", key=gone.key, holder=holder)
        else:
            self._addresses.release_later(gone.key)
        if gone.interface is not None and all(
            conn.interface != gone.interface for conn in others.values()
        ):
            await self._router.send(SetTargetPort(gone.interface, wanted=False))
        self._publish(ConnectionEventType.DELETE, gone.connection)
        self._wake()
        logger.info("target disconnected", conn_id=our_id, key=gone.key, reason=reason)

    # -- per-connection turns -------------------------------------------------------------------

    def _turn(self, our_id: str) -> _Turn:
        return _Turn(self._busy, our_id)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- expiry ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close connections that were not refreshed in time (until cancelled)."""
        task_status.started()
        while True:
            now = trio.current_time()
            for our_id, conn in list(self.connections.items()):
                if conn.expires <= now and our_id not in self._busy:
                    async with self._turn(our_id):
                        current = self.connections.get(our_id)
                        if current is not None and current.expires <= trio.current_time():
                            await self._forget(our_id, reason="expired")
            deadline = min((c.expires for c in self.connections.values()), default=float("inf"))
            with trio.move_on_at(deadline):
                await self._changed.wait()

    # -- monitor --------------------------------------------------------------------------------

    async def monitor(self, selector: MonitorScopeSelector) -> AsyncIterator[ConnectionEvent]:
        send, receive = trio.open_memory_channel[ConnectionEvent](MONITOR_BUFFER)
        entry = _Watcher(selector, send)
        initial = ConnectionEvent(type=ConnectionEventType.INITIAL_STATE_TRANSFER)
        for our_id, conn in self.connections.items():
            if selector_matches(selector, conn.connection):
                initial.connections[our_id].CopyFrom(conn.connection)
        self._monitors.add(entry)
        try:
            yield initial
            async with receive:
                async for event in receive:
                    yield event
        finally:
            self._monitors.discard(entry)

    def _publish(self, kind: ConnectionEventType, connection: Connection) -> None:
        for watcher in list(self._monitors):
            if not selector_matches(watcher.selector, connection):
                continue
            event = ConnectionEvent(type=kind)
            event.connections[connection.id].CopyFrom(connection)
            try:
                watcher.send.send_nowait(event)
            except trio.WouldBlock:
                logger.warning("monitor stream too slow, closing it")
                self._monitors.discard(watcher)
                watcher.send.close()


@attrs.frozen(eq=False)
class _Watcher:
    selector: MonitorScopeSelector
    send: trio.MemorySendChannel[ConnectionEvent]


class _Turn:
    """One request or close per connection at a time (NSM's `begin`), without a lock object."""

    def __init__(self, busy: dict[str, trio.Event], key: str) -> None:
        self._busy = busy
        self._key = key

    async def __aenter__(self) -> None:
        while (pending := self._busy.get(self._key)) is not None:
            await pending.wait()
        self._busy[self._key] = trio.Event()

    async def __aexit__(self, *exc: object) -> None:
        self._busy.pop(self._key).set()


class _NetworkService(networkservice_grpc.NetworkServiceServicer):  # type: ignore[misc]
    def __init__(self, endpoint: TargetEndpoint) -> None:
        self._endpoint = endpoint

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        return await self._endpoint.request(message, request)

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        return await self._endpoint.close(message, request)


class _Monitor(connection_grpc.MonitorConnectionServicer):  # type: ignore[misc]
    def __init__(self, endpoint: TargetEndpoint) -> None:
        self._endpoint = endpoint

    async def MonitorConnections(
        self, message: MonitorScopeSelector
    ) -> AsyncIterator[ConnectionEvent]:
        async for event in self._endpoint.monitor(message):
            yield event
