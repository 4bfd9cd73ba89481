"""Read the managed objects out of the kernel into an `Observed` (runs on the netlink worker)."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from pyroute2 import IPRoute

from proxy.kernel import nexthop
from proxy.kernel.model import (
    FAMILIES,
    Family,
    IPInterface,
    Link,
    Nexthop,
    Observed,
    Resilience,
    Route,
    RouteType,
    Rule,
    Scope,
)

IFF_UP = 0x1


def observe(ipr: IPRoute, scope: Scope) -> Observed:
    links = {link.name: link for link in dump_links(ipr)}
    bridge = links.get(scope.bridge)
    names = {link.index: link.name for link in links.values()}
    return Observed(
        links=links,
        bridge_addresses=dump_addresses(ipr, bridge.index) if bridge else frozenset(),
        rules=dump_rules(ipr, scope.table),
        routes=_default_routes(ipr, scope.table),
        nexthops=_our_nexthops(ipr, scope, names),
    )


def dump_links(ipr: IPRoute) -> list[Link]:
    return [link_from_message(message) for message in ipr.link("dump")]


def link_from_message(message: Any) -> Link:
    info = message.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
    return Link(
        name=message.get_attr("IFLA_IFNAME"),
        index=message["index"],
        kind=kind,
        mac=message.get_attr("IFLA_ADDRESS") or "",
        up=bool(message["flags"] & IFF_UP),
        master=message.get_attr("IFLA_MASTER") or None,
    )


def dump_addresses(ipr: IPRoute, index: int) -> frozenset[IPInterface]:
    """Global addresses of a link (the kernel's IPv6 link-local address is not ours)."""
    found = set()
    for message in ipr.addr("dump"):
        if message["index"] != index:
            continue
        address = ipaddress.ip_interface(
            f"{message.get_attr('IFA_ADDRESS')}/{message['prefixlen']}"
        )
        if not (address.version == 6 and address.ip.is_link_local):
            found.add(address)
    return frozenset(found)


def dump_rules(ipr: IPRoute, table: int) -> frozenset[Rule]:
    """Every rule towards `table` (ours, whatever its priority)."""
    found = set()
    for message in ipr.rule("dump"):
        if message["family"] not in (socket.AF_INET, socket.AF_INET6):
            continue
        if (message.get_attr("FRA_TABLE") or message["table"]) != table:
            continue
        family = Family(message["family"])
        source = message.get_attr("FRA_SRC") or ("0.0.0.0" if family is Family.V4 else "::")
        found.add(
            Rule(
                family,
                ipaddress.ip_network(f"{source}/{message['src_len']}", strict=False),
                table,
                message.get_attr("FRA_PRIORITY") or 0,
            )
        )
    return frozenset(found)


def _default_routes(ipr: IPRoute, table: int) -> frozenset[Route]:
    found = set()
    for family in FAMILIES:
        for route in nexthop.dump_routes(ipr, table=table, family=family):
            if route.dst_len != 0:
                continue  # only default routes are ours; others are left alone
            hops = [hop.gateway for hop in route.multipath if hop.gateway]
            if not hops and route.gateway:
                hops = [route.gateway]  # a one-gateway "multipath" route is a plain route
            found.add(
                Route(
                    family,
                    route.priority,
                    _route_type(route.type),
                    nexthop_id=route.nhid,
                    gateways=frozenset(ipaddress.ip_address(g) for g in hops),
                )
            )
    return frozenset(found)


def _route_type(kind: int) -> RouteType:
    try:
        return RouteType(kind)
    except ValueError:
        return RouteType.UNICAST  # other types (local, throw, ...) are never ours: seen as stale


def _our_nexthops(ipr: IPRoute, scope: Scope, names: dict[int, str]) -> dict[int, Nexthop]:
    records = {record.id: record for record in nexthop.dump_nexthops(ipr)}
    found = {}
    for record in records.values():
        if record.id not in scope.nexthop_ids:
            continue
        members = tuple(sorted(member.id for member in record.group))
        family = record.family
        if record.is_group and members and members[0] in records:
            family = records[members[0]].family  # the kernel reports groups as AF_UNSPEC
        resilience = None
        if record.resilient is not None:
            resilience = Resilience(
                record.resilient.buckets,
                record.resilient.idle_timer,
                record.resilient.unbalanced_timer,
            )
        found[record.id] = Nexthop(
            record.id,
            Family(family) if family in (Family.V4, Family.V6) else Family.V4,
            gateway=ipaddress.ip_address(record.gateway) if record.gateway else None,
            device=names.get(record.oif) if record.oif else None,
            members=members,
            resilience=resilience,
        )
    return found
