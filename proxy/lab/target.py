"""The lab's target stand-in: an application pod's TAPA, reduced to its NSM client and its VIPs.

* **Request.** It asks the NSM manager for `proxy.<conduit>.<trench>.<namespace>` as a TAPA
  does (wire-api §4.2): labels `{"nodeName": <node>}` (the network service's match sends it to
  the proxy of that node), payload ETHERNET, mechanism preference KERNEL with its interface name
  (`name`) and its namespace (`inodeURL`: its `--netns` file, else its own), connection id
  `<target>-<namespace>-0`, path `[{name: <target>, id: <connection id>}]`. As an sdk NSC's
  sendfd client does, the namespace goes as a descriptor with every Request and Close on NSM's
  UNIX socket (the message names it `inode://dev/ino`; the answer's URL is mapped back), so the
  forwarder finds it whatever process or mount namespace the target is in.
* **Refresh.** As NSM's refresh client does for one path segment: the last answer is sent again
  (the connection as returned, same preferences) at 1/3 of the time left until the earliest
  `expires` among its path segments (`fallback_refresh` when none has one). A failed Request is
  retried with jittered backoff until one works.
* **VIPs.** After each answer it puts its VIPs on its interface (the forwarder already put the
  context's `src_ip_addrs` there) and routes their egress to the proxy: for each family that has
  a gateway in `context.ip_context.extra_prefixes` (the proxy's bridge addresses), a default
  route via that gateway through its interface in table `table`, and per VIP a rule
  `from <VIP> lookup <table>` at `rule_priority`. A gateway that changes between answers moves
  the route. The target installs these itself and never asks the forwarder for them (it sends
  no `policies`): the gateways are only known from the answer, so asking for policies would
  take a second Request on every change; installing them here works with any forwarder and
  with none (the tests), and keeps what the target adds (and removes at stop) in one place. A
  VIP of a family without a gateway gets its address but no rule (logged).
* **Stop.** Close (with a deadline) the last answered connection, then remove what it added:
  the rules, the table's routes, the VIP addresses.

Its kernel work runs on a `NetlinkWorker` thread inside its namespace, like the LB's.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import attrs
import trio
from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.kernel.errors import Exists, KernelError, NoSuchDevice, NotFound, from_netlink_error
from proxy.kernel.netlink import NetlinkWorker
from proxy.lab.lb import ETHERNET, KERNEL, netns_url, run_worker
from proxy.lab.nsm.kernel import validate_ifname
from proxy.nsm import nsc
from proxy.nsm.hoptoken import Signer
from proxy.nsm.sendfd import (
    INODE_URL,
    FdPassError,
)
from proxy.nsm.wire import seconds
from proxy.rpc import Address, Backoff, ReconnectingChannel, RpcFailedError, Tls, open_channel
from proxy.rpc.status import describe_failure
from proxy.security.tls import SpiffeTls
from proxy.watched import Watched

__all__ = [
    "DEFAULT_RULE_PRIORITY",
    "DEFAULT_TABLE",
    "MIN_REFRESH",
    "Target",
    "TargetPlan",
    "TargetSettings",
    "initial_request",
    "plan_for",
    "refresh_delay",
    "refreshed_request",
    "run_target",
]

DEFAULT_TABLE = 1000
DEFAULT_RULE_PRIORITY = 1000
IFA_F_NODAD = 0x02
RTNH_F_ONLINK = 0x04
STOP_BUDGET = 5.0
APPLY_RETRY = 1.0
MIN_REFRESH = 0.1  # an answer that has already expired is not a reason to spin

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class TargetSettings:
    name: str  # the target (pod) name: path segment name and the start of the connection id
    node: str  # the `nodeName` label
    service: str  # proxy.<conduit>.<trench>.<namespace>
    nsm: Address  # the NSM manager
    interface: str  # the name of the target's interface (<= 15 characters)
    vips: tuple[IPInterface, ...]
    netns: str | None = None  # a name or path; None: the process's own namespace
    table: int = DEFAULT_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    request_timeout: float = 15.0  # per Request (upstream's)
    fallback_refresh: float = 60.0  # when no path segment says when it expires
    token_lifetime: float = 600.0  # of the tokens it signs (NSM_MAX_TOKEN_LIFETIME, as deployed)
    max_backoff: float = 5.0
    tls: SpiffeTls | None = None  # mutual TLS with NSM; None: plain text

    @property
    def connection_id(self) -> str:
        """`<target>-<namespace>-0`, the namespace being the service name's last part."""
        return f"{self.name}-{self.service.rsplit('.', 1)[-1]}-0"


# -- pure ----------------------------------------------------------------------------------------


def initial_request(settings: TargetSettings) -> NetworkServiceRequest:
    validate_ifname(settings.interface, "target")
    request = NetworkServiceRequest()
    connection = request.connection
    connection.id = settings.connection_id
    connection.network_service = settings.service
    connection.payload = ETHERNET
    connection.labels["nodeName"] = settings.node
    connection.path.index = 0
    connection.path.path_segments.add(name=settings.name, id=settings.connection_id)
    mechanism = Mechanism(cls="LOCAL", type=KERNEL)
    mechanism.parameters["name"] = settings.interface
    mechanism.parameters[INODE_URL] = netns_url(settings.netns)
    request.mechanism_preferences.append(mechanism)
    return request


def refreshed_request(previous: NetworkServiceRequest, answer: Connection) -> NetworkServiceRequest:
    """What NSM's begin/refresh client sends next: the answered connection, same preferences."""
    request = NetworkServiceRequest()
    request.CopyFrom(previous)
    request.connection.CopyFrom(answer)
    return request


def refresh_delay(answer: Connection, now: float, fallback: float) -> float:
    """1/3 of the time left until the earliest `expires` of the answer's path segments."""
    expiries = [
        seconds(segment.expires)
        for segment in answer.path.path_segments
        if segment.HasField("expires")
    ]
    if not expiries:
        return fallback
    return max(MIN_REFRESH, (min(expiries) - now) / 3)


@attrs.frozen
class TargetPlan:
    """The target's own kernel state: VIPs on its interface, a default route per family via the
    gateway in its table, a rule per VIP whose family has a gateway."""

    interface: str
    vips: frozenset[IPInterface]
    gateways: Mapping[int, IPAddress]  # by IP version
    table: int
    rule_priority: int

    @property
    def ruled(self) -> frozenset[IPInterface]:
        """The VIPs that get a rule: those of a family with a gateway."""
        return frozenset(vip for vip in self.vips if vip.version in self.gateways)

    @property
    def routes(self) -> dict[int, IPAddress]:
        """The table's default route per family: the gateways of the families with a VIP."""
        versions = {vip.version for vip in self.vips}
        return {v: gateway for v, gateway in self.gateways.items() if v in versions}


def plan_for(settings: TargetSettings, answer: Connection) -> TargetPlan:
    gateways: dict[int, IPAddress] = {}
    for text in answer.context.ip_context.extra_prefixes:
        try:
            gateway = ipaddress.ip_interface(text).ip
        except ValueError:
            logger.warning("gateway ignored: not an address", extra_prefix=text)
            continue
        gateways.setdefault(gateway.version, gateway)
    interface = answer.mechanism.parameters.get("name") or settings.interface
    return TargetPlan(
        interface, frozenset(settings.vips), gateways, settings.table, settings.rule_priority
    )


# -- the client ----------------------------------------------------------------------------------


class Target:
    """The target's state: the last answer, and how many answers were applied to the kernel."""

    def __init__(self, settings: TargetSettings) -> None:
        self.settings = settings
        # NSM's tokens, signed and checked (None: plain text)
        self.signer = Signer.of(settings.tls, settings.token_lifetime) if settings.tls else None
        self.connection: Connection | None = None
        self.requests: Watched[int] = Watched(0)  # successful Requests (the first and refreshes)
        self.applied: Watched[int] = Watched(0)  # answers whose kernel state is in place
        self._installed: TargetPlan | None = None  # written by worker jobs only

    def client_tls(self) -> Tls | None:
        return self.settings.tls.client() if self.settings.tls else None

    async def keep_connected(self, manager: ReconnectingChannel, worker: NetlinkWorker) -> None:
        settings = self.settings
        request = initial_request(settings)
        backoff = Backoff(maximum=settings.max_backoff)
        failing = False
        log = logger.bind(conn_id=settings.connection_id, service=settings.service)
        while True:
            try:
                with trio.fail_after(settings.request_timeout):
                    sending = NetworkServiceRequest()
                    sending.CopyFrom(request)
                    answer = await nsc.request(await manager.get(), sending, self.signer)
            except (RpcFailedError, trio.TooSlowError, FdPassError) as exc:
                if not failing:
                    log.warning(
                        "request failed, retrying with backoff", reason=describe_failure(exc)
                    )
                failing = True
                await trio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            failing = False
            self.connection = answer
            if self.requests.value == 0:
                log.info(
                    "connected",
                    interface=answer.mechanism.parameters.get("name", ""),
                    addresses=",".join(answer.context.ip_context.src_ip_addrs),
                    gateways=",".join(answer.context.ip_context.extra_prefixes),
                )
            self.requests.set(self.requests.value + 1)
            request = refreshed_request(request, answer)
            due = trio.current_time() + refresh_delay(
                answer, time.time(), settings.fallback_refresh
            )
            with trio.move_on_at(due):
                await self._apply(worker, plan_for(settings, answer))
            await trio.sleep_until(due)

    async def _apply(self, worker: NetlinkWorker, plan: TargetPlan) -> None:
        """Bring the kernel in line with `plan`, retrying (until the caller's deadline) while
        the interface is missing or the kernel refuses."""
        reported = None
        while True:
            try:
                await worker.call(partial(self._install, plan=plan))
            except KernelError as error:
                if str(error) != reported:
                    logger.warning("VIP routing not in place yet", reason=str(error))
                    reported = str(error)
                await trio.sleep(APPLY_RETRY)
                continue
            self.applied.set(self.applied.value + 1)
            return

    def _install(self, ipr: IPRoute, plan: TargetPlan) -> None:
        before = self._installed
        indexes = ipr.link_lookup(ifname=plan.interface)
        if not indexes:
            raise NoSuchDevice(19, operation=f"find interface {plan.interface}")
        index = indexes[0]
        if before is not None and before.interface != plan.interface:
            _uninstall(ipr, before)
            before = None
        for vip in sorted(plan.vips, key=str):
            _tolerant(partial(ipr.addr, "add", **_address_fields(vip, index)))
        for gateway in plan.routes.values():
            _tolerant(partial(ipr.route, "replace", **_route_fields(gateway, index, plan.table)))
        if before is not None:
            for version in set(before.routes) - set(plan.routes):
                _tolerant(partial(ipr.route, "del", **_default_fields(version, before.table)))
            for vip in before.ruled - plan.ruled:
                _tolerant(partial(ipr.rule, "del", **_rule_fields(vip, before)))
        for vip in sorted(plan.ruled, key=str):
            _tolerant(partial(ipr.rule, "add", **_rule_fields(vip, plan)))
        skipped = plan.vips - plan.ruled
        if skipped and (before is None or before.ruled != plan.ruled):
            logger.warning(
                "no gateway of the VIP's family: no egress rule",
                vips=",".join(sorted(map(str, skipped))),
            )
        self._installed = plan

    def _remove(self, ipr: IPRoute) -> None:
        if self._installed is not None:
            _uninstall(ipr, self._installed)
            self._installed = None

    async def close(self, worker: NetlinkWorker) -> None:
        """Close the connection (best effort, with a deadline), then remove the kernel state."""
        if self.connection is not None:
            try:
                with trio.fail_after(STOP_BUDGET / 2):
                    async with open_channel(
                        self.settings.nsm, connect_timeout=1.0, ssl_context=self.client_tls()
                    ) as channel:
                        await nsc.close(channel, self.connection, self.signer)
            except (RpcFailedError, trio.TooSlowError, FdPassError) as exc:
                logger.warning(
                    "close failed",
                    conn_id=self.settings.connection_id,
                    reason=describe_failure(exc),
                )
            else:
                logger.info("closed", conn_id=self.settings.connection_id)
        await worker.call(self._remove)


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _address_fields(vip: IPInterface, index: int) -> dict[str, Any]:
    return {
        "index": index,
        "address": str(vip.ip),
        "prefixlen": vip.network.prefixlen,
        "family": _family(vip.version),
        "flags": IFA_F_NODAD if vip.version == 6 else 0,
    }


def _default_fields(version: int, table: int) -> dict[str, Any]:
    return {
        "dst": "0.0.0.0/0" if version == 4 else "::/0",
        "family": _family(version),
        "table": table,
    }


def _route_fields(gateway: IPAddress, index: int, table: int) -> dict[str, Any]:
    # onlink: the gateway is on the link whatever addresses the forwarder gave the interface
    return {
        **_default_fields(gateway.version, table),
        "gateway": str(gateway),
        "oif": index,
        "flags": RTNH_F_ONLINK,
    }


def _rule_fields(vip: IPInterface, plan: TargetPlan) -> dict[str, Any]:
    return {
        "family": _family(vip.version),
        "src": str(vip.network.network_address),
        "src_len": vip.network.prefixlen,
        "table": plan.table,
        "priority": plan.rule_priority,
    }


def _uninstall(ipr: IPRoute, plan: TargetPlan) -> None:
    for vip in plan.ruled:
        _tolerant(partial(ipr.rule, "del", **_rule_fields(vip, plan)), deleting=True)
    for version in plan.routes:
        _tolerant(partial(ipr.route, "del", **_default_fields(version, plan.table)), deleting=True)
    indexes = ipr.link_lookup(ifname=plan.interface)
    if indexes:  # else the interface went, and its addresses with it
        for vip in plan.vips:
            fields = _address_fields(vip, indexes[0])
            fields.pop("flags")
            _tolerant(partial(ipr.addr, "del", **fields), deleting=True)


def _tolerant(operation: partial[Any], *, deleting: bool = False) -> None:
    try:
        operation()
    except NetlinkError as exc:
        error = from_netlink_error(exc)
        if isinstance(error, Exists if not deleting else NotFound):
            return
        raise error from exc


async def run_target(
    settings: TargetSettings,
    *,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[Target] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the target until cancelled (over mutual TLS with `tls`, when given, else as
    `settings` say): connect, keep refreshing, and at the end close and clean up.
    `nursery.start` returns its `Target` as soon as its netlink worker runs (before the first
    answer: watch `Target.applied`); a namespace that does not exist is an OSError from it."""
    if tls is not None:
        settings = attrs.evolve(settings, tls=tls)
    target = Target(settings)
    initial_request(settings)  # a bad interface name fails here, before anything starts
    worker = NetlinkWorker(settings.netns)
    worker_scope = trio.CancelScope(shield=True)
    failure: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(run_worker, worker, worker_scope)
        except OSError as exc:
            failure = exc
        else:
            manager = ReconnectingChannel(
                settings.nsm,
                name="nsm",
                backoff=Backoff(maximum=settings.max_backoff),
                ssl_context=target.client_tls(),
            )
            nursery.start_soon(manager.run)
            task_status.started(target)
            try:
                await target.keep_connected(manager, worker)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(STOP_BUDGET):
                    await target.close(worker)
        finally:
            worker_scope.cancel()
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
