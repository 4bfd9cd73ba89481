"""A model of the kernel's semantics for the managed objects, to test the planner without one.

It applies planned operations to an `Observed` state and refuses what the kernel would refuse
(a route to a missing group, a group of missing members, an address on a missing device, a
duplicate rule), and reproduces the side effects the planner must respect: deleting a member
removes it from its groups, a group left empty disappears, and routes through a vanished group
go with it.
"""

from __future__ import annotations

import attrs

from proxy.kernel.model import Link, Nexthop, Observed, Route
from proxy.kernel.plan import (
    AddAddress,
    AddRule,
    Announce,
    CreateBridge,
    DelAddress,
    DelNexthop,
    DelRoute,
    DelRule,
    Op,
    PutNexthop,
    PutRoute,
    SetLink,
)


class KernelRefused(Exception):
    pass


def apply(state: Observed, op: Op, bridge: str) -> Observed:
    links = dict(state.links)
    nexthops = dict(state.nexthops)
    routes = set(state.routes)
    rules = set(state.rules)
    addresses = set(state.bridge_addresses)
    match op:
        case CreateBridge(name=name, mac=mac):
            if name in links:
                raise KernelRefused(f"EEXIST link {name}")
            index = max((link.index for link in links.values()), default=1) + 1
            links[name] = Link(name, index, "bridge", mac, up=True)
        case SetLink(name=name):
            link = _link(links, name)
            if op.up is not None:
                link = attrs.evolve(link, up=op.up)
            if op.mac is not None:
                link = attrs.evolve(link, mac=op.mac)
            if op.master is not None:
                link = attrs.evolve(link, master=_link(links, op.master).index)
            if op.release:
                link = attrs.evolve(link, master=None)
            links[name] = link
        case AddAddress(device=device, address=address):
            _require_bridge(links, device, bridge)
            if address in addresses:
                raise KernelRefused(f"EEXIST address {address}")
            addresses.add(address)
        case DelAddress(device=device, address=address):
            _require_bridge(links, device, bridge)
            addresses.discard(address)
        case Announce(device=device):
            _require_bridge(links, device, bridge)
        case PutNexthop(nexthop=nexthop):
            _check_nexthop(nexthop, nexthops, links)
            nexthops[nexthop.id] = nexthop
        case DelNexthop(id=id):
            if id not in nexthops:
                raise KernelRefused(f"ENOENT nexthop {id}")
            _delete_nexthop(id, nexthops, routes)
        case PutRoute(route=route):
            if route.nexthop_id is not None:
                group = nexthops.get(route.nexthop_id)
                if group is None or group.family is not route.family:
                    raise KernelRefused(f"route to missing nexthop {route.nexthop_id}")
            for gateway in route.gateways:
                _require_bridge(links, bridge, bridge)
                assert gateway.version == (4 if route.family.name == "V4" else 6)
            routes = {r for r in routes if (r.family, r.metric) != (route.family, route.metric)}
            routes.add(route)
        case DelRoute(route=route):
            if route not in routes:
                raise KernelRefused(f"ESRCH route {route}")
            routes.discard(route)
        case AddRule(rule=rule):
            if rule in rules:
                raise KernelRefused(f"EEXIST rule {rule}")
            rules.add(rule)
        case DelRule(rule=rule):
            if rule not in rules:
                raise KernelRefused(f"ENOENT rule {rule}")
            rules.discard(rule)
    return Observed(links, frozenset(addresses), frozenset(rules), frozenset(routes), nexthops)


def _link(links: dict[str, Link], name: str) -> Link:
    if name not in links:
        raise KernelRefused(f"ENODEV {name}")
    return links[name]


def _require_bridge(links: dict[str, Link], device: str, bridge: str) -> None:
    assert device == bridge, "the planner only puts addresses on the bridge"
    _link(links, device)


def _check_nexthop(nexthop: Nexthop, nexthops: dict[int, Nexthop], links: dict[str, Link]) -> None:
    old = nexthops.get(nexthop.id)
    if nexthop.is_group:
        if old is not None and (not old.is_group or _buckets(old) != _buckets(nexthop)):
            raise KernelRefused("EINVAL: cannot change a group's type or bucket count")
        for member in nexthop.members:
            found = nexthops.get(member)
            if found is None or found.is_group or found.family is not nexthop.family:
                raise KernelRefused(f"group {nexthop.id}: bad member {member}")
    else:
        assert nexthop.device is not None
        _link(links, nexthop.device)
        if old is not None and old.is_group:
            raise KernelRefused("cannot replace a group with a member")


def _buckets(group: Nexthop) -> int | None:
    return group.resilience.buckets if group.resilience is not None else None


def _delete_nexthop(id: int, nexthops: dict[int, Nexthop], routes: set[Route]) -> None:
    nexthops.pop(id)
    for other in list(nexthops.values()):
        if id in other.members:
            members = tuple(m for m in other.members if m != id)
            if members:
                nexthops[other.id] = attrs.evolve(other, members=members)
            else:
                _delete_nexthop(other.id, nexthops, routes)
    for route in list(routes):
        if route.nexthop_id == id:
            routes.discard(route)
