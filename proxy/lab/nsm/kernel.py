"""The lab's kernel forwarder: one veth pair per connection, addressed as NSM's forwarder does.

For each `Wiring` the pair has one end in the client's network namespace (`client_ifname`) and
one in the endpoint's (`endpoint_ifname`), both with the wiring's MTU and up. The IP context is
applied as NSM's kernel forwarder applies it:

* `src_ip_addrs` on the client end, `dst_ip_addrs` on the endpoint end (IPv6 with nodad, so the
  addresses work at once);
* `src_routes` in the client's main table, `dst_routes` in the endpoint's, each through its end
  of the pair: `prefix via nextHop` when a next hop is given, else on-link. A next hop outside
  every address of that end is installed `onlink` (the pair is point-to-point: whatever the
  other end answers for is on the link);
* `policies` on the client side: each `PolicyRoute` gets a routing table of its own, its routes
  there (through the client end, as above), and a rule `from <from> [ipproto P] [sport A-B]
  [dport C-D] lookup <table>` at priority `POLICY_RULE_PRIORITY`. This is how a target's VIP
  egress reaches the proxy's bridge gateway when the target asks for it in its context.

**Tables**: the lowest number in `POLICY_TABLES` (20000-29999) that no rule of the client's
namespace points to and no other connection of ours holds there, chosen when the policy first
appears and kept across refreshes (a policy is known by its selector: from, proto and ports).
The range stays clear of the proxy's own table (NSM_ROUTING_TABLE, 4096 by default) and of the
kernel's 253-255; the priority (20000) sits before the main table (32766) and the proxy's VIP
rules (30000), which never share a namespace with a target's rules anyway.

**Ownership**: both ends carry the alias `lab-nsm:<connection id>`. A name held by a link
without that alias is someone else's, and `connect` refuses it (`NameTaken`) rather than take it
over. A pair with our alias is adopted as it is, so a restarted forwarder (which has lost its
memory) brings an existing pair in line instead of cutting it (its policies get fresh tables; the
old rules stay until the namespace goes).

**Idempotence**: `connect` on a known connection with the same names and namespaces is a
refresh: the pair is kept (same ifindex), the MTU and up state corrected, addresses, routes and
policies brought in line: what the context asks for is added (EEXIST is success), what an earlier
context of this connection asked for and this one does not is removed. Nothing the connection
never asked for is touched (a target's own VIP addresses on its end, for instance). A changed
name or namespace replaces the pair. `disconnect` deletes the pair (deleting one end deletes the
other, and the kernel drops the routes through it) and the policy rules; an unknown id is a
no-op, a vanished namespace is already clean.

**Threads**: all netlink work runs on one `NetlinkWorker` thread, which enters the namespaces a
job needs with setns(2), opens a pyroute2 socket in each (the socket stays bound to the
namespace it was born in), and returns to its own namespace before the job's real work. One
thread rather than one per namespace because: a job touches two namespaces at once (the veth
is created from the client side with its peer placed straight into the endpoint's namespace); a
thread or socket parked in a namespace would keep a dead pod's namespace alive; two paths can
name one namespace (`/proc/<pid>/ns/net`, `/run/netns/x`, `/proc/<manager pid>/fd/<n>` for one
passed as a descriptor: opening that path reopens the O_PATH descriptor NSM passes, which
setns(2) would refuse as it is); and one thread runs jobs one at a time, which is the only lock
the per-connection state needs: that state is read and written by the jobs alone. Opening the
sockets costs about a millisecond per job. Nothing forks (pyroute2's `netns=` would).

The forwarder leaves its pairs in place when it stops (a forwarder restart must not cut
traffic); the lab's topology removes the namespaces, which takes the pairs with them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, asynccontextmanager, contextmanager
from functools import partial
from typing import Any, TypeVar

import attrs
import trio
from loguru import logger
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxy.api.networkservice.connectioncontext_pb2 import IPContext
from proxy.api.networkservice.connectioncontext_pb2 import Route as RouteMessage
from proxy.kernel.errors import Exists, KernelError, NotFound, from_netlink_error
from proxy.kernel.netlink import NetlinkWorker
from proxy.lab.nsm.forwarding import Wiring

__all__ = [
    "ALIAS_PREFIX",
    "MAX_IFNAME",
    "POLICY_RULE_PRIORITY",
    "POLICY_TABLES",
    "Desired",
    "ForwarderError",
    "Hop",
    "KernelForwarder",
    "NameTaken",
    "NamespaceMissing",
    "Pair",
    "Selector",
    "WiringError",
    "desired_state",
    "netns_path",
    "open_kernel_forwarder",
    "validate_ifname",
]

MAX_IFNAME = 15  # IFNAMSIZ - 1
ALIAS_PREFIX = "lab-nsm:"
POLICY_TABLES = range(20000, 30000)
POLICY_RULE_PRIORITY = 20000
IFA_F_NODAD = 0x02
RTNH_F_ONLINK = 0x04
RT_SCOPE_LINK = 253
MAIN_TABLE = 254
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
T = TypeVar("T")


class ForwarderError(Exception):
    """The forwarder could not wire a connection; the message says which and why."""


class WiringError(ForwarderError, ValueError):
    """The wiring itself is wrong (a name too long, an address that does not parse): refused
    before anything touches the kernel."""


class NameTaken(ForwarderError):
    """An interface name of the wiring belongs to a link that is not this connection's."""


class NamespaceMissing(ForwarderError):
    """A namespace path of the wiring does not exist (the pod is gone, or a typo)."""


# -- the desired state: pure ---------------------------------------------------------------------


@attrs.frozen
class Hop:
    """A route through one end of the pair: `prefix via gateway`, or on-link (gateway None)."""

    prefix: IPNetwork
    gateway: IPAddress | None = None


@attrs.frozen
class Selector:
    """What a policy rule matches: the source, and optionally the IP protocol and port ranges."""

    source: IPNetwork
    proto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None


@attrs.frozen
class Desired:
    """What one wiring asks of the kernel, validated and parsed."""

    client_addresses: frozenset[IPInterface] = frozenset()
    endpoint_addresses: frozenset[IPInterface] = frozenset()
    client_routes: frozenset[Hop] = frozenset()
    endpoint_routes: frozenset[Hop] = frozenset()
    policies: Mapping[Selector, frozenset[Hop]] = attrs.field(factory=dict)


def validate_ifname(name: str, role: str) -> None:
    """Linux's rules for an interface name (dev_valid_name), with a message that says which."""
    if not name:
        raise WiringError(f"{role} interface name is empty")
    if len(name) > MAX_IFNAME:
        raise WiringError(
            f"{role} interface name {name!r} is {len(name)} characters; Linux allows at most"
            f" {MAX_IFNAME}"
        )
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise WiringError(f"{role} interface name {name!r} is not valid (no '/', ':' or spaces)")


def desired_state(wiring: Wiring) -> Desired:
    """The kernel state `wiring` asks for; WiringError when any part of it is malformed."""
    validate_ifname(wiring.client_ifname, "client")
    validate_ifname(wiring.endpoint_ifname, "endpoint")
    if not wiring.connection_id:
        raise WiringError("the connection id is empty")
    if wiring.client_netns == wiring.endpoint_netns and (
        wiring.client_ifname == wiring.endpoint_ifname
    ):
        raise WiringError(f"both ends are named {wiring.client_ifname!r} in one namespace")
    if not 68 <= wiring.mtu <= 65535:
        raise WiringError(f"MTU {wiring.mtu} is outside 68-65535")
    context: IPContext = wiring.ip_context
    policies: dict[Selector, frozenset[Hop]] = {}
    for index, policy in enumerate(context.policies):
        where = f"policies[{index}]"
        selector = Selector(
            source=_network(getattr(policy, "from"), f"{where}.from"),
            proto=_proto(policy.proto, f"{where}.proto"),
            sport=_port_range(policy.src_port, f"{where}.src_port"),
            dport=_port_range(policy.dst_port, f"{where}.dst_port"),
        )
        if selector in policies:
            raise WiringError(f"{where} repeats the selector of an earlier policy")
        family = selector.source.version
        policies[selector] = frozenset(
            _hop(route, f"{where}.routes[{i}]", family) for i, route in enumerate(policy.routes)
        )
    return Desired(
        client_addresses=frozenset(
            _interface(text, f"src_ip_addrs[{i}]") for i, text in enumerate(context.src_ip_addrs)
        ),
        endpoint_addresses=frozenset(
            _interface(text, f"dst_ip_addrs[{i}]") for i, text in enumerate(context.dst_ip_addrs)
        ),
        client_routes=frozenset(
            _hop(route, f"src_routes[{i}]") for i, route in enumerate(context.src_routes)
        ),
        endpoint_routes=frozenset(
            _hop(route, f"dst_routes[{i}]") for i, route in enumerate(context.dst_routes)
        ),
        policies=policies,
    )


def _interface(text: str, where: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise WiringError(f"{where}: {text!r} is not an address with a prefix length") from None


def _network(text: str, where: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise WiringError(f"{where}: {text!r} is not an address or prefix") from None


def _hop(route: RouteMessage, where: str, family: int | None = None) -> Hop:
    gateway: IPAddress | None = None
    if route.nextHop:
        try:
            gateway = ipaddress.ip_address(route.nextHop)
        except ValueError:
            raise WiringError(f"{where}.nextHop: {route.nextHop!r} is not an address") from None
    if route.prefix:
        prefix = _network(route.prefix, f"{where}.prefix")
    elif gateway is not None or family is not None:  # no prefix: the default route
        version = gateway.version if gateway is not None else family
        prefix = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
    else:
        raise WiringError(f"{where} has neither a prefix nor a next hop")
    if gateway is not None and gateway.version != prefix.version:
        raise WiringError(f"{where}: next hop {gateway} is not of the family of {prefix}")
    if family is not None and prefix.version != family:
        raise WiringError(f"{where}: {prefix} is not of the family of the policy's source")
    return Hop(prefix, gateway)


def _proto(text: str, where: str) -> int | None:
    if not text:
        return None
    names = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "sctp": 132}
    if text.lower() in names:
        return names[text.lower()]
    if text.isdigit() and int(text) <= 255:
        return int(text)
    raise WiringError(f"{where}: {text!r} is not an IP protocol number")


def _port_range(text: str, where: str) -> tuple[int, int] | None:
    if not text:
        return None
    low, _, high = text.partition("-")
    if not (low.isdigit() and (high.isdigit() or not high)):
        raise WiringError(f"{where}: {text!r} is not a port or a port range (start-end)")
    start, end = int(low), int(high or low)
    if not 0 <= start <= end <= 65535:
        raise WiringError(f"{where}: {text!r} is not a port range within 0-65535")
    return start, end


def netns_path(name_or_path: str) -> str:
    """A namespace as a path: absolute paths as they are, bare names under /run/netns."""
    return name_or_path if name_or_path.startswith("/") else f"/run/netns/{name_or_path}"


# -- what the forwarder remembers ----------------------------------------------------------------

NsKey = tuple[int, int]  # (st_dev, st_ino) of a namespace file: one per namespace, whatever path


@attrs.frozen
class Pair:
    """One wired connection: the wiring as last applied, what it asked for, and the tables its
    policies hold in the client's namespace."""

    wiring: Wiring
    client_ns: NsKey
    client_index: int
    endpoint_index: int
    desired: Desired
    tables: Mapping[Selector, int]


# -- the forwarder -------------------------------------------------------------------------------


class KernelForwarder:
    """The `Forwarder` that wires veth pairs; `run` it in a nursery (or `open_kernel_forwarder`)
    before calling `connect`/`disconnect`."""

    def __init__(self) -> None:
        self._worker = NetlinkWorker(None)
        self._pairs: dict[str, Pair] = {}  # read and written by worker jobs only

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the worker thread and serve until cancelled (the pairs stay)."""
        await self._worker.run(task_status=task_status)

    @property
    def pairs(self) -> dict[str, Pair]:
        """A copy of what is wired now, by connection id (for logs and tests)."""
        return dict(self._pairs)

    async def connect(self, wiring: Wiring) -> None:
        desired = desired_state(wiring)  # bad input never reaches the kernel
        started = trio.current_time()
        pair = await self._worker.call(lambda _ipr: self._connect(wiring, desired))
        logger.debug(
            "connection wired",
            conn_id=wiring.connection_id,
            client=f"{wiring.client_ifname}@{wiring.client_netns}",
            endpoint=f"{wiring.endpoint_ifname}@{wiring.endpoint_netns}",
            client_index=pair.client_index,
            tables=sorted(pair.tables.values()),
            ms=round((trio.current_time() - started) * 1000, 1),
        )

    async def disconnect(self, connection_id: str) -> None:
        pair = await self._worker.call(lambda _ipr: self._disconnect(connection_id))
        if pair is not None:
            logger.debug("connection unwired", conn_id=connection_id)

    # -- jobs (on the worker thread) ------------------------------------------------------------

    def _connect(self, wiring: Wiring, desired: Desired) -> Pair:
        previous = self._pairs.get(wiring.connection_id)
        if previous is not None and not _same_pair(previous.wiring, wiring):
            self._disconnect(wiring.connection_id)  # renamed or moved: a new pair
            previous = None
        with _sockets(wiring.client_netns, wiring.endpoint_netns) as (client, endpoint, key):
            client_index, endpoint_index = _ensure_pair(client, endpoint, wiring)
            # A recreated pair has none of the old addresses and routes (they went with the old
            # links), but the old policy rules and their tables are still there.
            kept = previous is not None and previous.client_index == client_index
            before = previous.desired if previous is not None and kept else Desired()
            tables = dict(previous.tables) if previous is not None else {}
            failures: list[str] = []
            _sync_addresses(
                client,
                client_index,
                desired.client_addresses,
                before.client_addresses,
                failures,
            )
            _sync_addresses(
                endpoint,
                endpoint_index,
                desired.endpoint_addresses,
                before.endpoint_addresses,
                failures,
            )
            _sync_hops(
                client,
                client_index,
                MAIN_TABLE,
                desired.client_routes,
                before.client_routes,
                desired.client_addresses,
                failures,
            )
            _sync_hops(
                endpoint,
                endpoint_index,
                MAIN_TABLE,
                desired.endpoint_routes,
                before.endpoint_routes,
                desired.endpoint_addresses,
                failures,
            )
            held = {
                table
                for other_id, pair in self._pairs.items()
                if other_id != wiring.connection_id and pair.client_ns == key
                for table in pair.tables.values()
            }
            tables = _sync_policies(
                client,
                client_index,
                desired,
                before,
                tables,
                held,
                failures,
            )
            pair = Pair(wiring, key, client_index, endpoint_index, desired, tables)
            self._pairs[wiring.connection_id] = pair  # recorded even when something failed:
            # a later disconnect must still find what was made, and a retry completes it
        if failures:
            raise ForwarderError(
                f"connection {wiring.connection_id}: {len(failures)} kernel operation(s) failed: "
                + "; ".join(failures)
            )
        return pair

    def _disconnect(self, connection_id: str) -> Pair | None:
        pair = self._pairs.pop(connection_id, None)
        if pair is None:
            return None
        wiring = pair.wiring
        try:
            with _sockets(wiring.client_netns, None) as (client, _endpoint, key):
                if key != pair.client_ns:
                    return pair  # the path names another namespace now: ours is gone
                link = _find_link(client, wiring.client_ifname)
                if link is not None and _alias(link) == _our_alias(connection_id):
                    _tolerant(partial(client.link, "del", index=link["index"]), deleting=True)
                for selector, table in pair.tables.items():
                    _tolerant(
                        partial(client.rule, "del", **_rule_fields(selector, table)),
                        deleting=True,
                    )
        except NamespaceMissing:
            pass  # the namespace went away with everything in it
        return pair


def _same_pair(old: Wiring, new: Wiring) -> bool:
    return (old.client_netns, old.client_ifname, old.endpoint_netns, old.endpoint_ifname) == (
        new.client_netns,
        new.client_ifname,
        new.endpoint_netns,
        new.endpoint_ifname,
    )


@asynccontextmanager
async def open_kernel_forwarder() -> AsyncIterator[KernelForwarder]:
    """A running KernelForwarder for the duration of the block."""
    forwarder = KernelForwarder()
    async with trio.open_nursery() as nursery:
        await nursery.start(forwarder.run)
        try:
            yield forwarder
        finally:
            nursery.cancel_scope.cancel()


# -- namespaces and sockets ----------------------------------------------------------------------


def _setns(fd: int, what: str) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns({what}): {os.strerror(err)}")


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # never O_CREAT: a typo stays a typo
    except FileNotFoundError:
        raise NamespaceMissing(f"network namespace {path} does not exist") from None


@contextmanager
def _sockets(
    client_netns: str, endpoint_netns: str | None
) -> Iterator[tuple[IPRoute, IPRoute, NsKey]]:
    """pyroute2 sockets born in the client's and the endpoint's namespaces (one socket when
    both are the same namespace, or when there is no endpoint), and the client's namespace key.
    The calling thread is back in its own namespace before the body runs."""
    with ExitStack() as stack:
        paths = [netns_path(client_netns)]
        if endpoint_netns is not None:
            paths.append(netns_path(endpoint_netns))
        fds = []
        for path in paths:
            fd = _open_netns(path)
            stack.callback(os.close, fd)
            fds.append(fd)
        keys = [(st.st_dev, st.st_ino) for st in map(os.fstat, fds)]
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        stack.callback(os.close, home)
        sockets: dict[NsKey, IPRoute] = {}
        try:
            for fd, key, path in zip(fds, keys, paths, strict=True):
                if key not in sockets:
                    _setns(fd, path)
                    ipr = IPRoute(ext_ack=True)
                    stack.callback(ipr.close)
                    sockets[key] = ipr
        finally:
            _setns(home, "back to the worker's own namespace")
        client = sockets[keys[0]]
        yield client, sockets[keys[-1]], keys[0]


# -- the pair ------------------------------------------------------------------------------------


def _our_alias(connection_id: str) -> str:
    return f"{ALIAS_PREFIX}{connection_id}"[:255]


def _find_link(ipr: IPRoute, name: str) -> Any | None:
    indexes = ipr.link_lookup(ifname=name)
    if not indexes:
        return None
    return ipr.link("get", index=indexes[0])[0]


def _alias(link: Any) -> str | None:
    alias = link.get_attr("IFLA_IFALIAS")
    return str(alias) if alias else None


def _kind(link: Any) -> str | None:
    info = link.get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def _ensure_pair(client: IPRoute, endpoint: IPRoute, wiring: Wiring) -> tuple[int, int]:
    """The pair's (client index, endpoint index): the existing pair of this connection kept and
    corrected, or a new one made. NameTaken when a name belongs to a link that is not ours."""
    alias = _our_alias(wiring.connection_id)
    client_link = _find_link(client, wiring.client_ifname)
    endpoint_link = _find_link(endpoint, wiring.endpoint_ifname)
    for link, role, name, netns in (
        (client_link, "client", wiring.client_ifname, wiring.client_netns),
        (endpoint_link, "endpoint", wiring.endpoint_ifname, wiring.endpoint_netns),
    ):
        if link is not None and _alias(link) != alias:
            owner = _alias(link)
            raise NameTaken(
                f"connection {wiring.connection_id}: the {role} interface name {name!r} is taken"
                f" in {netns} by a {_kind(link) or 'link'} "
                + (f"of another connection ({owner})" if owner else "that is not the forwarder's")
            )
    paired = (
        client_link is not None
        and endpoint_link is not None
        and _kind(client_link) == "veth"
        and client_link.get_attr("IFLA_LINK") == endpoint_link["index"]
        and endpoint_link.get_attr("IFLA_LINK") == client_link["index"]
    )
    if not paired:
        for ipr, link in ((client, client_link), (endpoint, endpoint_link)):
            if link is not None:  # ours, but not a working pair: start again
                _tolerant(partial(ipr.link, "del", index=link["index"]), deleting=True)
        endpoint_fd = _open_netns(netns_path(wiring.endpoint_netns))
        try:
            client.link(
                "add",
                ifname=wiring.client_ifname,
                kind="veth",
                mtu=wiring.mtu,
                peer={
                    "ifname": wiring.endpoint_ifname,
                    "net_ns_fd": endpoint_fd,
                    "mtu": wiring.mtu,
                },
            )
        except NetlinkError as exc:
            error = from_netlink_error(exc, operation=f"create veth {wiring.client_ifname}")
            if isinstance(error, Exists):  # the peer's name is taken by a link we did not see
                raise NameTaken(
                    f"connection {wiring.connection_id}: cannot create the pair"
                    f" {wiring.client_ifname}/{wiring.endpoint_ifname}: {error}"
                ) from None
            raise error from exc
        finally:
            os.close(endpoint_fd)
        client_link = _find_link(client, wiring.client_ifname)
        endpoint_link = _find_link(endpoint, wiring.endpoint_ifname)
        if client_link is None or endpoint_link is None:
            raise ForwarderError(f"connection {wiring.connection_id}: the new pair vanished")
    assert client_link is not None and endpoint_link is not None
    for ipr, link in ((client, client_link), (endpoint, endpoint_link)):
        changes: dict[str, Any] = {}
        if link.get_attr("IFLA_MTU") != wiring.mtu:
            changes["mtu"] = wiring.mtu
        if not link["flags"] & 1:  # IFF_UP
            changes["state"] = "up"
        if _alias(link) != alias:
            changes["ifalias"] = alias
        if changes:
            _translate(partial(ipr.link, "set", index=link["index"], **changes))
    return int(client_link["index"]), int(endpoint_link["index"])


# -- addresses, routes, policies -----------------------------------------------------------------


def _family(version: int) -> int:
    return socket.AF_INET if version == 4 else socket.AF_INET6


def _addresses(ipr: IPRoute, index: int) -> set[IPInterface]:
    found: set[IPInterface] = set()
    for message in ipr.get_addr(index=index):
        if message["index"] != index:
            continue
        text = message.get_attr("IFA_LOCAL") or message.get_attr("IFA_ADDRESS")
        if text:
            found.add(ipaddress.ip_interface(f"{text}/{message['prefixlen']}"))
    return found


def _sync_addresses(
    ipr: IPRoute,
    index: int,
    wanted: frozenset[IPInterface],
    before: frozenset[IPInterface],
    failures: list[str],
) -> None:
    present = _addresses(ipr, index)
    for address in sorted(before - wanted, key=str):
        if address in present:
            _attempt(
                failures,
                f"delete address {address}",
                partial(
                    ipr.addr,
                    "del",
                    index=index,
                    address=str(address.ip),
                    prefixlen=address.network.prefixlen,
                    family=_family(address.version),
                ),
                deleting=True,
            )
    for address in sorted(wanted - present, key=str):
        _attempt(
            failures,
            f"add address {address}",
            partial(
                ipr.addr,
                "add",
                index=index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=_family(address.version),
                flags=IFA_F_NODAD if address.version == 6 else 0,
            ),
        )


def _route_fields(
    hop: Hop, index: int, table: int, addresses: Iterable[IPInterface]
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "dst": str(hop.prefix),
        "family": _family(hop.prefix.version),
        "oif": index,
        "table": table,
    }
    if hop.gateway is None:
        if hop.prefix.version == 4:
            fields["scope"] = RT_SCOPE_LINK
    else:
        fields["gateway"] = str(hop.gateway)
        if not any(hop.gateway in address.network for address in addresses):
            fields["flags"] = RTNH_F_ONLINK
    return fields


def _sync_hops(
    ipr: IPRoute,
    index: int,
    table: int,
    wanted: frozenset[Hop],
    before: frozenset[Hop],
    addresses: frozenset[IPInterface],
    failures: list[str],
) -> None:
    for hop in sorted(before - wanted, key=str):
        fields = _route_fields(hop, index, table, addresses)
        fields.pop("flags", None)
        _attempt(
            failures,
            f"delete route {_describe(hop)} table {table}",
            partial(ipr.route, "del", **fields),
            deleting=True,
        )
    # `replace` for all: idempotent, and it repairs a route someone changed by hand
    for hop in sorted(wanted, key=str):
        _attempt(
            failures,
            f"replace route {_describe(hop)} table {table}",
            partial(ipr.route, "replace", **_route_fields(hop, index, table, addresses)),
        )


def _describe(hop: Hop) -> str:
    return f"{hop.prefix} via {hop.gateway}" if hop.gateway is not None else f"{hop.prefix} on-link"


def _rule_fields(selector: Selector, table: int) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "family": _family(selector.source.version),
        "table": table,
        "priority": POLICY_RULE_PRIORITY,
    }
    if selector.source.prefixlen:
        fields["src"] = str(selector.source.network_address)
        fields["src_len"] = selector.source.prefixlen
    if selector.proto is not None:
        fields["ip_proto"] = selector.proto
    if selector.sport is not None:
        fields["sport_range"] = f"{selector.sport[0]}:{selector.sport[1]}"
    if selector.dport is not None:
        fields["dport_range"] = f"{selector.dport[0]}:{selector.dport[1]}"
    return fields


def _sync_policies(
    ipr: IPRoute,
    index: int,
    desired: Desired,
    before: Desired,
    tables: dict[Selector, int],
    held: set[int],
    failures: list[str],
) -> dict[Selector, int]:
    """Rules and tables of the connection's policies in line with `desired`; the tables now
    held by the connection."""
    for selector in [s for s in tables if s not in desired.policies]:
        table = tables.pop(selector)
        _attempt(
            failures,
            f"delete rule from {selector.source} lookup {table}",
            partial(ipr.rule, "del", **_rule_fields(selector, table)),
            deleting=True,
        )
        _sync_hops(
            ipr,
            index,
            table,
            frozenset(),
            before.policies.get(selector, frozenset()),
            desired.client_addresses,
            failures,
        )
    if any(selector not in tables for selector in desired.policies):
        used = _tables_in_use(ipr) | held | set(tables.values())
        for selector in desired.policies:
            if selector not in tables:
                free = next((t for t in POLICY_TABLES if t not in used), None)
                if free is None:
                    failures.append(f"no free table in {POLICY_TABLES} for {selector.source}")
                    continue
                tables[selector] = free
                used.add(free)
    for selector, hops in desired.policies.items():
        if selector not in tables:
            continue
        table = tables[selector]
        _sync_hops(
            ipr,
            index,
            table,
            hops,
            before.policies.get(selector, frozenset()),
            desired.client_addresses,
            failures,
        )
        _attempt(
            failures,
            f"add rule from {selector.source} lookup {table}",
            partial(ipr.rule, "add", **_rule_fields(selector, table)),
        )
    return tables


def _tables_in_use(ipr: IPRoute) -> set[int]:
    used: set[int] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for rule in ipr.get_rules(family=family):
            used.add(int(rule.get_attr("FRA_TABLE") or rule["table"]))
    return used


# -- errors --------------------------------------------------------------------------------------


def _translate(operation: Callable[[], T]) -> T:
    try:
        return operation()
    except NetlinkError as exc:
        raise from_netlink_error(exc) from exc


def _tolerant(operation: Callable[[], object], *, deleting: bool = False) -> None:
    """Run `operation`; an add that finds its object, or a delete that finds none, is done."""
    try:
        _translate(operation)
    except Exists:
        if deleting:
            raise
    except NotFound:
        if not deleting:
            raise


def _attempt(
    failures: list[str], what: str, operation: Callable[[], object], *, deleting: bool = False
) -> None:
    """`_tolerant`, with a failure noted rather than raised: later operations may not need it."""
    try:
        _tolerant(operation, deleting=deleting)
    except KernelError as error:
        failures.append(f"{what}: {error}")
