"""The lab's load-balancer stand-in: an NSE of the conduit's network service that forwards.

Meridio's real LB (stateless-lb-frontend) spreads VIP traffic over the targets; this stand-in
only has to be what the proxy sees of an LB, plus plain routing:

* **Registry.** It registers the network service `<conduit>.<trench>.<namespace>` (payload
  ETHERNET) and itself as an endpoint of it (url = its own socket, labels `LB_LABELS`; on a
  UNIX socket to NSM the socket file goes as a descriptor and the url is its `inode://` URL,
  as an sdk NSE's sendfd does, so NSM dials it through the descriptor),
  re-registers at 2/3 of the lifetime the registry granted, registers both again as soon as a
  lost registry connection is back (a restarted lab NSM forgets), and unregisters (expiration
  `{seconds: -1}`) when it stops. A registry that is down is retried with backoff.
* **Endpoint.** `networkservice.NetworkService` Request/Close on its socket. A Request must be for
  its service and must offer (or carry) the KERNEL mechanism. The IP context is the proxy's
  (it allocates both ends) and is kept as it came, MTU included. The LB appends its own path
  segment as NSM's updatepath server does (wire-api §4.2) and restores the caller's index and id
  in the answer. The mechanism is answered with the interface name of the LB's end (`name`: the
  caller's, or `nsm-<8 hex of the connection id>`, the same on every refresh) and the LB's
  namespace (`inodeURL`: its `--netns` file, else its own; passed back as a descriptor on a UNIX
  socket, as the sdk's sendfd server does, else a `file://` path the lab's forwarder opens).
  Close forgets.
* **Forwarding.** In its network namespace it turns on IPv4 and IPv6 forwarding and turns off
  rp_filter (VIP traffic is asymmetric), brings the `outside` interface (made and addressed by
  the topology) up, and keeps the routes it was given in the main table: `prefix via gateway`,
  several gateways for one prefix making one multipath route. A route whose gateway is not
  reachable yet (it lies behind a conduit interface the proxy has not asked for yet) is retried
  every `route_interval`, and so is a route the kernel dropped (its interface went away). They
  are removed when the LB stops. That is all: no NAT, no flow spreading beyond ECMP.

Netlink and sysctl work runs on a `NetlinkWorker` thread inside the LB's namespace, so the
caller's trio thread can stay where it is (the CLI's `--netns NAME`, or tests); without a
namespace the worker uses the process's own (e.g. under `ip netns exec`).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import socket
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import attrs
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp
from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.networkservice_grpc import NetworkServiceServicer
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceLabels,
)
from proxy.kernel.errors import KernelError, NotFound, from_netlink_error
from proxy.kernel.netlink import NetlinkWorker
from proxy.kernel.sysctl import write_proc
from proxy.lab.listen import serve
from proxy.lab.nsm.kernel import MAX_IFNAME, netns_path
from proxy.nsm.hoptoken import Signer
from proxy.nsm.path import PathError, server_hop
from proxy.nsm.registry_client import RegistryClient
from proxy.nsm.sendfd import INODE_URL, NETNS_URL, FdPassError, send_answer
from proxy.nsm.wire import seconds, timestamp
from proxy.rpc import (
    Address,
    Backoff,
    CallContext,
    Channel,
    InvalidArgumentError,
    ReconnectingChannel,
    RpcFailedError,
    Tls,
    open_channel,
)
from proxy.rpc.status import describe_failure, describe_status
from proxy.security.tls import SpiffeTls
from proxy.watched import Watched

__all__ = [
    "ETHERNET",
    "KERNEL",
    "LB_LABELS",
    "SYSCTLS",
    "LbSettings",
    "LoadBalancer",
    "interface_name",
    "netns_url",
    "run_lb",
    "run_worker",
    "select_mechanism",
]

KERNEL = "KERNEL"
ETHERNET = "ETHERNET"
LB_LABELS: Mapping[str, str] = {"app": "meridio-lab-lb"}
SYSCTLS = (
    ("net.ipv4.conf.all.forwarding", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
)
CALL_TIMEOUT = 15.0  # per registry call (upstream's request timeout)
STOP_BUDGET = 3.0  # unregister and route removal at stop (upstream's unregister budget)
ENETUNREACH = 101

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class LbSettings:
    name: str  # the endpoint's name (NSE name, path segment name)
    service: str  # <conduit>.<trench>.<namespace>
    nsm: Address  # the NSM manager (registry and all)
    listen: Address  # the endpoint's own socket, registered as its url
    outside: str | None = None  # the interface towards the outside world
    routes: Mapping[Network, frozenset[IPAddress]] = attrs.field(factory=dict)
    netns: str | None = None  # a name or path; None: the process's own namespace
    labels: Mapping[str, str] = LB_LABELS
    registration_lifetime: float = 60.0  # requested; the registry may grant less
    token_lifetime: float = 600.0  # the `expires` of the LB's own path segment
    route_interval: float = 1.0
    max_backoff: float = 5.0
    tls: SpiffeTls | None = None  # mutual TLS with NSM and the proxies; None: plain text


# -- pure pieces of NSM's endpoint chain ---------------------------------------------------------


def select_mechanism(request: NetworkServiceRequest) -> Mechanism:
    """The KERNEL mechanism of a request: the connection's own, when it has one (a refresh), else
    the first KERNEL preference. InvalidArgumentError when there is none."""
    chosen = Mechanism()
    current = request.connection.mechanism
    if request.connection.HasField("mechanism") and current.type:
        if current.type != KERNEL:
            raise InvalidArgumentError(f"mechanism {current.type} is not supported (only KERNEL)")
        chosen.CopyFrom(current)
        return chosen
    for preference in request.mechanism_preferences:
        if preference.type == KERNEL:
            chosen.CopyFrom(preference)
            return chosen
    offered = ", ".join(p.type or "(none)" for p in request.mechanism_preferences) or "none"
    raise InvalidArgumentError(f"no KERNEL mechanism offered (offered: {offered})")


def interface_name(connection_id: str) -> str:
    """`nsm-` and 8 hex digits of a hash of the connection id: 12 characters, stable."""
    return "nsm-" + hashlib.sha256(connection_id.encode()).hexdigest()[:8]


def netns_url(netns: str | None) -> str:
    """The `inodeURL` of a namespace: its file (a named one), else our own (the calling
    thread's, as the sdk's kernel mechanism sets it)."""
    return f"file://{netns_path(netns)}" if netns is not None else NETNS_URL


# -- the endpoint --------------------------------------------------------------------------------


class LoadBalancer(NetworkServiceServicer):  # type: ignore[misc]  # untyped generated base
    """The LB's endpoint state: what it answered, by the caller's connection id; and how its
    registration goes (for the lab's tests and logs)."""

    def __init__(self, settings: LbSettings) -> None:
        self.settings = settings
        # NSM's tokens, signed and checked (None: plain text)
        self.signer = Signer.of(settings.tls, settings.token_lifetime) if settings.tls else None
        self.registry = RegistryClient(self.signer)  # (its `paths`: what the registry answered)
        self.connections: dict[str, Connection] = {}
        self.registrations: Watched[int] = Watched(0)  # successful Register calls so far
        self.granted: NetworkServiceEndpoint | None = None  # the registry's last answer
        self.routes_installed: Watched[frozenset[Network]] = Watched(frozenset())
        self._register_sent = False

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        settings = self.settings
        incoming = message.connection
        if incoming.network_service != settings.service:
            raise InvalidArgumentError(
                f"this endpoint serves {settings.service!r}, not {incoming.network_service!r}"
            )
        mechanism = select_mechanism(message)
        caller_id = incoming.id
        try:
            hop = server_hop(incoming, settings.name)
        except PathError as exc:
            raise InvalidArgumentError(str(exc)) from None
        connection = hop.connection
        own = hop.segment
        own.expires.CopyFrom(timestamp(time.time() + settings.token_lifetime))
        signer = self.signer
        if signer is not None:  # NSM's tokens: the caller's and ours, then the policies
            signer.server_check(connection, request.custom_metadata, request.peer)
        name = mechanism.parameters.get("name") or interface_name(caller_id)
        if len(name) > MAX_IFNAME:
            raise InvalidArgumentError(f"interface name {name!r} is longer than {MAX_IFNAME}")
        mechanism.parameters["name"] = name
        mechanism.parameters[INODE_URL] = netns_url(settings.netns)
        connection.mechanism.CopyFrom(mechanism)
        connection.network_service_endpoint_name = settings.name
        connection = hop.answer(connection)
        known = caller_id in self.connections
        self.connections[caller_id] = connection
        logger.info(
            "connection refreshed" if known else "connection requested",
            conn_id=caller_id,
            interface=name,
            addresses=",".join(connection.context.ip_context.dst_ip_addrs),
            mtu=connection.context.MTU,
        )
        answer = Connection()
        answer.CopyFrom(connection)
        send_answer(request.fds, answer)
        return answer

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        signer = self.signer
        if signer is not None:
            try:
                hop = server_hop(message, self.settings.name)
            except PathError as exc:
                raise InvalidArgumentError(str(exc)) from None
            signer.server_check(hop.connection, request.custom_metadata, request.peer, closing=True)
        if self.connections.pop(message.id, None) is not None:
            logger.info("connection closed", conn_id=message.id)
        return Empty()

    # -- registry ---------------------------------------------------------------------------------

    def endpoint(self, expires: float) -> NetworkServiceEndpoint:
        settings = self.settings
        registration = NetworkServiceEndpoint(
            name=settings.name,
            network_service_names=[settings.service],
            url=str(settings.listen),
        )
        registration.network_service_labels[settings.service].CopyFrom(
            NetworkServiceLabels(labels=dict(settings.labels))
        )
        registration.expiration_time.CopyFrom(timestamp(expires))
        return registration

    async def keep_registered(self, registry: ReconnectingChannel) -> None:
        """Register the service and the endpoint, and keep them: the endpoint refreshed at 2/3 of
        each grant, both again as soon as a lost registry connection is back (a restarted lab NSM
        has forgotten them), retried with backoff while the registry fails."""
        settings = self.settings
        backoff = Backoff(maximum=settings.max_backoff)
        service_registered_on: Channel | None = None
        failing = False
        while True:
            try:
                with trio.fail_after(CALL_TIMEOUT):
                    channel = await registry.get()
                    if channel is not service_registered_on:
                        await self.registry.register_service(
                            channel, NetworkService(name=settings.service, payload=ETHERNET)
                        )
                        service_registered_on = channel
                    asked = time.time() + settings.registration_lifetime
                    self._register_sent = True
                    granted = await self.registry.register_endpoint(channel, self.endpoint(asked))
            except (RpcFailedError, trio.TooSlowError, FdPassError) as exc:
                reason = describe_failure(exc)
                if not failing:
                    logger.warning(
                        "registration failed, retrying", nse=settings.name, reason=reason
                    )
                failing = True
                await trio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            failing = False
            self.granted = granted
            expires = seconds(granted.expiration_time)
            if not granted.HasField("expiration_time") or expires <= 0:
                expires = asked
            if self.registrations.value == 0:
                logger.info("registered", nse=settings.name, service=settings.service)
            self.registrations.set(self.registrations.value + 1)
            with trio.move_on_after(max(0.05, (expires - time.time()) * 2 / 3)):
                await channel.wait_unusable()

    def _client_tls(self) -> Tls | None:
        return self.settings.tls.client() if self.settings.tls else None

    async def unregister(self) -> None:
        """Tell the registry the endpoint is gone (expiration {seconds: -1}); errors logged."""
        if not self._register_sent:  # sent, not answered: an answer on its way still counts
            return
        registration = self.endpoint(0)
        registration.expiration_time.CopyFrom(Timestamp(seconds=-1))
        try:
            async with open_channel(
                self.settings.nsm, connect_timeout=STOP_BUDGET, ssl_context=self._client_tls()
            ) as channel:
                await self.registry.unregister_endpoint(channel, registration)
        except RpcFailedError as exc:
            logger.warning("unregister failed", nse=self.settings.name, reason=describe_status(exc))
        else:
            logger.info("unregistered", nse=self.settings.name)

    # -- forwarding -------------------------------------------------------------------------------

    async def keep_routes(self, worker: NetlinkWorker) -> None:
        """Install the configured routes, and again whenever one is missing or changed."""
        if not self.settings.routes:
            return
        reported: dict[Network, str] = {}
        while True:
            installed, problems = await worker.call(
                lambda ipr: _sync_routes(ipr, self.settings.routes)
            )
            self.routes_installed.set(installed)
            for prefix, problem in problems.items():
                if reported.get(prefix) != problem:
                    logger.info("route not installed yet", prefix=str(prefix), reason=problem)
            for prefix in installed:
                if prefix in reported:
                    logger.info("route installed", prefix=str(prefix))
            reported = problems
            await trio.sleep(self.settings.route_interval)


def _family(network: Network | IPAddress) -> int:
    return socket.AF_INET if network.version == 4 else socket.AF_INET6


def _main_table_gateways(ipr: IPRoute, prefix: Network) -> frozenset[IPAddress] | None:
    """The gateways of the main table's route to exactly `prefix`; None when there is none."""
    for route in ipr.route("dump", family=_family(prefix), table=254):
        if route["dst_len"] != prefix.prefixlen or route.get_attr("RTA_TABLE") != 254:
            continue
        destination = route.get_attr("RTA_DST")
        if prefix.prefixlen and destination != str(prefix.network_address):
            continue
        gateways = [route.get_attr("RTA_GATEWAY")]
        for hop in route.get_attr("RTA_MULTIPATH") or ():
            gateways.append(hop.get_attr("RTA_GATEWAY"))
        return frozenset(ipaddress.ip_address(g) for g in gateways if g)
    return None


def _sync_routes(
    ipr: IPRoute, routes: Mapping[Network, frozenset[IPAddress]]
) -> tuple[frozenset[Network], dict[Network, str]]:
    """(prefixes whose route is right, {prefix: why not} for the others)."""
    installed = set()
    problems = {}
    for prefix, gateways in routes.items():
        if _main_table_gateways(ipr, prefix) == gateways:
            installed.add(prefix)
            continue
        fields: dict[str, Any] = {"dst": str(prefix), "family": _family(prefix), "table": 254}
        if len(gateways) == 1:
            fields["gateway"] = str(next(iter(gateways)))
        else:
            fields["multipath"] = [{"gateway": str(g)} for g in sorted(gateways)]
        try:
            _translated(partial(ipr.route, "replace", **fields))
        except KernelError as error:
            if error.errno == ENETUNREACH:
                problems[prefix] = "its gateway is not reachable yet"
            else:
                problems[prefix] = str(error)
            continue
        installed.add(prefix)
    return frozenset(installed), problems


def _delete_routes(ipr: IPRoute, routes: Mapping[Network, frozenset[IPAddress]]) -> None:
    for prefix, gateways in routes.items():
        if _main_table_gateways(ipr, prefix) != gateways:
            continue  # not (or no longer) ours
        with contextlib.suppress(NotFound):
            _translated(
                partial(ipr.route, "del", dst=str(prefix), family=_family(prefix), table=254)
            )


def _translated(operation: Callable[[], object]) -> None:
    try:
        operation()
    except NetlinkError as exc:
        raise from_netlink_error(exc) from exc


def _prepare_namespace(ipr: IPRoute, outside: str | None) -> None:
    """Sysctls for forwarding, and the outside interface up (it must exist)."""
    for name, value in SYSCTLS:
        write_proc(name, value)
    if outside is not None:
        indexes = ipr.link_lookup(ifname=outside)
        if not indexes:
            raise OSError(19, f"the outside interface {outside!r} does not exist")  # ENODEV
        ipr.link("set", index=indexes[0], state="up")


async def run_worker(
    worker: NetlinkWorker,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run `worker` inside `scope` (a shielded one): it outlives the cancellation of the task
    that uses it, so that task's cleanup jobs still run, in order after any job in flight, until
    it cancels `scope` itself."""
    with scope:
        await worker.run(task_status=task_status)


async def run_lb(
    settings: LbSettings,
    *,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[LoadBalancer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the LB until cancelled (over mutual TLS with `tls`, when given, else as `settings`
    say); `nursery.start` returns its `LoadBalancer` once it listens and its namespace is
    prepared (before it has registered). A namespace that does not exist, a missing outside
    interface or a socket that cannot be bound: OSError from `nursery.start`."""
    if tls is not None:
        settings = attrs.evolve(settings, tls=tls)
    lb = LoadBalancer(settings)
    worker = NetlinkWorker(settings.netns)
    worker_scope = trio.CancelScope(shield=True)
    failure: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(run_worker, worker, worker_scope)
            await worker.call(lambda ipr: _prepare_namespace(ipr, settings.outside))
            await nursery.start(partial(serve, [lb], settings.listen, tls=settings.tls))
        except OSError as exc:
            failure = exc
        else:
            registry = ReconnectingChannel(
                settings.nsm,
                name="nsm",
                backoff=Backoff(maximum=settings.max_backoff),
                ssl_context=lb._client_tls(),
            )
            nursery.start_soon(registry.run)
            nursery.start_soon(lb.keep_registered, registry)
            nursery.start_soon(lb.keep_routes, worker)
            logger.info(
                "load-balancer up",
                nse=settings.name,
                service=settings.service,
                listen=str(settings.listen),
                netns=settings.netns or "(own)",
                outside=settings.outside or "(none)",
            )
            task_status.started(lb)
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_BUDGET):
                    await lb.unregister()
                    await worker.call(partial(_delete_routes, routes=settings.routes))
        finally:
            worker_scope.cancel()
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
