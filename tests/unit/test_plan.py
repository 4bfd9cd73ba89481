"""The reconciler's pure decision, checked against a model of the kernel (kernel_sim).

From any starting state the planned operations are accepted by the kernel model and reach the
desired state; planning again yields nothing; surviving load-balancers keep their nexthops.
"""

from __future__ import annotations

import ipaddress
from functools import reduce

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.kernel.model import (
    ECMP_METRIC,
    FAMILIES,
    Desired,
    EgressMode,
    Family,
    Link,
    Nexthop,
    Observed,
    Resilience,
    Route,
    RouteType,
    Rule,
    Scope,
    stable_mac,
)
from proxy.kernel.plan import (
    ROUTING_OPS,
    AddAddress,
    Announce,
    Conflict,
    CreateBridge,
    DelAddress,
    DelNexthop,
    Op,
    PutNexthop,
    PutRoute,
    guard_route,
    plan,
)
from tests.unit.kernel_sim import apply

BRIDGE = "bridge0"
PORTS = ("lb-a", "lb-b", "tg-a", "tg-b", "other")
MACS = ("02:00:00:00:00:01", "02:00:00:00:00:02")

gw4 = st.integers(1, 12).map(lambda i: ipaddress.ip_address(f"198.18.0.{i}"))
gw6 = st.integers(1, 12).map(lambda i: ipaddress.ip_address(f"2001:db8::{i:x}"))
gateways = st.frozensets(st.one_of(gw4, gw6), max_size=8)
iface4 = st.integers(1, 3).map(lambda i: ipaddress.ip_interface(f"198.18.{i}.1/24"))
iface6 = st.integers(1, 3).map(lambda i: ipaddress.ip_interface(f"2001:db8:{i}::1/64"))
vip = st.one_of(
    st.integers(1, 9).map(lambda i: ipaddress.ip_network(f"198.51.100.{i}/32")),
    st.just(ipaddress.ip_network("203.0.113.0/24")),
    st.integers(1, 9).map(lambda i: ipaddress.ip_network(f"2001:db8:ff::{i}/128")),
)
scopes = st.sampled_from(
    [
        Scope(),
        Scope(mode=EgressMode.MULTIPATH),
        Scope(table=77, rule_priority=100, resilience=Resilience(64, 1.0, 0.0)),
    ]
)


@st.composite
def desired_states(draw: st.DrawFn) -> Desired:
    addresses = {a for a in (draw(st.none() | iface4), draw(st.none() | iface6)) if a}
    return Desired(
        mac=draw(st.sampled_from(MACS)),
        addresses=frozenset(addresses),
        ports=draw(st.frozensets(st.sampled_from((*PORTS, "not-yet-there")))),
        nexthops=draw(gateways),
        vips=draw(st.frozensets(vip, max_size=6)),
        release_ports=draw(st.frozensets(st.sampled_from(PORTS))),
    )


@st.composite
def observed_states(draw: st.DrawFn, scope: Scope) -> Observed:
    """Kernel states a previous instance, a person or a crash could leave behind."""
    links = {"lo": Link("lo", 1, "", "00:00:00:00:00:00", up=True)}
    bridge_index = None
    if draw(st.booleans()):
        bridge_index = 2
        links[BRIDGE] = Link(BRIDGE, 2, "bridge", draw(st.sampled_from(MACS)), draw(st.booleans()))
    for offset, name in enumerate(draw(st.sets(st.sampled_from(PORTS)))):
        master = draw(st.sampled_from([None, bridge_index, 99]))
        links[name] = Link(name, 10 + offset, "veth", "02:aa:00:00:00:01", True, master)
    addresses: frozenset[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = frozenset()
    if bridge_index is not None:
        addresses = draw(st.frozensets(st.one_of(iface4, iface6), max_size=3))
    members: dict[int, Nexthop] = {}
    free_ids = list(scope.member_ids[:12])
    for gateway in draw(st.lists(st.one_of(gw4, gw6), max_size=6)):
        device = draw(st.sampled_from([BRIDGE, "lb-a"]))
        if device not in links:
            continue
        nh_id = free_ids.pop(draw(st.integers(0, len(free_ids) - 1)))
        members[nh_id] = Nexthop(nh_id, Family.of(gateway), gateway=gateway, device=device)
    nexthops = dict(members)
    routes: set[Route] = set()
    for family in FAMILIES:
        if draw(st.booleans()):
            routes.add(guard_route(family))
        same = sorted(i for i, nh in members.items() if nh.family is family)
        with_group: bool = draw(st.booleans())
        if same and with_group:
            chosen = tuple(draw(st.lists(st.sampled_from(same), min_size=1, unique=True)))
            resilience = draw(st.sampled_from([scope.resilience, Resilience(32, 2.0, 0.0), None]))
            group = Nexthop(
                scope.group_id(family), family, members=tuple(sorted(chosen)), resilience=resilience
            )
            nexthops[group.id] = group
            routes.add(Route(family, draw(st.sampled_from([ECMP_METRIC, 7])), nexthop_id=group.id))
        if draw(st.booleans()):
            legacy = draw(
                st.frozensets(gw4 if family is Family.V4 else gw6, min_size=1, max_size=3)
            )
            routes.add(Route(family, draw(st.sampled_from([ECMP_METRIC, 1024])), gateways=legacy))
        if draw(st.booleans()):
            routes.add(Route(family, 5, RouteType.PROHIBIT))
    rules = frozenset(
        Rule(Family.of(v), v, scope.table, draw(st.sampled_from([scope.rule_priority, 32765])))
        for v in draw(st.frozensets(vip, max_size=5))
    )
    return Observed(links, addresses, rules, frozenset(_unique_routes(routes)), nexthops)


def _unique_routes(routes: set[Route]) -> list[Route]:
    """The kernel keeps one route per (family, metric) in a table."""
    by_key: dict[tuple[Family, int], Route] = {}
    for route in sorted(routes, key=repr):
        by_key.setdefault((route.family, route.metric), route)
    return list(by_key.values())


def run(ops: list[Op], state: Observed) -> Observed:
    return reduce(lambda s, op: apply(s, op, BRIDGE), ops, state)


def assert_reached(desired: Desired, state: Observed, scope: Scope) -> None:
    bridge = state.links[BRIDGE]
    assert bridge.up and bridge.mac == desired.mac
    assert state.bridge_addresses == desired.addresses
    for name in desired.ports & state.links.keys():
        assert state.links[name].master == bridge.index
    enslaved = {n for n, link in state.links.items() if link.master == bridge.index}
    assert not enslaved & (desired.release_ports - desired.ports)
    for family in FAMILIES:
        wanted = {g for g in desired.nexthops if Family.of(g) is family}
        routes = {r for r in state.routes if r.family is family}
        ecmp = {r for r in routes if r != guard_route(family)}
        assert guard_route(family) in routes
        if not wanted:
            assert ecmp == set()
            continue
        [route] = ecmp
        if scope.mode is EgressMode.MULTIPATH:
            assert route.gateways == wanted
        else:
            assert route.nexthop_id is not None
            group = state.nexthops[route.nexthop_id]
            assert group.resilience == scope.resilience
            assert {state.nexthops[m].gateway for m in group.members} == wanted
            assert all(state.nexthops[m].device == BRIDGE for m in group.members)
    assert {r.source for r in state.rules} == desired.vips
    assert {(r.table, r.priority) for r in state.rules} <= {(scope.table, scope.rule_priority)}


@settings(max_examples=400, deadline=None)
@given(data=st.data(), scope=scopes, desired=desired_states())
def test_plan_reaches_desired_state_and_then_rests(
    data: st.DataObject, scope: Scope, desired: Desired
) -> None:
    observed = data.draw(observed_states(scope))
    state = run(plan(desired, observed, scope), observed)
    assert_reached(desired, state, scope)
    assert plan(desired, state, scope) == []


@settings(max_examples=200, deadline=None)
@given(data=st.data(), desired=desired_states())
def test_removing_a_load_balancer_keeps_the_others_members(
    data: st.DataObject, desired: Desired
) -> None:
    scope = Scope()
    state = run(plan(desired, Observed(), scope), Observed())
    if not desired.nexthops:
        return
    removed = data.draw(st.sampled_from(sorted(desired.nexthops, key=str)))
    before = {nh.gateway: nh.id for nh in state.nexthops.values() if not nh.is_group}
    smaller = Desired(
        desired.mac, desired.addresses, desired.ports, desired.nexthops - {removed}, desired.vips
    )
    ops = plan(smaller, state, scope)
    after_state = run(ops, state)
    after = {nh.gateway: nh.id for nh in after_state.nexthops.values() if not nh.is_group}
    assert after == {g: i for g, i in before.items() if g != removed}
    # The group is replaced in place (same id) before the member goes: no route is rewritten.
    family = Family.of(removed)
    if any(Family.of(g) is family for g in smaller.nexthops):
        rewritten = [op for op in ops if isinstance(op, PutRoute) and op.route.family is family]
        assert rewritten == []


def test_restart_with_the_same_desired_state_writes_nothing() -> None:
    scope = Scope()
    desired = Desired(
        mac=stable_mac("node-a", "trench-a", "conduit-a"),
        addresses=frozenset({ipaddress.ip_interface("198.18.1.1/24")}),
        ports=frozenset({"lb-a"}),
        nexthops=frozenset({ipaddress.ip_address("198.18.1.2")}),
        vips=frozenset({ipaddress.ip_network("198.51.100.1/32")}),
    )
    links = {"lb-a": Link("lb-a", 5, "veth", "02:aa:00:00:00:01", True)}
    state = run(plan(desired, Observed(links=links), scope), Observed(links=links))
    assert plan(desired, state, scope) == []
    assert not [op for op in plan(desired, state, scope) if isinstance(op, ROUTING_OPS)]


def test_guard_routes_come_first_and_new_addresses_are_announced() -> None:
    scope = Scope()
    address = ipaddress.ip_interface("198.18.1.1/24")
    ops = plan(Desired(mac=MACS[0], addresses=frozenset({address})), Observed(), scope)
    assert ops[:2] == [PutRoute(guard_route(f), scope.table) for f in FAMILIES]
    assert ops[2:5] == [
        CreateBridge(BRIDGE, MACS[0]),
        AddAddress(BRIDGE, address),
        Announce(BRIDGE, address),
    ]


def test_a_changed_address_replaces_the_old_one_old_first() -> None:
    scope = Scope()
    old, new = ipaddress.ip_interface("198.18.1.1/24"), ipaddress.ip_interface("198.18.1.9/24")
    observed = Observed(
        links={BRIDGE: Link(BRIDGE, 2, "bridge", MACS[0], True)},
        bridge_addresses=frozenset({old}),
        routes=frozenset(guard_route(f) for f in FAMILIES),
    )
    ops = plan(Desired(mac=MACS[0], addresses=frozenset({new})), observed, scope)
    assert ops == [DelAddress(BRIDGE, old), AddAddress(BRIDGE, new), Announce(BRIDGE, new)]


def test_last_load_balancer_gone_leaves_only_the_guard() -> None:
    scope = Scope()
    gateway = ipaddress.ip_address("198.18.1.2")
    start = run(
        plan(Desired(mac=MACS[0], nexthops=frozenset({gateway})), Observed(), scope), Observed()
    )
    ops = plan(Desired(mac=MACS[0]), start, scope)
    assert [type(op) for op in ops] == [type(op) for op in ops if not isinstance(op, PutNexthop)]
    end = run(ops, start)
    assert end.routes == frozenset(guard_route(f) for f in FAMILIES)
    assert end.nexthops == {}
    assert any(isinstance(op, DelNexthop) for op in ops)


def test_a_non_bridge_link_named_like_the_bridge_is_a_conflict() -> None:
    observed = Observed(links={BRIDGE: Link(BRIDGE, 2, "veth", MACS[0], True)})
    with pytest.raises(Conflict, match="bridge0 exists but is a veth"):
        plan(Desired(mac=MACS[0]), observed, Scope())


def test_stable_mac_is_stable_local_and_unicast() -> None:
    mac = stable_mac("node-a", "trench-a", "conduit-a")
    assert mac == stable_mac("node-a", "trench-a", "conduit-a")
    assert mac != stable_mac("node-b", "trench-a", "conduit-a")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
