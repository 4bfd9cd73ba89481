"""The lab NSM registry: `registry.NetworkServiceRegistry` and
`registry.NetworkServiceEndpointRegistry`, in memory, as nsmgr serves them (wire-api §4.3).

* Register stores (a re-registration of the same name replaces the record and is a refresh);
  Unregister removes; Find answers the current matches and, with `watch`, every later change.
* NSE records expire: the `expiration_time` the client sends is kept (absent: now +
  `default_lifetime`); the registry fills `initial_registration_time` on the first registration
  and keeps it on refreshes. A record not refreshed by its expiration time is removed and
  watchers get it with `deleted: true`. Register with `expiration_time {seconds: -1}`
  (upstream's legacy "unregistered" marker) removes, like Unregister.
* Find query matching (NSE): a non-empty `name` is exact; `network_service_names` ⊆ the NSE's;
  `network_service_labels` per service a subset; `url` a substring; `expiration_time` seconds
  equal when set. (NS): a non-empty `name` is exact; a non-empty `payload` equal.
* An endpoint that registers its socket as a descriptor (NSM's sendfd: `url` is
  `inode://dev/ino` and the socket file came with the call) is stored at
  `unix:///proc/<our pid>/fd/<n>`, where the manager dials it whatever mount namespace the
  endpoint lives in (nsmgr's recvfd). The registry holds the descriptor until the endpoint
  unregisters, expires or registers another socket (a refresh naming the same socket keeps the
  one it has, and so its URL). Find answers with that URL, as nsmgr's localbypass does for its
  local endpoints (it stores the real URL and publishes its own upstream; the lab is the one
  node's nsmgr and registry in one); the Register answer carries the URL the endpoint sent, for
  it to map back. An `inode://` URL on a connection that cannot carry descriptors (TCP) is
  stored as it came, as recvfd passes it on; any other URL (`unix://path`, `tcp://`) likewise.
* With mutual TLS, Register and Unregister go through NSM's registry `updatepath` and
  `authorize` (`RegistryGuard`): the caller's token and `path` metadata, the path answered in
  the `path` response header, an endpoint name kept to the SPIFFE ID that registered it. In
  plain text the lab trusts its local clients (no tokens, no path).

All state is owned by one task (`Registry.run`); the gRPC handlers and the manager hand it jobs
through a `Mailbox`. A watcher gets its changes through its own bounded memory channel: one that
falls `watch_buffer` changes behind is dropped (its stream ends with RESOURCE_EXHAUSTED and a
warning is logged) rather than let it hold up the registry.

The registry keeps wall-clock timestamps (protobuf Timestamps) but waits on trio's clock:
`WallClock` ties the two, so tests drive expiry with `trio.testing.MockClock`.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from typing import Any, Generic, NoReturn, TypeVar

import attrs
import outcome
import trio
from google.protobuf.empty_pb2 import Empty
from loguru import logger
from purerpc.grpclib.exceptions import ResourceExhaustedError

from proxy.api.registry import registry_grpc
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    NetworkServiceQuery,
    NetworkServiceResponse,
)
from proxy.lab.nsm.recvfd import Handoff, receive
from proxy.nsm.hoptoken import Admission, RegistryGuard
from proxy.nsm.wire import seconds, timestamp
from proxy.rpc import CallContext, DeadlineExceededError, InvalidArgumentError
from proxy.rpc.fdpass import FdUrlError, is_inode_url, parse_inode_url, proc_fd_url
from proxy.security.tokens import PATH_KEY, registry_path_json

DEFAULT_LIFETIME = 60.0
RECEIVE_TIMEOUT = 15.0  # for an endpoint's socket descriptor, when the caller set no deadline
WATCH_BUFFER = 256  # changes a watcher may fall behind before it is dropped
MAILBOX_SIZE = 64
UNREGISTERED = -1  # expiration_time.seconds of upstream's legacy "unregistered" marker

R = TypeVar("R")
T = TypeVar("T")


# -- time ------------------------------------------------------------------------------------------


class WallClock:
    """Wall-clock seconds that advance with trio's clock (a MockClock in tests).

    Records carry wall-clock timestamps; timers run on trio time. Create it inside `trio.run`.
    """

    def __init__(self, start: float | None = None) -> None:
        self._offset = (time.time() if start is None else start) - trio.current_time()

    def now(self) -> float:
        return trio.current_time() + self._offset

    def trio_time(self, wall: float) -> float:
        """The trio time at which the wall clock reads `wall`."""
        return wall - self._offset


# -- owning state in one task ----------------------------------------------------------------------


@attrs.frozen
class _Job(Generic[R]):
    work: Callable[[], R]
    reply: trio.MemorySendChannel[outcome.Outcome[R]]

    def run(self) -> None:
        result = outcome.capture(self.work)
        with contextlib.suppress(trio.BrokenResourceError):  # the asker gave up waiting
            self.reply.send_nowait(result)


class Mailbox:
    """Jobs for the one task that owns some state.

    Other tasks `ask` with a plain (synchronous) function; the owner runs the jobs one at a time,
    so the state is never seen half-changed and needs no lock. A job's exception is raised in the
    asker.
    """

    def __init__(self, capacity: int = MAILBOX_SIZE) -> None:
        self._send, self._receive = trio.open_memory_channel[_Job[Any]](capacity)

    async def ask(self, work: Callable[[], R]) -> R:
        reply_send, reply_receive = trio.open_memory_channel[outcome.Outcome[R]](1)
        with reply_receive:
            await self._send.send(_Job(work, reply_send))
            result = await reply_receive.receive()
        return result.unwrap()

    async def next_job(self) -> _Job[Any]:
        return await self._receive.receive()

    async def serve(self) -> NoReturn:
        """Run jobs until cancelled (for an owner with nothing else to do)."""
        while True:
            (await self.next_job()).run()


@attrs.frozen
class Overflow:
    """The last item of a subscriber's channel when it fell too far behind."""

    pending: int


def deliver(send: trio.MemorySendChannel[Any], item: object) -> bool:
    """Queue `item` for a subscriber without waiting; False (and the channel closed) when the
    subscriber is gone, or is too slow: then its last item is an `Overflow`."""
    stats = send.statistics()
    if stats.open_receive_channels == 0:
        send.close()
        return False
    if stats.current_buffer_used >= stats.max_buffer_size - 1:
        send.send_nowait(Overflow(stats.current_buffer_used))
        send.close()
        return False
    send.send_nowait(item)
    return True


# -- pure decisions --------------------------------------------------------------------------------


def nse_matches(query: NetworkServiceEndpoint, nse: NetworkServiceEndpoint) -> bool:
    """Whether `nse` answers a Find whose query endpoint is `query` (wire-api §4.3)."""
    if query.name and query.name != nse.name:
        return False
    if not set(query.network_service_names) <= set(nse.network_service_names):
        return False
    for service, wanted in query.network_service_labels.items():
        if service not in nse.network_service_labels:
            return False
        have = nse.network_service_labels[service].labels
        if any(have.get(key) != value for key, value in wanted.labels.items()):
            return False
    if query.url and query.url not in nse.url:
        return False
    return not (
        query.HasField("expiration_time")
        and query.expiration_time.seconds != nse.expiration_time.seconds
    )


def ns_matches(query: NetworkService, ns: NetworkService) -> bool:
    return (not query.name or query.name == ns.name) and (
        not query.payload or query.payload == ns.payload
    )


def is_unregister_marker(nse: NetworkServiceEndpoint) -> bool:
    return nse.HasField("expiration_time") and nse.expiration_time.seconds == UNREGISTERED


def stamp_registration(
    nse: NetworkServiceEndpoint,
    previous: NetworkServiceEndpoint | None,
    now: float,
    default_lifetime: float,
) -> NetworkServiceEndpoint:
    """The record stored for a Register of `nse` (a refresh when `previous` is the stored one)."""
    stored = NetworkServiceEndpoint()
    stored.CopyFrom(nse)
    if not stored.HasField("expiration_time"):
        stored.expiration_time.CopyFrom(timestamp(now + default_lifetime))
    if previous is not None and previous.HasField("initial_registration_time"):
        stored.initial_registration_time.CopyFrom(previous.initial_registration_time)
    else:
        stored.initial_registration_time.CopyFrom(timestamp(now))
    return stored


def expiry_of(nse: NetworkServiceEndpoint) -> float:
    return seconds(nse.expiration_time) if nse.HasField("expiration_time") else math.inf


def expired(endpoints: Iterable[NetworkServiceEndpoint], now: float) -> list[str]:
    """Names of the records whose expiration time has come."""
    return [nse.name for nse in endpoints if expiry_of(nse) <= now]


def next_expiry(endpoints: Iterable[NetworkServiceEndpoint]) -> float:
    """The earliest expiration time (wall clock), inf when none."""
    return min((expiry_of(nse) for nse in endpoints), default=math.inf)


# -- the registry ----------------------------------------------------------------------------------


@attrs.frozen
class Change(Generic[T]):
    item: T
    deleted: bool


@attrs.frozen
class _Watcher(Generic[T]):
    query: T
    send: trio.MemorySendChannel[Any]
    who: str


Changes = trio.MemoryReceiveChannel[Any]  # Change[...] items, possibly ending with an Overflow


class Registry:
    """Both registries' records and watchers, owned by the task running `run`."""

    def __init__(
        self,
        clock: WallClock,
        *,
        default_lifetime: float = DEFAULT_LIFETIME,
        watch_buffer: int = WATCH_BUFFER,
    ) -> None:
        if watch_buffer < 2:
            raise ValueError("watch_buffer must be at least 2")
        self.clock = clock
        self.default_lifetime = default_lifetime
        self.watch_buffer = watch_buffer
        self._mailbox = Mailbox()
        self._services: dict[str, NetworkService] = {}
        self._endpoints: dict[str, NetworkServiceEndpoint] = {}
        self._sockets: dict[str, tuple[str, int]] = {}  # by NSE name: (inode URL, descriptor)
        self._service_watchers: list[_Watcher[NetworkService]] = []
        self._endpoint_watchers: list[_Watcher[NetworkServiceEndpoint]] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the records: run jobs and expire endpoints, until cancelled."""
        task_status.started()
        try:
            while True:
                job = None
                with trio.move_on_at(self.clock.trio_time(next_expiry(self._endpoints.values()))):
                    job = await self._mailbox.next_job()
                if job is not None:
                    job.run()
                for name in expired(self._endpoints.values(), self.clock.now()):
                    self._remove_endpoint(name, "expired")
        finally:
            for name in list(self._sockets):
                self._release_socket(name)

    # -- the API (any task) ---------------------------------------------------------------------

    async def register_service(self, ns: NetworkService) -> NetworkService:
        return await self._mailbox.ask(lambda: self._register_service(ns))

    async def unregister_service(self, ns: NetworkService) -> None:
        await self._mailbox.ask(lambda: self._unregister_service(ns.name))

    async def find_services(
        self, query: NetworkService, *, watch: bool = False, who: str = ""
    ) -> tuple[list[NetworkService], Changes | None]:
        return await self._mailbox.ask(lambda: self._find_services(query, watch, who))

    async def service(self, name: str) -> NetworkService | None:
        return await self._mailbox.ask(lambda: self._services.get(name))

    async def register_endpoint(
        self, nse: NetworkServiceEndpoint, socket: Handoff | None = None
    ) -> NetworkServiceEndpoint:
        """Store `nse`; `socket`: the descriptor its `inode://` url names, to hold from now on."""
        return await self._mailbox.ask(lambda: self._register_endpoint(nse, socket))

    async def unregister_endpoint(self, nse: NetworkServiceEndpoint) -> None:
        await self._mailbox.ask(lambda: self._remove_endpoint(nse.name, "unregistered"))

    async def find_endpoints(
        self, query: NetworkServiceEndpoint, *, watch: bool = False, who: str = ""
    ) -> tuple[list[NetworkServiceEndpoint], Changes | None]:
        return await self._mailbox.ask(lambda: self._find_endpoints(query, watch, who))

    async def endpoint(self, name: str) -> NetworkServiceEndpoint | None:
        return await self._mailbox.ask(lambda: self._endpoints.get(name))

    # -- jobs (the registry task only) ----------------------------------------------------------

    def _register_service(self, ns: NetworkService) -> NetworkService:
        stored = NetworkService()
        stored.CopyFrom(ns)
        known = ns.name in self._services
        self._services[ns.name] = stored
        if not known:
            logger.info("network service registered", ns=ns.name, payload=ns.payload)
        self._notify(self._service_watchers, ns_matches, Change(stored, deleted=False))
        return stored

    def _unregister_service(self, name: str) -> None:
        stored = self._services.pop(name, None)
        if stored is not None:
            logger.info("network service unregistered", ns=name)
            self._notify(self._service_watchers, ns_matches, Change(stored, deleted=True))

    def _find_services(
        self, query: NetworkService, watch: bool, who: str
    ) -> tuple[list[NetworkService], Changes | None]:
        found = [ns for ns in self._services.values() if ns_matches(query, ns)]
        return found, self._subscribe(self._service_watchers, query, watch, who)

    def _register_endpoint(
        self, nse: NetworkServiceEndpoint, socket: Handoff | None
    ) -> NetworkServiceEndpoint:
        if is_unregister_marker(nse):
            self._remove_endpoint(nse.name, "unregistered (expiration_time -1)")
            return nse
        url = nse.url
        if socket is not None:
            fd = socket.take()
            if fd is None:  # its caller gave up before this job ran: nothing to dial it by
                logger.debug("registration abandoned by its caller", nse=nse.name)
                return nse
            url = self._hold_socket(nse.name, nse.url, fd)
        else:
            self._release_socket(nse.name)  # (registered by descriptor before, not now)
            if nse.url.startswith("unix://"):
                logger.debug("endpoint socket by path, not by descriptor", nse=nse.name)
        previous = self._endpoints.get(nse.name)
        stored = stamp_registration(nse, previous, self.clock.now(), self.default_lifetime)
        stored.url = url
        self._endpoints[nse.name] = stored
        log = logger.info if previous is None or previous.url != stored.url else logger.debug
        log(
            "endpoint registered" if previous is None else "endpoint refreshed",
            nse=nse.name,
            services=",".join(nse.network_service_names),
            url=stored.url,
            socket=_socket_path(self._sockets.get(nse.name)) or "-",
            expires_in=round(expiry_of(stored) - self.clock.now(), 3),
        )
        self._notify(self._endpoint_watchers, nse_matches, Change(stored, deleted=False))
        return stored

    def _hold_socket(self, name: str, url: str, fd: int) -> str:
        """Hold `fd`, the socket `url` (inode://) names, for the endpoint `name`; the URL to
        dial it at. The same socket again (a refresh) keeps the descriptor held, and its URL."""
        held = self._sockets.get(name)
        if held is not None and held[0] == url:
            os.close(fd)
            fd = held[1]
        else:
            self._release_socket(name)
            self._sockets[name] = (url, fd)
        return proc_fd_url(fd, "unix")

    def _release_socket(self, name: str) -> None:
        held = self._sockets.pop(name, None)
        if held is not None:
            os.close(held[1])

    def _remove_endpoint(self, name: str, why: str) -> None:
        self._release_socket(name)
        stored = self._endpoints.pop(name, None)
        if stored is not None:
            logger.info("endpoint removed", nse=name, reason=why)
            self._notify(self._endpoint_watchers, nse_matches, Change(stored, deleted=True))

    def _find_endpoints(
        self, query: NetworkServiceEndpoint, watch: bool, who: str
    ) -> tuple[list[NetworkServiceEndpoint], Changes | None]:
        found = [nse for nse in self._endpoints.values() if nse_matches(query, nse)]
        return found, self._subscribe(self._endpoint_watchers, query, watch, who)

    def _subscribe(
        self, watchers: list[_Watcher[T]], query: T, watch: bool, who: str
    ) -> Changes | None:
        watchers[:] = [w for w in watchers if w.send.statistics().open_receive_channels]
        if not watch:
            return None
        send, receive = trio.open_memory_channel[Any](self.watch_buffer)
        watchers.append(_Watcher(query, send, who))
        return receive

    def _notify(
        self,
        watchers: list[_Watcher[T]],
        matches: Callable[[T, T], bool],
        change: Change[T],
    ) -> None:
        kept = []
        for watcher in watchers:
            if not matches(watcher.query, change.item) or deliver(watcher.send, change):
                kept.append(watcher)
            elif watcher.send.statistics().open_receive_channels:
                logger.warning(
                    "watcher too slow, its Find stream is dropped",
                    peer=watcher.who,
                    pending=self.watch_buffer,
                )
        watchers[:] = kept


# -- the services ----------------------------------------------------------------------------------


def _too_slow(overflow: Overflow) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"this watch fell {overflow.pending} changes behind and was dropped; Find again"
    )


def _socket_path(held: tuple[str, int] | None) -> str | None:
    """Where a held endpoint socket lives, as this process sees it (for the log)."""
    if held is None:
        return None
    try:
        return os.readlink(f"/proc/self/fd/{held[1]}")
    except OSError:
        return None


async def _receive_socket(nse: NetworkServiceEndpoint, context: CallContext) -> Handoff | None:
    """The socket an endpoint passed as a descriptor with its Register (recvfd), or None when
    its url names none (or it came where descriptors cannot: then the url is kept as it is)."""
    if not is_inode_url(nse.url) or is_unregister_marker(nse):
        return None
    try:
        parse_inode_url(nse.url)
    except FdUrlError as exc:
        raise InvalidArgumentError(f"url: {exc}") from None
    if context.fds is None:
        logger.debug("inode:// url without a descriptor channel, kept as it is", nse=nse.name)
        return None
    deadline = min(context.deadline, trio.current_time() + RECEIVE_TIMEOUT)
    with trio.move_on_at(deadline):
        return Handoff(await receive(context.fds, nse.url, f"endpoint {nse.name}'s socket"))
    raise DeadlineExceededError(f"endpoint {nse.name}'s socket never came as a descriptor")


def _who(context: CallContext) -> str:
    peer = context.peer
    return f"pid {peer.pid}" if peer.pid is not None else peer.address


async def _changes(changes: Changes | None) -> AsyncIterator[Change[Any]]:
    if changes is None:
        return
    with changes:
        async for change in changes:
            if isinstance(change, Overflow):
                raise _too_slow(change)
            yield change


def admit(
    guard: RegistryGuard | None,
    name: str,
    request: CallContext,
    *,
    registered: bool = False,
) -> Admission | None:
    """The guard's checks (none in plain text); `answer` the result once the call succeeds."""
    if guard is None:
        return None
    return guard.check(name, request.custom_metadata, request.peer, registered=registered)


def answer(admission: Admission | None, request: CallContext) -> None:
    """The path the caller is to carry on, in the `path` header of a successful answer."""
    if admission is not None and admission.path is not None:
        request.set_header(PATH_KEY, registry_path_json(admission.path))


class NetworkServiceRegistryServicer(registry_grpc.NetworkServiceRegistryServicer):  # type: ignore[misc]
    """Services are shared by name (every LB registers its conduit's), so no owner is kept."""

    def __init__(self, registry: Registry, guard: RegistryGuard | None = None) -> None:
        self._registry = registry
        self._guard = guard

    async def Register(self, message: NetworkService, request: CallContext) -> NetworkService:
        if not message.name:
            raise InvalidArgumentError("the network service has no name")
        admission = admit(self._guard, message.name, request)
        stored = await self._registry.register_service(message)
        answer(admission, request)
        return stored

    async def Find(
        self, message: NetworkServiceQuery, request: CallContext
    ) -> AsyncGenerator[NetworkServiceResponse, None]:
        found, changes = await self._registry.find_services(
            message.network_service, watch=message.watch, who=_who(request)
        )
        try:
            for ns in found:
                yield NetworkServiceResponse(network_service=ns)
            async for change in _changes(changes):
                yield NetworkServiceResponse(network_service=change.item, deleted=change.deleted)
        finally:
            if changes is not None:
                changes.close()

    async def Unregister(self, message: NetworkService, request: CallContext) -> Empty:
        admission = admit(self._guard, message.name, request)
        await self._registry.unregister_service(message)
        answer(admission, request)
        return Empty()


class NetworkServiceEndpointRegistryServicer(
    registry_grpc.NetworkServiceEndpointRegistryServicer  # type: ignore[misc]
):
    def __init__(self, registry: Registry, guard: RegistryGuard | None = None) -> None:
        self._registry = registry
        self._guard = guard  # NSM's tokens and client_allowed (None: plain text, no checks)

    async def _authorized(self, name: str, request: CallContext) -> Admission | None:
        if self._guard is None:
            return None
        registered = await self._registry.endpoint(name) is not None
        return admit(self._guard, name, request, registered=registered)

    async def Register(
        self, message: NetworkServiceEndpoint, request: CallContext
    ) -> NetworkServiceEndpoint:
        if not message.name:
            raise InvalidArgumentError("the network service endpoint has no name")
        admission = await self._authorized(message.name, request)
        socket = await _receive_socket(message, request)
        try:
            stored = await self._registry.register_endpoint(message, socket)
        finally:
            if socket is not None:
                socket.drop()  # (nothing, once the registry has taken it)
        if self._guard is not None and admission is not None:
            self._guard.registered(message.name, admission.caller)
        answer(admission, request)
        reply = NetworkServiceEndpoint()
        reply.CopyFrom(stored)
        reply.url = message.url  # as recvfd answers: the URL the endpoint sent, to map back
        return reply

    async def Find(
        self, message: NetworkServiceEndpointQuery, request: CallContext
    ) -> AsyncGenerator[NetworkServiceEndpointResponse, None]:
        found, changes = await self._registry.find_endpoints(
            message.network_service_endpoint, watch=message.watch, who=_who(request)
        )
        try:
            for nse in found:
                yield NetworkServiceEndpointResponse(network_service_endpoint=nse)
            async for change in _changes(changes):
                yield NetworkServiceEndpointResponse(
                    network_service_endpoint=change.item, deleted=change.deleted
                )
        finally:
            if changes is not None:
                changes.close()

    async def Unregister(self, message: NetworkServiceEndpoint, request: CallContext) -> Empty:
        admission = await self._authorized(message.name, request)
        await self._registry.unregister_endpoint(message)
        if self._guard is not None:
            self._guard.unregistered(message.name)
        answer(admission, request)
        return Empty()
