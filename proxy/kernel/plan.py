"""The reconciler's decision: which kernel operations turn what is there into what is wanted.

`plan(desired, observed, scope)` is a pure function. Applying its operations in order to the
observed state reaches the desired state, and planning again from there yields nothing: a
restart with unchanged desired state writes nothing (adoption, not flush). Operations are ordered
so that traffic keeps a path at every step:

1. the guard routes first, so the table never lets VIP traffic fall through to the main table;
2. the bridge, its addresses (old one out, new one in: deleting an IPv4 primary would take
   secondaries with it), and a gratuitous ARP / unsolicited NA for each new address;
3. ports, then egress: new members, the group replaced in place (a resilient group keeps the
   buckets of surviving members, so their flows stay), then the route; removals last;
4. VIP rules: new ones, then stale ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from proxy.kernel.model import (
    ECMP_METRIC,
    FAMILIES,
    GUARD_METRIC,
    Desired,
    EgressMode,
    Family,
    IPAddress,
    IPInterface,
    Nexthop,
    Observed,
    Route,
    RouteType,
    Rule,
    Scope,
)


@attrs.frozen
class CreateBridge:
    name: str
    mac: str  # created up, with this address


@attrs.frozen
class SetLink:
    name: str
    up: bool | None = None
    mac: str | None = None
    master: str | None = None  # enslave to this bridge
    release: bool = False  # remove from its bridge


@attrs.frozen
class AddAddress:
    device: str
    address: IPInterface


@attrs.frozen
class DelAddress:
    device: str
    address: IPInterface


@attrs.frozen
class Announce:
    """Tell the segment who has this address now (gratuitous ARP / unsolicited NA)."""

    device: str
    address: IPInterface


@attrs.frozen
class PutNexthop:
    nexthop: Nexthop  # created, or replaced in place


@attrs.frozen
class DelNexthop:
    id: int


@attrs.frozen
class PutRoute:
    route: Route
    table: int


@attrs.frozen
class DelRoute:
    route: Route
    table: int


@attrs.frozen
class AddRule:
    rule: Rule


@attrs.frozen
class DelRule:
    rule: Rule


Op = (
    CreateBridge
    | SetLink
    | AddAddress
    | DelAddress
    | Announce
    | PutNexthop
    | DelNexthop
    | PutRoute
    | DelRoute
    | AddRule
    | DelRule
)

# Operations that change routing (what a restart with unchanged desired state must not emit).
ROUTING_OPS = (PutNexthop, DelNexthop, PutRoute, DelRoute, AddRule, DelRule)


class Conflict(Exception):
    """Something the proxy would manage is there but is not what it can adopt."""


def plan(desired: Desired, observed: Observed, scope: Scope) -> list[Op]:
    ops: list[Op] = []
    ops += _guards(observed, scope)
    ops += _bridge(desired, observed, scope)
    ops += _ports(desired, observed, scope)
    ops += _egress(desired, observed, scope)
    ops += _rules(desired, observed, scope)
    return ops


def guard_route(family: Family) -> Route:
    return Route(family, GUARD_METRIC, RouteType.UNREACHABLE)


def _guards(observed: Observed, scope: Scope) -> list[Op]:
    return [
        PutRoute(guard_route(f), scope.table)
        for f in FAMILIES
        if guard_route(f) not in observed.routes
    ]


def _bridge(desired: Desired, observed: Observed, scope: Scope) -> list[Op]:
    ops: list[Op] = []
    link = observed.links.get(scope.bridge)
    mac_changed = False
    if link is None:
        ops.append(CreateBridge(scope.bridge, desired.mac))
    elif link.kind != "bridge":
        raise Conflict(f"{scope.bridge} exists but is a {link.kind or 'non-bridge'} link")
    elif not link.up or link.mac != desired.mac:
        mac_changed = link.mac != desired.mac
        ops.append(
            SetLink(
                scope.bridge, up=None if link.up else True, mac=desired.mac if mac_changed else None
            )
        )
    have = observed.bridge_addresses if link is not None else frozenset()
    ops += [DelAddress(scope.bridge, a) for a in _sorted(have - desired.addresses)]
    added = _sorted(desired.addresses - have)
    ops += [AddAddress(scope.bridge, a) for a in added]
    announced = _sorted(desired.addresses) if mac_changed else added
    ops += [Announce(scope.bridge, a) for a in announced]
    return ops


def _ports(desired: Desired, observed: Observed, scope: Scope) -> list[Op]:
    bridge = observed.links.get(scope.bridge)
    bridge_index = bridge.index if bridge is not None else None
    ops: list[Op] = []
    for name in sorted(desired.ports):
        link = observed.links.get(name)
        if link is not None and (bridge_index is None or link.master != bridge_index):
            ops.append(SetLink(name, master=scope.bridge))
    if bridge_index is not None:
        ops += [
            SetLink(name, release=True)
            for name in sorted(desired.release_ports - desired.ports)
            if name in observed.links and observed.links[name].master == bridge_index
        ]
    return ops


def _egress(desired: Desired, observed: Observed, scope: Scope) -> list[Op]:
    first: list[Op] = []  # new members, groups, routes
    last: list[Op] = []  # what goes away, once its replacement is in place
    kept_ids: set[int] = set()
    taken = set(observed.nexthops)  # ids in use, including the ones about to be created
    for family in FAMILIES:
        gateways = {g for g in desired.nexthops if Family.of(g) is family}
        if scope.mode is EgressMode.RESILIENT:
            ids = _members(gateways, family, observed, scope, taken, first)
            kept_ids |= ids
            group = Nexthop(
                scope.group_id(family),
                family,
                members=tuple(sorted(ids)),
                resilience=scope.resilience,
            )
            target = Route(family, ECMP_METRIC, nexthop_id=group.id) if ids else None
            if ids:
                kept_ids.add(group.id)
                existing = observed.nexthops.get(group.id)
                if existing is not None and not _replaceable(existing, group):
                    # The kernel keeps a group's type and bucket count for life: make it anew
                    # (its routes go with it; the guard covers the moment).
                    first.append(DelNexthop(group.id))
                    existing = None
                    observed = attrs.evolve(observed, routes=_without_group(observed, group.id))
                if existing != group:
                    first.append(PutNexthop(group))
        else:
            target = Route(family, ECMP_METRIC, gateways=frozenset(gateways)) if gateways else None
        if target is not None and target not in observed.routes:
            first.append(PutRoute(target, scope.table))
        # A route at the metric of the target or the guard is replaced by it, not deleted.
        kept_metrics = {guard_route(family).metric} | ({target.metric} if target else set())
        stale = [r for r in observed.routes if r.family is family and r.metric not in kept_metrics]
        last += [DelRoute(r, scope.table) for r in sorted(stale, key=lambda r: r.metric)]
    # Nexthops nobody wants any more: groups before their members.
    gone = [nh for nh in observed.nexthops.values() if nh.id not in kept_ids]
    last += [DelNexthop(nh.id) for nh in sorted(gone, key=lambda nh: (not nh.is_group, nh.id))]
    return first + last


def _replaceable(existing: Nexthop, wanted: Nexthop) -> bool:
    """Whether the kernel can replace `existing` by `wanted` in place."""
    if not existing.is_group:
        return False
    if (existing.resilience is None) != (wanted.resilience is None):
        return False
    return existing.resilience is None or (
        wanted.resilience is not None and existing.resilience.buckets == wanted.resilience.buckets
    )


def _without_group(observed: Observed, group_id: int) -> frozenset[Route]:
    return frozenset(r for r in observed.routes if r.nexthop_id != group_id)


def _members(
    gateways: set[IPAddress],
    family: Family,
    observed: Observed,
    scope: Scope,
    taken: set[int],
    ops: list[Op],
) -> set[int]:
    """Ids of the members for `gateways`: the ones already there are kept (no write), new ones
    get the lowest ids not in `taken` (which grows). Appends the PutNexthop operations for the
    new ones."""
    existing: dict[IPAddress, int] = {}
    for nh in sorted(observed.nexthops.values(), key=lambda nh: nh.id):
        if (
            not nh.is_group
            and nh.id in scope.member_ids
            and nh.family is family
            and nh.device == scope.bridge
            and nh.gateway in gateways
        ):
            existing.setdefault(nh.gateway, nh.id)
    free = (i for i in scope.member_ids if i not in taken)
    ids = set(existing.values())
    for gateway in _sorted(gateways - existing.keys()):
        new = Nexthop(next(free), family, gateway=gateway, device=scope.bridge)
        taken.add(new.id)
        ids.add(new.id)
        ops.append(PutNexthop(new))
    return ids


def _rules(desired: Desired, observed: Observed, scope: Scope) -> list[Op]:
    wanted = {Rule(Family.of(vip), vip, scope.table, scope.rule_priority) for vip in desired.vips}
    ops: list[Op] = [AddRule(r) for r in _sorted_rules(wanted - observed.rules)]
    ops += [DelRule(r) for r in _sorted_rules(observed.rules - wanted)]
    return ops


def _sorted(items: Iterable[IPAddress | IPInterface]) -> list:  # type: ignore[type-arg]
    return sorted(items, key=lambda item: (item.version, item))


def _sorted_rules(rules: Iterable[Rule]) -> list[Rule]:
    return sorted(
        rules, key=lambda r: (r.family, r.source.network_address, r.source.prefixlen, r.priority)
    )
