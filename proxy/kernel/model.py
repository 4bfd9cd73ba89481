"""The kernel objects the proxy manages, as plain values: what is wanted and what is there.

Everything here is immutable and free of I/O, so the reconciler's decisions (`plan.py`) are pure
functions of two values of these types, testable without a kernel.

Managed objects (all keyed by conduit through the names and numbers in `Scope`):
* the bridge (`bridge0`): exists, is up, has the stable MAC;
* its global addresses, one per family (link-local IPv6 is the kernel's and left alone);
* its ports: interfaces, by name, that must be enslaved to it;
* the egress per family in the proxy's routing table: an ECMP default over the load-balancers'
  addresses (a resilient nexthop group, or a legacy multipath route), and a guard route so that an
  empty table never lets VIP traffic fall through to the main table;
* the VIP rules: `from <vip> lookup <table>` at the proxy's rule priority.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Mapping
from enum import IntEnum

import attrs

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Family(IntEnum):
    V4 = socket.AF_INET
    V6 = socket.AF_INET6

    @staticmethod
    def of(value: IPAddress | IPInterface | IPNetwork) -> Family:
        return Family.V4 if value.version == 4 else Family.V6


FAMILIES = (Family.V4, Family.V6)


class RouteType(IntEnum):
    UNICAST = 1
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8


class EgressMode(IntEnum):
    RESILIENT = 1  # nexthop objects in a resilient group (kernel >= 5.13): survivors keep flows
    MULTIPATH = 2  # legacy RTA_MULTIPATH route: every change rehashes every flow


@attrs.frozen
class Resilience:
    """Parameters of a resilient nexthop group (see the kernel's nexthop-group-resilient.rst)."""

    buckets: int = 128
    idle_timer: float = 5.0  # seconds a bucket must be idle before it may move to another LB
    unbalanced_timer: float = 60.0  # seconds of imbalance before busy buckets move too; 0 = never


@attrs.frozen
class Scope:
    """The numbers and names one conduit's objects live under (several conduits may coexist)."""

    bridge: str = "bridge0"
    table: int = 4096
    rule_priority: int = 30000
    mode: EgressMode = EgressMode.RESILIENT
    resilience: Resilience = Resilience()

    @property
    def nexthop_ids(self) -> range:
        """Our nexthop id range: 4096 ids per table, so conduits with their own tables never meet.

        The first two are the groups (IPv4, IPv6); members use the rest.
        """
        base = (self.table % 65536) * 4096 + 1
        return range(base, base + 4096)

    def group_id(self, family: Family) -> int:
        return self.nexthop_ids[0 if family is Family.V4 else 1]

    @property
    def member_ids(self) -> range:
        return self.nexthop_ids[2:]


# Metrics of our two default routes: ECMP first, the guard behind it.
ECMP_METRIC = 100
GUARD_METRIC = 4294967295


# -- what is wanted ------------------------------------------------------------------------------


@attrs.frozen
class Desired:
    """The managed objects as the rest of the proxy wants them."""

    mac: str
    addresses: frozenset[IPInterface] = frozenset()  # on the bridge: at most one per family
    ports: frozenset[str] = frozenset()
    nexthops: frozenset[IPAddress] = frozenset()  # the load-balancers, both families
    vips: frozenset[IPNetwork] = frozenset()
    # Ports to take off the bridge if they are still on it: the ones the control plane said
    # it no longer wants. Ports nobody mentioned are left alone: after a restart they belong to
    # peers (targets) the new instance has not heard from yet.
    release_ports: frozenset[str] = frozenset()


def stable_mac(*parts: str) -> str:
    """A locally administered unicast MAC derived from `parts` (node, trench, conduit).

    A restarted proxy keeps its MAC, so targets' neighbour entries stay right (Meridio users saw
    targets black-holed for about a minute after a restart because the MAC changed).
    """
    digest = bytearray(hashlib.sha256("\0".join(parts).encode()).digest()[:6])
    digest[0] = (digest[0] | 0x02) & 0xFE  # locally administered, not multicast
    return ":".join(f"{byte:02x}" for byte in digest)


# -- what is there -------------------------------------------------------------------------------


@attrs.frozen
class Link:
    name: str
    index: int
    kind: str  # "bridge", "veth", ... ("" when the kernel does not say)
    mac: str
    up: bool
    master: int | None = None


@attrs.frozen
class Rule:
    family: Family
    source: IPNetwork
    table: int
    priority: int


@attrs.frozen
class Route:
    """A default route in the proxy's table (the only routes it manages)."""

    family: Family
    metric: int
    type: RouteType = RouteType.UNICAST
    nexthop_id: int | None = None  # resilient mode
    gateways: frozenset[IPAddress] = frozenset()  # legacy multipath mode (via the bridge)


@attrs.frozen
class Nexthop:
    """A nexthop object: a member (gateway via the bridge) or a group of members."""

    id: int
    family: Family
    gateway: IPAddress | None = None
    device: str | None = None  # the member's output device (the bridge)
    members: tuple[int, ...] = ()  # a group when non-empty (weights are all 1)
    resilience: Resilience | None = None

    @property
    def is_group(self) -> bool:
        return bool(self.members)


@attrs.frozen
class Observed:
    """The kernel as dumped: every link, and the managed kinds of everything else."""

    links: Mapping[str, Link] = attrs.field(factory=dict)
    bridge_addresses: frozenset[IPInterface] = frozenset()
    rules: frozenset[Rule] = frozenset()  # towards our table, at any priority
    routes: frozenset[Route] = frozenset()  # default routes of our table
    nexthops: Mapping[int, Nexthop] = attrs.field(factory=dict)  # in our id range
