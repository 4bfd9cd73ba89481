"""The lab IPAM's allocation logic: the pure carving functions, then the allocator over an
in-memory SQLite store (no sockets, no files)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.lab.ipam import Exhausted, FamilyNotConfigured, Ipam, IpamSettings, UnknownTrench
from proxy.lab.ipam_alloc import (
    LayoutError,
    Network,
    address_at,
    first_free_offset,
    first_free_subnet,
    make_layout,
)
from proxy.lab.ipam_store import ChildKey, IpamStore

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network


# -- layout ----------------------------------------------------------------------------------------


def test_default_layout_is_accepted() -> None:
    layout = make_layout(V4("198.18.0.0/16"), 20, 24)
    assert (layout.family, layout.conduit_length, layout.node_length) == (4, 20, 24)
    assert make_layout(V6("2001:db8:100::/48"), 56, 64).family == 6


@pytest.mark.parametrize(
    ("prefix", "conduit", "node", "reason"),
    [
        (V4("198.18.0.0/16"), 15, 24, "conduit prefix length /15 does not fit"),
        (V4("198.18.0.0/16"), 20, 19, "node prefix length /19 must be from /20"),
        (V4("198.18.0.0/16"), 20, 31, "to /30"),
        (V6("2001:db8::/48"), 56, 127, "to /126"),
    ],
)
def test_impossible_layouts_are_refused(
    prefix: Network, conduit: int, node: int, reason: str
) -> None:
    with pytest.raises(LayoutError, match=reason):
        make_layout(prefix, conduit, node)


def test_settings_refuse_two_prefixes_of_a_family() -> None:
    settings = IpamSettings(prefixes=(V4("198.18.0.0/16"), V4("198.19.0.0/16")))
    with pytest.raises(LayoutError, match="more than one IPv4 prefix"):
        settings.layouts()


# -- carving ---------------------------------------------------------------------------------------


def test_first_free_subnet_fills_gaps_lowest_first() -> None:
    parent = V4("198.18.0.0/16")
    used = [V4("198.18.0.0/20"), V4("198.18.32.0/20")]
    assert first_free_subnet(parent, 20, used) == V4("198.18.16.0/20")
    used.append(V4("198.18.16.0/20"))
    assert first_free_subnet(parent, 20, used) == V4("198.18.48.0/20")


def test_first_free_subnet_ignores_what_is_not_its_own() -> None:
    parent = V4("198.18.0.0/23")
    foreign: list[Network] = [V4("198.19.0.0/24"), V6("::/120"), V4("198.18.0.0/25")]
    assert first_free_subnet(parent, 24, foreign) == V4("198.18.0.0/24")


def test_first_free_subnet_is_none_when_full() -> None:
    parent = V6("2001:db8:100::/62")
    used = list(parent.subnets(new_prefix=64))
    assert first_free_subnet(parent, 64, used) is None
    assert first_free_subnet(parent, 62, []) == parent  # the parent itself, once


def test_small_ipv6_offsets_stay_ipv6() -> None:
    # An integer below 2**32 must not turn into an IPv4 address.
    node = V6("::/120")
    assert address_at(node, 1) == ipaddress.IPv6Address("::1")
    assert first_free_subnet(V6("::/96"), 120, []) == V6("::/120")


def test_first_free_offset_skips_first_and_last() -> None:
    node = V4("198.18.0.0/30")  # .0 network, .1 .2 usable, .3 broadcast
    assert first_free_offset(node, []) == 1
    assert first_free_offset(node, [1]) == 2
    assert first_free_offset(node, [1, 2]) is None


def test_address_at_refuses_offsets_outside() -> None:
    with pytest.raises(ValueError, match="outside"):
        address_at(V4("198.18.0.0/30"), 4)


# -- properties of the pure allocation -------------------------------------------------------------

nodes = st.one_of(
    st.integers(min_value=24, max_value=30).map(lambda length: V4(f"198.18.1.0/{length}", False)),
    st.integers(min_value=120, max_value=126).map(
        lambda length: V6(f"2001:db8:100::/{length}", False)
    ),
)
# (allocate?, child index): a script of allocations and releases of 40 possible children
operations = st.lists(st.tuples(st.booleans(), st.integers(0, 39)), max_size=200)


@given(node=nodes, script=operations)
@settings(max_examples=300)
def test_allocations_never_collide_and_stay_usable(
    node: Network, script: list[tuple[bool, int]]
) -> None:
    held: dict[int, int] = {}  # child -> offset
    for allocate, child in script:
        if not allocate:
            released = held.pop(child, None)
            if released is not None:
                # the next new child gets the lowest free offset: the released one if lower
                expected = first_free_offset(node, held.values())
                assert expected is not None and expected <= released
            continue
        if child in held:
            continue
        offset = first_free_offset(node, held.values())
        if offset is None:
            assert len(held) == node.num_addresses - 2  # full, and only then
            continue
        address = address_at(node, offset)
        assert address in node
        assert address not in (node.network_address, node.broadcast_address)
        assert offset not in held.values()
        assert offset == min(set(range(1, node.num_addresses - 1)) - set(held.values()))
        held[child] = offset


# -- the allocator over a store --------------------------------------------------------------------

TRENCH = "trench-a"


@contextmanager
def tiny_ipam(
    now: list[float], prefix: str = "198.18.0.0/26", conduit: int = 27, node: int = 29
) -> Iterator[Ipam]:
    """By default IPv4 198.18.0.0/26 in /27 conduits (2) of /29 nodes (4 each, 6 addresses
    per node); the clock is `now[0]`."""
    store = IpamStore.open(":memory:")
    layout = make_layout(V4(prefix), conduit, node)
    try:
        yield Ipam(store, TRENCH, {4: layout}, now=lambda: now[0])
    finally:
        store.close()


def key(conduit: str, node: str, name: str, family: int = 4) -> ChildKey:
    return ChildKey(TRENCH, conduit, node, family, name)  # type: ignore[arg-type]


# In 198.18.0.0/28: 3 conduits for 2 /29 conduit prefixes, 3 nodes for the 2 /30 node
# prefixes of a conduit, 3 children for the 2 addresses of a node: every exhaustion happens.
children = st.tuples(st.sampled_from("abc"), st.sampled_from("xyz"), st.integers(0, 2))
store_script = st.lists(st.tuples(st.booleans(), children), max_size=120)


@given(script=store_script)
@settings(max_examples=150, deadline=None)
def test_allocator_invariants(script: list[tuple[bool, tuple[str, str, int]]]) -> None:
    now = [0.0]
    with tiny_ipam(now, "198.18.0.0/28", 29, 30) as ipam:
        held: dict[ChildKey, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        node_prefixes: dict[tuple[str, str], Network] = {}
        for allocate, (conduit, node, index) in script:
            now[0] += 1
            child = key(conduit, node, f"child-{index}")
            if not allocate:
                assert ipam.release(child) == held.pop(child, None)
                continue
            try:
                allocation = ipam.allocate(child)
            except Exhausted:
                assert child not in held
                conduits = {c for c, _ in node_prefixes}
                nodes_in_conduit = [n for c, n in node_prefixes if c == conduit]
                if (conduit, node) in node_prefixes:  # the node is full
                    assert sum((k.conduit, k.node) == (conduit, node) for k in held) == 2
                elif conduit in conduits:  # the conduit has no node prefix left
                    assert len(nodes_in_conduit) == 2
                else:  # no conduit prefix left
                    assert len(conduits) == 2
                continue
            if child in held:
                assert not allocation.created
                assert allocation.address == held[child]  # idempotent
            held[child] = allocation.address
            prefix = node_prefixes.setdefault((conduit, node), allocation.node_prefix)
            assert allocation.node_prefix == prefix  # a node keeps its prefix
            assert allocation.prefix_length == 30
            assert allocation.address in prefix
            assert allocation.address not in (prefix.network_address, prefix.broadcast_address)
        assert len(set(held.values())) == len(held)  # no collisions, anywhere
        prefixes = list(node_prefixes.values())
        assert all(p.subnet_of(V4("198.18.0.0/28")) for p in prefixes)  # type: ignore[arg-type]
        assert all(not a.overlaps(b) for i, a in enumerate(prefixes) for b in prefixes[i + 1 :])
        assert {r.key: r.address for r in ipam.store.children()} == held


def test_allocate_refreshes_the_record() -> None:
    now = [100.0]
    with tiny_ipam(now) as ipam:
        first = ipam.allocate(key("a", "w", "bridge"))
        now[0] = 200.0
        again = ipam.allocate(key("a", "w", "bridge"))
        assert (first.created, again.created, again.address) == (True, False, first.address)
        assert [record.updated_at for record in ipam.store.children()] == [200.0]


def test_release_then_allocate_reuses_the_lowest_address() -> None:
    with tiny_ipam([0.0]) as ipam:
        addresses = [ipam.allocate(key("a", "w", f"c{i}")).address for i in range(3)]
        assert [str(a) for a in addresses] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
        assert ipam.release(key("a", "w", "c1")) == addresses[1]
        assert ipam.allocate(key("a", "w", "new")).address == addresses[1]


def test_the_wrong_trench_and_a_missing_family_are_refused() -> None:
    with tiny_ipam([0.0]) as ipam:
        with pytest.raises(UnknownTrench, match="trench other not found"):
            ipam.allocate(ChildKey("other", "a", "w", 4, "c"))
        with pytest.raises(FamilyNotConfigured, match="no IPv6 prefix"):
            ipam.allocate(key("a", "w", "c", family=6))
        assert ipam.release(ChildKey("other", "a", "w", 4, "c")) is None
