"""The lab NSM manager: `networkservice.NetworkService` (Request, Close) and
`connection.MonitorConnection` as nsmgr serves them to its local clients, over the lab registry
and a `Forwarder` (wire-api §4.2, meridio-proxy-behaviour §9).

Request:
1. Validated: a connection, a network service, a KERNEL mechanism (the lab forwarder only makes
   veth pairs) and a registered network service, or INVALID_ARGUMENT with the reason.
2. updatepath (NSM's, exactly): the manager's segment `{name: "nsmgr-lab", id: <uuid4>}` follows
   the caller's; a refresh that carries the returned path finds it again, so the connection keeps
   its id at the manager's hop, the key of everything below.
3. One Request or Close per connection id at a time (NSM's `begin`): each connection has a task
   that runs its operations in order and owns its state.
4. Endpoint: a refresh goes to the same NSE, unless the state is RESELECT_REQUESTED or the NSE is
   no longer registered (then the old connection is torn down and an NSE selected again).
   Selection: `network_service_endpoint_name` when set (it must exist and offer the service:
   NOT_FOUND otherwise); else NSM's `matchEndpoint` over the NSEs offering the service (the first
   match whose source_selector fits the connection's labels picks, through its routes'
   destination_selectors, the NSEs whose labels for the service fit; `{{.key}}` in a selector
   value is the connection's label `key`; no match fits: every NSE), the lowest name winning.
5. Forwarded to the NSE's registered URL with the caller's deadline (the manager's own segment
   expiring at now + lifetime, `path.index` at the manager's hop: the NSE appends its segment and
   answers with the manager's id and index restored).
6. Wired: `forwarder.connect(Wiring)`, with the client's network namespace and the NSE's as
   NSM's recvfd finds them: an `inode://` inodeURL is the descriptor passed with the call (the
   client's on its connection to the manager, within the call's deadline; the NSE's with its
   answer), held for the connection's life and handed to the forwarder as
   `/proc/<manager pid>/fd/<n>` (`recvfd.Netns`); only without one (a client or NSE that passes
   no descriptors: grpcio, a TCP peer), a `file://` inodeURL or else the socket peer's pid,
   logged at DEBUG. Interface names from the mechanisms' `name` parameters or generated as NSM
   does. A failure here closes the NSE side again, disconnects, and fails the Request (nothing
   is left half-made).
7. Answered: the NSE's connection with the caller's id and path index restored and the client's
   mechanism (LOCAL/KERNEL, `name` = the client interface).

Close: forwarded to the NSE (best effort, bounded), the pair disconnected, the connection
forgotten and its namespace descriptors closed; an unknown connection is a success. Expiry: a
connection not refreshed by the earliest `expires` of its path segments (the manager's own is
now + lifetime at each Request) is closed on both sides. MonitorConnections:
INITIAL_STATE_TRANSFER with the matching connections, then UPDATE after each successful Request
and DELETE after each Close, expiry or teardown, filtered by the selector; the map key is the
connection id at the manager's hop.

A `file://` inodeURL that names `/proc/self/...` or `/proc/thread-self/...` means the sender's
own: it is read as `/proc/<peer pid>/...` (the fallback: a process can be in another namespace
than the one it means, which is why NSM passes descriptors).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import string
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import outcome
import trio
from google.protobuf.empty_pb2 import Empty
from loguru import logger

if TYPE_CHECKING:
    from loguru import Logger
from purerpc.grpclib.exceptions import (
    FailedPreconditionError,
    InternalError,
    ResourceExhaustedError,
)

from proxy.api.networkservice import connection_grpc, networkservice_grpc
from proxy.api.networkservice.connection_pb2 import (
    DELETE,
    INITIAL_STATE_TRANSFER,
    RESELECT_REQUESTED,
    UPDATE,
    Connection,
    ConnectionEvent,
    ConnectionEventType,
    Mechanism,
    MonitorScopeSelector,
    PathSegment,
)
from proxy.api.networkservice.networkservice_grpc import NetworkServiceStub
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_pb2 import NetworkService, NetworkServiceEndpoint
from proxy.lab.nsm.forwarding import Forwarder, Wiring
from proxy.lab.nsm.recvfd import Netns
from proxy.lab.nsm.registry import (
    Mailbox,
    Overflow,
    Registry,
    WallClock,
    deliver,
)
from proxy.nsm.hoptoken import Signer, sign_request
from proxy.nsm.sendfd import INODE_URL
from proxy.nsm.wire import seconds, timestamp
from proxy.rpc import (
    AddressError,
    CallContext,
    Channel,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    Peer,
    RpcFailedError,
    Status,
    Tls,
    UnavailableError,
    open_channel,
)
from proxy.rpc.fdpass import FdTransceiver, FdUrlError, is_inode_url, parse_inode_url
from proxy.rpc.status import describe_status

DEFAULT_NAME = "nsmgr-lab"
DEFAULT_LIFETIME = 60.0
REQUEST_TIMEOUT = 15.0  # towards an NSE, when the caller set no deadline
CLOSE_TIMEOUT = 5.0  # towards an NSE, for a Close
MONITOR_BUFFER = 256  # events a monitor may fall behind before it is dropped
DEFAULT_MTU = 1500

KERNEL = "KERNEL"
LOCAL = "LOCAL"
NAME = "name"  # mechanism parameter: the interface name
IFNAMSIZ = 15  # characters in a Linux interface name, at most
NO_VALUE = "<no value>"  # what Go's text/template prints for a missing map key
_IFNAME_RANDOM = string.digits + string.ascii_letters
_TEMPLATE = re.compile(r"\{\{\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_OWN_PROC = re.compile(r"^/proc/(self|thread-self)/")


# -- pure decisions --------------------------------------------------------------------------------


class BadRequest(ValueError):
    """The request cannot be served as it is; the message says why (INVALID_ARGUMENT)."""


class PathError(BadRequest):
    pass


class WiringError(ValueError):
    """The NSE's answer cannot be wired; the message says why."""


def client_mechanism(request: NetworkServiceRequest) -> Mechanism:
    """The client-side mechanism: the connection's own (a refresh) or the first KERNEL
    preference, as NSM's mechanisms server chooses; cls LOCAL."""
    connection = request.connection
    if connection.HasField("mechanism") and connection.mechanism.type:
        offered = [connection.mechanism]
    else:
        offered = list(request.mechanism_preferences)
    if not offered:
        raise BadRequest("no mechanism: mechanism_preferences is empty and the connection has none")
    for mechanism in offered:
        if mechanism.type == KERNEL:
            chosen = Mechanism()
            chosen.CopyFrom(mechanism)
            chosen.cls = LOCAL
            return chosen
    types = ", ".join(sorted({m.type or '""' for m in offered}))
    raise BadRequest(
        f"no supported mechanism: the lab forwarder does KERNEL only (offered {types})"
    )


def check_request(request: NetworkServiceRequest) -> Mechanism:
    """Validate a Request; its client-side mechanism. Raises BadRequest."""
    if not request.HasField("connection"):
        raise BadRequest("the request has no connection")
    if not request.connection.network_service:
        raise BadRequest("connection.network_service is empty")
    mechanism = client_mechanism(request)
    name = mechanism.parameters.get(NAME, "")
    if name and not valid_ifname(name):
        raise BadRequest(f"mechanism parameter name {name!r} is not a valid interface name")
    return mechanism


def update_path(connection: Connection, name: str, new_id: Callable[[], str]) -> int:
    """NSM's updatepath for a server named `name`, on `connection` in place: afterwards
    `path.index` is this hop's segment and `connection.id` its id. Returns the caller's index
    (to restore in the answer). Raises PathError."""
    path = connection.path
    segments = path.path_segments
    if not segments:
        path.index = 0
        if not connection.id:
            connection.id = new_id()
        segments.add(name=name, id=connection.id)
        return 0
    index = path.index
    if index < len(segments) and segments[index].name == name:
        connection.id = segments[index].id
        return index
    following = index + 1
    if following > len(segments):
        raise PathError(f"path.index {index} is beyond the path's {len(segments)} segments")
    if segments[index].id != connection.id:
        raise PathError(
            f"connection.id {connection.id!r} is not the id of path segment {index}"
            f" ({segments[index].id!r})"
        )
    if following < len(segments) and segments[following].name != name:
        segments[following].name = name
        segments[following].id = new_id()
    path.index = following
    if following == len(segments):
        connection.id = new_id()
        segments.add(name=name, id=connection.id)
    else:
        connection.id = segments[following].id
    return index


def restore_caller(connection: Connection, caller_index: int) -> None:
    """The answer as the caller knows it: its own id and path index (updatepath's return)."""
    connection.path.index = caller_index
    connection.id = connection.path.path_segments[caller_index].id


def render_template(text: str, values: Mapping[str, str]) -> str:
    """`{{.key}}` replaced by `values[key]` (the part of Go's text/template NSM selectors use)."""
    return _TEMPLATE.sub(lambda found: values.get(found.group(1), NO_VALUE), text)


def labels_fit(
    labels: Mapping[str, str], selector: Mapping[str, str], values: Mapping[str, str]
) -> bool:
    """NSM's isSubset: every selector entry is in `labels`, literally or once templated."""
    if len(labels) < len(selector):
        return False
    for key, wanted in selector.items():
        have = labels.get(key, "")
        if have != wanted and have != render_template(wanted, values):
            return False
    return True


def endpoint_labels(nse: NetworkServiceEndpoint, service: str) -> Mapping[str, str]:
    if service not in nse.network_service_labels:
        return {}
    return nse.network_service_labels[service].labels


def select_endpoints(
    service: NetworkService,
    endpoints: Sequence[NetworkServiceEndpoint],
    labels: Mapping[str, str],
) -> list[NetworkServiceEndpoint]:
    """The candidates for a connection with `labels` (NSM's matchEndpoint): the first match whose
    source selector fits picks the NSEs fitting one of its routes (a `fallthrough` match that
    picks none gives way to the next); when no match fits, every endpoint."""
    for match in service.matches:
        if not labels_fit(labels, match.source_selector, labels):
            continue
        candidates = [
            nse
            for nse in endpoints
            if any(
                labels_fit(endpoint_labels(nse, service.name), route.destination_selector, labels)
                for route in match.routes
            )
        ]
        if candidates or not match.fallthrough:
            return candidates
    return list(endpoints)


def choose(candidates: Iterable[NetworkServiceEndpoint]) -> NetworkServiceEndpoint | None:
    """Deterministic: the lowest name."""
    return min(candidates, key=lambda nse: nse.name, default=None)


def netns_path(mechanism: Mechanism | None, pid: int | None) -> str | None:
    """Without a descriptor, a network namespace file: the mechanism's `file://` inodeURL
    (`/proc/self/...` read as the sender's), else the sender's `/proc/<pid>/ns/net`; None when
    neither is known."""
    url = mechanism.parameters.get(INODE_URL, "") if mechanism is not None else ""
    if url.startswith("file://"):
        path = url[len("file://") :]
        if _OWN_PROC.match(path):
            return None if pid is None else _OWN_PROC.sub(f"/proc/{pid}/", path)
        if path.startswith("/"):
            return path
    if pid is not None and pid > 0:
        return f"/proc/{pid}/ns/net"
    return None


def netns_fallback(mechanism: Mechanism | None) -> str:
    """How `netns_path` found a namespace (for the log): by the inodeURL or by the process."""
    url = mechanism.parameters.get(INODE_URL, "") if mechanism is not None else ""
    return "file:// inodeURL" if url.startswith("file://") else "socket peer's process"


def passed_url(mechanism: Mechanism | None) -> str | None:
    """The mechanism's inodeURL when it names a passed descriptor (`inode://dev/ino`), else
    None; BadRequest when it is `inode://` but malformed."""
    url = mechanism.parameters.get(INODE_URL, "") if mechanism is not None else ""
    if not is_inode_url(url):
        return None
    try:
        parse_inode_url(url)
    except FdUrlError as exc:
        raise BadRequest(f"mechanism parameter inodeURL: {exc}") from None
    return url


def valid_ifname(name: str) -> bool:
    return (
        0 < len(name.encode()) <= IFNAMSIZ
        and name not in (".", "..")
        and not any(c == "/" or c == ":" or c.isspace() for c in name)
    )


def interface_name(service: str, choice: Callable[[str], str] = random.choice) -> str:
    """NSM's generated name: the service's first 10 characters, "-", 4 random [0-9A-Za-z]."""
    return f"{service[:10]}-{''.join(choice(_IFNAME_RANDOM) for _ in range(4))}"


def connection_expiry(connection: Connection) -> float:
    """The earliest `expires` of the path's segments (wall clock); inf when none has one."""
    return min(
        (
            seconds(segment.expires)
            for segment in connection.path.path_segments
            if segment.HasField("expires")
        ),
        default=math.inf,
    )


def _segment_fits(wanted: PathSegment, segment: PathSegment) -> bool:
    return all(
        not getattr(wanted, field) or getattr(wanted, field) == getattr(segment, field)
        for field in ("name", "id", "token")
    )


def monitor_selects(selector: MonitorScopeSelector, connection: Connection) -> bool:
    """wire-api §4.2 "Selector matching": empty selects all; `network_services` must contain the
    connection's; `path_segments` must fit a contiguous run of the connection's segments."""
    if selector.network_services and connection.network_service not in selector.network_services:
        return False
    wanted = selector.path_segments
    segments = connection.path.path_segments
    return not wanted or any(
        all(_segment_fits(w, segments[start + i]) for i, w in enumerate(wanted))
        for start in range(len(segments) - len(wanted) + 1)
    )


def mapped_url(url: str, path_map: tuple[str, str] | None) -> str:
    """`unix://<container path>/...` as the host sees it, per the lab's path map."""
    if path_map is None:
        return url
    inside, outside = path_map
    prefix = f"unix://{inside.rstrip('/')}/"
    if url.startswith(prefix):
        return f"unix://{outside.rstrip('/')}/{url[len(prefix) :]}"
    return url


def reselect_reason(connection: Connection, current: str, registered: bool) -> str | None:
    """Why a refresh of a connection established with the NSE `current` must select again
    (the old connection is then closed first), or None: it goes to the same NSE."""
    if connection.state == RESELECT_REQUESTED:
        return "reselect requested"
    if not registered:
        return "endpoint no longer registered"
    named = connection.network_service_endpoint_name
    if named and named != current:
        return f"endpoint {named!r} named instead"
    return None


def forward_request(
    at_hop: Connection,
    endpoint: str,
    endpoint_mechanism: Mechanism | None,
    expires: float,
) -> NetworkServiceRequest:
    """What the manager sends the NSE: the connection at its own hop (its segment expiring at
    `expires`), the NSE named, the NSE-side mechanism kept from before on a refresh."""
    connection = Connection()
    connection.CopyFrom(at_hop)
    connection.network_service_endpoint_name = endpoint
    connection.path.path_segments[connection.path.index].expires.CopyFrom(timestamp(expires))
    connection.ClearField("mechanism")
    if endpoint_mechanism is not None:
        connection.mechanism.CopyFrom(endpoint_mechanism)
    return NetworkServiceRequest(
        connection=connection, mechanism_preferences=[Mechanism(cls=LOCAL, type=KERNEL)]
    )


def wiring_for(
    connection_id: str,
    client_netns: str,
    client_ifname: str,
    answer: Connection,
    endpoint_pid: int | None,
    endpoint_ifname: str,
    endpoint_netns: str | None = None,
) -> Wiring:
    """The pair for the NSE's `answer`; `endpoint_ifname` when the answer names none. The NSE's
    namespace is `endpoint_netns` (a descriptor it passed) or else what its answer's `file://`
    inodeURL or its process (`endpoint_pid`) says."""
    mechanism = answer.mechanism if answer.HasField("mechanism") else None
    if endpoint_netns is None:
        endpoint_netns = netns_path(mechanism, endpoint_pid)
        if endpoint_netns is None:
            raise WiringError(
                "cannot tell the endpoint's network namespace: no descriptor and no file://"
                " inodeURL in its answer, and no process behind its socket"
            )
        logger.debug(
            "endpoint namespace without a descriptor",
            conn_id=connection_id,
            by=netns_fallback(mechanism),
            path=endpoint_netns,
        )
    if mechanism is not None and mechanism.parameters.get(NAME):
        endpoint_ifname = mechanism.parameters[NAME]
    if not valid_ifname(endpoint_ifname):
        raise WiringError(f"the endpoint's interface name {endpoint_ifname!r} is not valid")
    return Wiring(
        connection_id=connection_id,
        client_netns=client_netns,
        client_ifname=client_ifname,
        endpoint_netns=endpoint_netns,
        endpoint_ifname=endpoint_ifname,
        mtu=answer.context.MTU or DEFAULT_MTU,
        ip_context=answer.context.ip_context,
    )


# -- the manager -----------------------------------------------------------------------------------


@attrs.frozen
class ManagerSettings:
    name: str = DEFAULT_NAME
    # (container path, host path): an endpoint URL under the first is dialled under the second.
    # An endpoint that passes its socket as a descriptor (as NSM's do) never needs this; the
    # map is for one in a container that registers a path (its /tmp is elsewhere here).
    path_map: tuple[str, str] | None = None
    lifetime: float = DEFAULT_LIFETIME  # of the manager's own path segment, from each Request
    request_timeout: float = REQUEST_TIMEOUT
    close_timeout: float = CLOSE_TIMEOUT
    monitor_buffer: int = MONITOR_BUFFER
    client_tls: Tls | None = None  # towards the endpoints (mutual TLS); None: plain text
    signer: Signer | None = None  # NSM's per-hop tokens, signed and checked (None: none)


@attrs.frozen
class Passed:
    """A namespace the client passed as a descriptor: its URL and the connection it came on."""

    url: str  # inode://dev/ino
    fds: FdTransceiver


@attrs.frozen
class _RequestOp:
    request: NetworkServiceRequest  # the connection at the manager's hop
    caller_index: int
    client_mechanism: Mechanism
    client_netns: str | Passed  # a path (the fallbacks) or the descriptor to receive
    deadline: float
    reply: trio.MemorySendChannel[outcome.Outcome[Any]]


@attrs.frozen
class _CloseOp:
    reply: trio.MemorySendChannel[outcome.Outcome[Any]]
    deadline: float = math.inf


_Op = _RequestOp | _CloseOp


@attrs.frozen
class _Monitor:
    selector: MonitorScopeSelector
    send: trio.MemorySendChannel[Any]
    who: str


def _new_id() -> str:
    return str(uuid.uuid4())


def _who(peer: Peer) -> str:
    return f"pid {peer.pid}" if peer.pid is not None else peer.address


class Manager:
    """The connections: one task each (`_ConnectionTask`), their index and the monitors owned by
    the task running `run`."""

    def __init__(
        self,
        registry: Registry,
        forwarder: Forwarder,
        clock: WallClock,
        settings: ManagerSettings | None = None,
    ) -> None:
        self.registry = registry
        self.forwarder = forwarder
        self.clock = clock
        self.settings = settings or ManagerSettings()
        self._mailbox = Mailbox()
        self._nursery: trio.Nursery | None = None
        self._inboxes: dict[str, trio.MemorySendChannel[_Op]] = {}
        self._current: dict[str, Connection] = {}  # as published, by id at the manager's hop
        self._monitors: list[_Monitor] = []

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await self._mailbox.serve()

    # -- the calls (handler tasks) --------------------------------------------------------------

    async def request(self, request: NetworkServiceRequest, context: CallContext) -> Connection:
        try:
            mechanism = check_request(request)
            connection = Connection()
            connection.CopyFrom(request.connection)
            caller_index = update_path(connection, self.settings.name, _new_id)
            passed = passed_url(mechanism)
        except BadRequest as exc:
            raise InvalidArgumentError(str(exc)) from None
        if self.settings.signer is not None:
            self.settings.signer.server_check(connection, context.custom_metadata, context.peer)
        client_netns: str | Passed | None = None
        if passed is not None and context.fds is not None:
            client_netns = Passed(passed, context.fds)  # received by the connection's task
        else:
            client_netns = netns_path(mechanism, context.peer.pid)
            if client_netns is None:
                raise InvalidArgumentError(
                    "cannot tell the client's network namespace: no descriptor and no file://"
                    " inodeURL in its mechanism, and no process behind its socket"
                )
            logger.debug(
                "client namespace without a descriptor",
                conn_id=connection.id,
                by=netns_fallback(mechanism),
                path=client_netns,
            )
        forwarded = NetworkServiceRequest()
        forwarded.CopyFrom(request)
        forwarded.connection.CopyFrom(connection)
        deadline = context.deadline
        if deadline == math.inf:
            deadline = trio.current_time() + self.settings.request_timeout
        answer = await self._submit(
            connection.id,
            lambda reply: _RequestOp(
                forwarded, caller_index, mechanism, client_netns, deadline, reply
            ),
            create=True,
        )
        assert isinstance(answer, Connection)
        return answer

    async def close(self, connection: Connection, context: CallContext) -> Empty:
        at_hop = Connection()
        at_hop.CopyFrom(connection)
        try:
            update_path(at_hop, self.settings.name, _new_id)
        except PathError as exc:
            raise InvalidArgumentError(str(exc)) from None
        if self.settings.signer is not None:
            self.settings.signer.server_check(
                at_hop, context.custom_metadata, context.peer, closing=True
            )
        # Once its turn comes (after a Request in flight for the same id), a Close is carried
        # out even if its caller has given up: the NSE call within close_timeout.
        await self._submit(at_hop.id, _CloseOp, create=False)
        return Empty()

    async def monitor(
        self, selector: MonitorScopeSelector, context: CallContext
    ) -> AsyncIterator[ConnectionEvent]:
        initial, events = await self._mailbox.ask(
            lambda: self._subscribe(selector, _who(context.peer))
        )
        with events:
            yield initial
            async for event in events:
                if isinstance(event, Overflow):
                    raise ResourceExhaustedError(
                        f"this monitor fell {event.pending} events behind and was dropped;"
                        " monitor again"
                    )
                yield event

    async def _submit(
        self,
        connection_id: str,
        make: Callable[[trio.MemorySendChannel[outcome.Outcome[Any]]], _Op],
        *,
        create: bool,
    ) -> Any:
        reply_send, reply_receive = trio.open_memory_channel[outcome.Outcome[Any]](1)
        with reply_receive:
            op = make(reply_send)
            if not await self._mailbox.ask(lambda: self._route(connection_id, op, create)):
                return None
            result = await reply_receive.receive()
        return result.unwrap()

    # -- jobs (the manager task only) -----------------------------------------------------------

    def _route(self, connection_id: str, op: _Op, create: bool) -> bool:
        inbox = self._inboxes.get(connection_id)
        if inbox is None:
            if not create:
                return False
            assert self._nursery is not None
            inbox, receive = trio.open_memory_channel[_Op](math.inf)
            self._inboxes[connection_id] = inbox
            task = _ConnectionTask(self, connection_id, receive)
            self._nursery.start_soon(task.run, name=f"connection {connection_id}")
        inbox.send_nowait(op)
        return True

    def _retire(self, connection_id: str, receive: trio.MemoryReceiveChannel[_Op]) -> bool:
        """Forget an idle connection task's inbox, unless an operation is waiting in it."""
        if receive.statistics().current_buffer_used:
            return False
        self._inboxes.pop(connection_id).close()
        return True

    def _subscribe(
        self, selector: MonitorScopeSelector, who: str
    ) -> tuple[ConnectionEvent, trio.MemoryReceiveChannel[Any]]:
        self._monitors[:] = [m for m in self._monitors if m.send.statistics().open_receive_channels]
        kept = MonitorScopeSelector()
        kept.CopyFrom(selector)
        send, receive = trio.open_memory_channel[Any](self.settings.monitor_buffer)
        self._monitors.append(_Monitor(kept, send, who))
        initial = ConnectionEvent(
            type=INITIAL_STATE_TRANSFER,
            connections={
                key: connection
                for key, connection in self._current.items()
                if monitor_selects(kept, connection)
            },
        )
        return initial, receive

    def _publish(self, kind: ConnectionEventType, connection: Connection) -> None:
        if kind == DELETE:
            self._current.pop(connection.id, None)
        else:
            self._current[connection.id] = connection
        kept = []
        for monitor in self._monitors:
            if not monitor_selects(monitor.selector, connection) or deliver(
                monitor.send, ConnectionEvent(type=kind, connections={connection.id: connection})
            ):
                kept.append(monitor)
            elif monitor.send.statistics().open_receive_channels:
                logger.warning(
                    "monitor too slow, its stream is dropped",
                    peer=monitor.who,
                    pending=self.settings.monitor_buffer,
                )
        self._monitors[:] = kept

    async def publish(self, kind: ConnectionEventType, connection: Connection) -> None:
        await self._mailbox.ask(lambda: self._publish(kind, connection))

    async def retire(self, connection_id: str, receive: trio.MemoryReceiveChannel[_Op]) -> bool:
        return await self._mailbox.ask(lambda: self._retire(connection_id, receive))

    # -- towards endpoints (connection tasks) ---------------------------------------------------

    async def select(self, connection: Connection) -> NetworkServiceEndpoint:
        """The NSE for a new connection (INVALID_ARGUMENT, NOT_FOUND)."""
        name = connection.network_service
        service = await self.registry.service(name)
        if service is None:
            raise InvalidArgumentError(f"unknown network service {name!r} (not registered)")
        if connection.payload and service.payload and connection.payload != service.payload:
            raise InvalidArgumentError(
                f"network service {name!r} has payload {service.payload},"
                f" the request asks for {connection.payload}"
            )
        wanted = connection.network_service_endpoint_name
        if wanted:
            nse = await self.registry.endpoint(wanted)
            if nse is None:
                raise NotFoundError(f"network service endpoint {wanted!r} is not registered")
            if name not in nse.network_service_names:
                raise NotFoundError(f"network service endpoint {wanted!r} does not offer {name!r}")
            return nse
        offering, _ = await self.registry.find_endpoints(
            NetworkServiceEndpoint(network_service_names=[name])
        )
        if not offering:
            raise NotFoundError(f"no network service endpoint offers {name!r}")
        chosen = choose(select_endpoints(service, offering, connection.labels))
        if chosen is None:
            labels = ",".join(f"{k}={v}" for k, v in sorted(connection.labels.items()))
            raise NotFoundError(
                f"no endpoint of {name!r} matches the connection's labels ({labels or 'none'})"
            )
        return chosen

    async def call_endpoint(
        self, nse: NetworkServiceEndpoint, method: str, message: Any, netns: Netns | None = None
    ) -> tuple[Any, Peer, str | None]:
        """Request or Close on the NSE at its registered URL, within the current deadline;
        failures come out as RpcFailedError naming the NSE. The URL is the NSE's current
        registration when it has one: a restarted endpoint registers a new socket, and its
        connections' refreshes and closes must reach it there (NSM heals them likewise).

        With `netns`, the namespace a Request's answer passed as a descriptor is received (on
        this channel, before it closes: it holds the descriptor), staged in `netns` as the
        "endpoint" one; its path is the third value (None: the answer passed none)."""
        nse = await self.registry.endpoint(nse.name) or nse
        where = f"endpoint {nse.name!r} ({nse.url or 'no URL'})"
        unwired: Connection | None = None  # answered, but what it names did not come
        try:
            async with open_channel(
                mapped_url(nse.url, self.settings.path_map),
                connect_timeout=self.settings.close_timeout,
                ssl_context=self.settings.client_tls,
            ) as channel:
                connection = message.connection if method == "Request" else message
                metadata = sign_request(self.settings.signer, connection, channel)
                reply = await getattr(NetworkServiceStub(channel), method)(
                    message, metadata=metadata
                )
                path = None
                if netns is not None:
                    unwired = reply
                    path = await _endpoint_netns(reply, channel, netns)
                    unwired = None
                return reply, channel.connection.peer, path
        except AddressError as exc:
            raise UnavailableError(f"{where} has no valid URL: {exc}") from None
        except UnavailableError as exc:
            raise UnavailableError(
                f"{where} unreachable: {exc.status.status_message or 'unavailable'}"
            ) from None
        except RpcFailedError as exc:
            raise RpcFailedError(
                Status(exc.status.status_code, f"{where} answered {describe_status(exc)}")
            ) from None
        finally:
            if unwired is not None:
                # The NSE holds a connection the manager cannot wire: closed again now (on a
                # new channel: this one went with the failure) rather than left to expire.
                await self._close_unwired(nse, unwired)

    async def _close_unwired(self, nse: NetworkServiceEndpoint, answer: Connection) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(self.settings.close_timeout):
            if await self.close_endpoint(nse, answer, logger):
                logger.info("endpoint connection closed again: its answer could not be wired",
                            nse=nse.name, conn_id=answer.id)  # fmt: skip

    async def close_endpoint(
        self, nse: NetworkServiceEndpoint, answer: Connection, log: Logger
    ) -> bool:
        """Close `answer` towards the NSE; a failure is logged on `log`, and False."""
        try:
            await self.call_endpoint(nse, "Close", answer)
        except RpcFailedError as exc:
            log.warning("close towards the endpoint failed", nse=nse.name,
                        reason=exc.status.status_message)  # fmt: skip
            return False
        return True


async def _endpoint_netns(answer: Connection, channel: Channel, netns: Netns) -> str | None:
    """The path of the namespace the NSE's answer passed as a descriptor, or None."""
    mechanism = answer.mechanism if answer.HasField("mechanism") else None
    try:
        url = passed_url(mechanism)
    except BadRequest as exc:
        raise FailedPreconditionError(f"the endpoint's answer: {exc}") from None
    if url is None or channel.fds is None:
        return None
    return await netns.path("endpoint", channel.fds, url)


class _ConnectionTask:
    """One connection at the manager's hop: runs its Requests and Closes in order, owns its
    state, and closes it when it expires. Ends (and is forgotten) when it has no connection and
    no waiting operation."""

    def __init__(
        self, manager: Manager, connection_id: str, inbox: trio.MemoryReceiveChannel[_Op]
    ) -> None:
        self.manager = manager
        self.id = connection_id
        self.inbox = inbox
        self.log = logger.bind(conn_id=connection_id)
        # Set while established:
        self.endpoint: NetworkServiceEndpoint | None = None
        self.answer = Connection()  # the NSE's answer, at the manager's hop
        self.published = Connection()  # the same with the client's mechanism
        self.wiring: Wiring | None = None
        self.expires = math.inf  # wall clock
        self.netns = Netns()  # the namespaces the wiring names by descriptor

    async def run(self) -> None:
        try:
            with self.inbox:
                while True:
                    if self.endpoint is None and await self.manager.retire(self.id, self.inbox):
                        return
                    op = None
                    with trio.move_on_at(self.manager.clock.trio_time(self.expires)):
                        op = await self.inbox.receive()
                    if op is None:
                        self.log.info("connection expired", nse=self._nse_name())
                        await self._teardown(self.manager.settings.close_timeout)
                    else:
                        await self._apply(op)
        finally:
            # The manager stopping: its pairs stay (as the forwarder's do), not its descriptors.
            self.netns.close()

    async def _apply(self, op: _Op) -> None:
        result: outcome.Outcome[Any] = outcome.Error(
            DeadlineExceededError("deadline exceeded in the NSM manager")
        )
        with trio.CancelScope(deadline=op.deadline):
            try:
                if isinstance(op, _RequestOp):
                    result = outcome.Value(await self._request(op))
                else:
                    await self._close(op)
                    result = outcome.Value(None)
            except RpcFailedError as exc:
                result = outcome.Error(exc)
            except Exception as exc:
                self.log.opt(exception=exc).error("operation failed")
                result = outcome.Error(InternalError(f"{type(exc).__name__}: {exc}"))
        with contextlib.suppress(trio.BrokenResourceError):  # the caller is gone
            op.reply.send_nowait(result)

    def _nse_name(self) -> str:
        return self.endpoint.name if self.endpoint is not None else ""

    # -- Request --------------------------------------------------------------------------------

    async def _request(self, op: _RequestOp) -> Connection:
        manager = self.manager
        connection = op.request.connection
        refresh = self.endpoint is not None
        endpoint = None
        if self.endpoint is not None:
            endpoint = await manager.registry.endpoint(self.endpoint.name)
            reason = reselect_reason(connection, self.endpoint.name, endpoint is not None)
            if reason is not None:
                self.log.info("reselecting", nse=self.endpoint.name, reason=reason)
                await self._teardown(manager.settings.close_timeout)
                refresh, endpoint = False, None
        if endpoint is None:
            endpoint = await manager.select(connection)
        previous_wiring = self.wiring if refresh else None
        endpoint_mechanism = self.answer.mechanism if refresh else None
        forwarded = forward_request(
            connection,
            endpoint.name,
            endpoint_mechanism,
            manager.clock.now() + manager.settings.lifetime,
        )
        try:
            client_netns = await self._client_netns(op)
            answer, peer, endpoint_netns = await manager.call_endpoint(
                endpoint, "Request", forwarded, self.netns
            )
        except BaseException:
            self.netns.rollback()  # what this attempt received; what the wiring uses stays
            raise
        if endpoint_netns is None:
            self.netns.forget("endpoint")
        try:
            mechanism, wiring = self._resolve(
                op, connection, answer, peer, previous_wiring, client_netns, endpoint_netns
            )
            await manager.forwarder.connect(wiring)
        except trio.Cancelled:
            await self._undo(endpoint, answer, refresh)
            raise
        except WiringError as exc:
            await self._undo(endpoint, answer, refresh)
            raise FailedPreconditionError(str(exc)) from None
        except Exception as exc:
            self.log.opt(exception=exc).error("forwarder failed", nse=endpoint.name)
            await self._undo(endpoint, answer, refresh)
            raise InternalError(f"forwarder failed: {type(exc).__name__}: {exc}") from None
        self.netns.commit()  # the pair has moved off any namespace replaced: close those
        self.endpoint, self.answer, self.wiring = endpoint, answer, wiring
        self.published = Connection()
        self.published.CopyFrom(answer)
        self.published.mechanism.CopyFrom(mechanism)
        self.expires = min(
            connection_expiry(answer), manager.clock.now() + manager.settings.lifetime
        )
        self.log.log(
            "DEBUG" if refresh else "INFO",
            "connection refreshed" if refresh else "connection established",
            nse=endpoint.name,
            client_if=wiring.client_ifname,
            endpoint_if=wiring.endpoint_ifname,
            client_ns=wiring.client_netns,
            endpoint_ns=wiring.endpoint_netns,
        )
        with trio.CancelScope(shield=True):  # established: the monitors must hear of it
            await manager.publish(UPDATE, self.published)
        reply = Connection()
        reply.CopyFrom(self.published)
        restore_caller(reply, op.caller_index)
        return reply

    async def _client_netns(self, op: _RequestOp) -> str:
        """The path of the client's namespace: the descriptor it passed (held from an earlier
        Request when it is the same one, else received within the call's deadline) or the
        path the fallbacks found."""
        source = op.client_netns
        if isinstance(source, str):
            self.netns.forget("client")
            return source
        return await self.netns.path("client", source.fds, source.url)

    def _resolve(
        self,
        op: _RequestOp,
        connection: Connection,
        answer: Connection,
        peer: Peer,
        previous: Wiring | None,
        client_netns: str,
        endpoint_netns: str | None,
    ) -> tuple[Mechanism, Wiring]:
        """The client-side mechanism and the wiring for the NSE's answer (WiringError)."""
        index = connection.path.index
        segments = answer.path.path_segments
        if len(segments) <= index or segments[index].id != self.id:
            raise WiringError("the endpoint's answer lost the manager's path segment")
        answer.id, answer.path.index = self.id, index
        service = connection.network_service
        mechanism = Mechanism()
        mechanism.CopyFrom(op.client_mechanism)
        if not mechanism.parameters.get(NAME):
            mechanism.parameters[NAME] = (
                previous.client_ifname if previous is not None else interface_name(service)
            )
        endpoint_ifname = previous.endpoint_ifname if previous is not None else ""
        wiring = wiring_for(
            self.id,
            client_netns,
            mechanism.parameters[NAME],
            answer,
            peer.pid,
            endpoint_ifname or interface_name(service),
            endpoint_netns,
        )
        if not answer.HasField("mechanism"):
            answer.mechanism.CopyFrom(Mechanism(cls=LOCAL, type=KERNEL))
        if not answer.mechanism.parameters.get(NAME):
            # Kept for the refreshes: the NSE sees the name its side got.
            answer.mechanism.parameters[NAME] = wiring.endpoint_ifname
        return mechanism, wiring

    async def _undo(
        self, endpoint: NetworkServiceEndpoint, answer: Connection, refresh: bool
    ) -> None:
        """After a failure once the NSE answered: nothing may stay half-made."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.manager.settings.close_timeout):
                await self.manager.close_endpoint(endpoint, answer, self.log)
            await self._disconnect()
            if refresh:
                await self._forget()
            self.netns.close()  # the pair is gone: nothing names these namespaces any more

    # -- Close, expiry --------------------------------------------------------------------------

    async def _close(self, op: _CloseOp) -> None:
        if self.endpoint is None:
            return
        self.log.info("connection closed by client", nse=self.endpoint.name)
        failure = await self._teardown(self.manager.settings.close_timeout)
        if failure is not None:
            raise InternalError(f"forwarder failed to disconnect: {failure}")

    async def _teardown(self, budget: float) -> str | None:
        """Close towards the NSE (best effort, within `budget`), disconnect, forget; the
        forwarder's failure if any."""
        assert self.endpoint is not None
        with trio.move_on_after(budget):
            await self.manager.close_endpoint(self.endpoint, self.answer, self.log)
        with trio.CancelScope(shield=True):  # not to be left half-forgotten
            failure = await self._disconnect()
            await self._forget()
        return failure

    async def _disconnect(self) -> str | None:
        try:
            await self.manager.forwarder.disconnect(self.id)
        except Exception as exc:
            self.log.opt(exception=exc).error("forwarder failed to disconnect")
            return f"{type(exc).__name__}: {exc}"
        return None

    async def _forget(self) -> None:
        """After `_disconnect` (the forwarder needed the namespaces to take the pair down)."""
        published = self.published
        self.endpoint, self.wiring, self.expires = None, None, math.inf
        self.answer, self.published = Connection(), Connection()
        self.netns.close()
        await self.manager.publish(DELETE, published)


# -- the services ----------------------------------------------------------------------------------


class NetworkServiceServicer(networkservice_grpc.NetworkServiceServicer):  # type: ignore[misc]
    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        return await self._manager.request(message, request)

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        return await self._manager.close(message, request)


class MonitorConnectionServicer(connection_grpc.MonitorConnectionServicer):  # type: ignore[misc]
    def __init__(self, manager: Manager) -> None:
        self._manager = manager

    def MonitorConnections(
        self, message: MonitorScopeSelector, request: CallContext
    ) -> AsyncIterator[ConnectionEvent]:
        return self._manager.monitor(message, request)
