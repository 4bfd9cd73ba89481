"""proxy.kernel.nexthop against the real kernel, cross-checked with iproute2's JSON output.

Each test gets a throw-away network namespace `mp-nh-<random>` holding a veth pair (this kernel
has no dummy) with 198.18.0.1/24 and 2001:db8:0:1::1/64 (nodad) on `nh0`, and a worker thread
that entered the namespace with setns and owns one IPRoute, the way the proxy's netlink worker
does. The namespace is deleted whatever happens.
"""

from __future__ import annotations

import errno
import functools
import json
import secrets
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from ipaddress import ip_network
from typing import Any

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netns import setns

from proxy.kernel import nexthop as nh
from proxy.kernel.errors import (
    Exists,
    InvalidArgument,
    KernelError,
    NotFound,
    PermissionDenied,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(60),
]

TABLE = 4096
V4, V6 = socket.AF_INET, socket.AF_INET6
GUARD_METRIC = 2**32 - 1
BOOT = nh.RTPROT_BOOT
PROTOCOL_NAMES = {0: "unspec", nh.RTPROT_BOOT: "boot"}
DEFAULT_V4, DEFAULT_V6 = ip_network("0.0.0.0/0"), ip_network("::/0")


class Kernel:
    """A worker thread inside the namespace that owns one IPRoute."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._pool = ThreadPoolExecutor(
            1, thread_name_prefix=netns, initializer=functools.partial(setns, netns, flags=0)
        )
        self.ipr = self._pool.submit(IPRoute).result()
        self.nh0 = self.ip("link", "show", "nh0")[0]["ifindex"]

    def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(ipr, *args, **kwargs) on the worker thread."""
        return self._pool.submit(fn, self.ipr, *args, **kwargs).result()

    def ip(self, *args: str) -> Any:
        out = subprocess.run(
            ["ip", "-n", self.netns, "-j", *args], check=True, capture_output=True, text=True
        ).stdout
        return json.loads(out) if out.strip() else []

    def close(self) -> None:
        try:
            self._pool.submit(self.ipr.close).result()
        finally:
            self._pool.shutdown(wait=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    name = f"mp-nh-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", name, "link", "add", "nh0", "type", "veth", "peer", "name", "nh1")
        sh("ip", "-n", name, "link", "set", "nh0", "up")
        sh("ip", "-n", name, "link", "set", "nh1", "up")
        sh("ip", "-n", name, "addr", "add", "198.18.0.1/24", "dev", "nh0")
        sh("ip", "-n", name, "addr", "add", "2001:db8:0:1::1/64", "dev", "nh0", "nodad")
        k = Kernel(name)
        try:
            yield k
        finally:
            k.close()
    finally:
        sh("ip", "netns", "del", name)


# --- comparing with iproute2 -------------------------------------------------------------------


def as_iproute2(n: nh.Nexthop, names: dict[int, str]) -> dict[str, Any]:
    """Our record in the shape of one entry of `ip -j nexthop show` (iproute2 6.1)."""
    out: dict[str, Any] = {"id": n.id, "protocol": PROTOCOL_NAMES[n.protocol]}
    if n.is_group:
        out["group"] = [(m.id, m.weight) for m in n.group]
        out["type"] = "resilient" if n.group_type is nh.GroupType.RESILIENT else "mpath"
        if n.resilient is not None:
            out["resilient"] = (
                n.resilient.buckets,
                n.resilient.idle_timer,
                n.resilient.unbalanced_timer,
            )
    elif n.blackhole:
        out["blackhole"] = True
    else:
        out["gateway"] = n.gateway
        out["dev"] = names[n.oif] if n.oif is not None else None
    return out


def from_iproute2(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"id": entry["id"], "protocol": entry.get("protocol", "unspec")}
    if "group" in entry:
        out["group"] = [(m["id"], m.get("weight", 1)) for m in entry["group"]]
        out["type"] = entry.get("type", "mpath")
        if "resilient_args" in entry:
            args = entry["resilient_args"]
            out["resilient"] = (args["buckets"], args["idle_timer"], args["unbalanced_timer"])
    elif "blackhole" in entry:
        out["blackhole"] = True
    else:
        out["gateway"] = entry.get("gateway")
        out["dev"] = entry.get("dev")
    return out


def assert_kernel_agrees(kernel: Kernel) -> list[nh.Nexthop]:
    ours: list[nh.Nexthop] = kernel(nh.dump_nexthops)
    names = {link["ifindex"]: link["ifname"] for link in kernel.ip("link", "show")}
    theirs = sorted(kernel.ip("nexthop", "show"), key=lambda e: e["id"])
    assert [as_iproute2(n, names) for n in ours] == [from_iproute2(e) for e in theirs]
    for n in ours:
        assert kernel(nh.get_nexthop, n.id) == n
    return ours


def iproute2_buckets(kernel: Kernel, group: int) -> list[tuple[int, int]]:
    entries = kernel.ip("nexthop", "bucket", "show", "id", str(group))
    return sorted((e["bucket"]["index"], e["bucket"]["nhid"]) for e in entries)


def our_buckets(kernel: Kernel, group: int) -> list[tuple[int, int]]:
    return [(b.index, b.nhid) for b in kernel(nh.dump_buckets, group)]


def add_members(kernel: Kernel) -> None:
    """v4 nexthops 1..4 via 198.18.0.2..5 and v6 nexthops 11, 12, all on nh0."""
    for i in range(1, 5):
        kernel(nh.add_nexthop, i, family=V4, gateway=f"198.18.0.{i + 1}", oif=kernel.nh0)
    for i in (11, 12):
        kernel(nh.add_nexthop, i, family=V6, gateway=f"2001:db8:0:1::{i}", oif=kernel.nh0)


RESILIENT = nh.ResilientParams(buckets=128, idle_timer=1, unbalanced_timer=30)


# --- tests -----------------------------------------------------------------------------------


def test_single_nexthops_create_replace_delete(kernel: Kernel) -> None:
    kernel(nh.add_nexthop, 1, family=V4, gateway="198.18.0.2", oif=kernel.nh0)
    kernel(nh.add_nexthop, 2, family=V6, gateway="2001:db8:0:1::2", oif=kernel.nh0)
    kernel(nh.add_nexthop, 3, family=V4, blackhole=True)
    common = {"protocol": BOOT, "oif": kernel.nh0, "scope": 253}  # scope link
    assert assert_kernel_agrees(kernel) == [
        nh.Nexthop(1, V4, gateway="198.18.0.2", **common),
        nh.Nexthop(2, V6, gateway="2001:db8:0:1::2", **common),
        nh.Nexthop(3, V4, protocol=BOOT, blackhole=True),
    ]

    kernel(nh.add_nexthop, 1, family=V4, gateway="198.18.0.9", oif=kernel.nh0, replace=True)
    kernel(nh.add_nexthop, 2, family=V6, gateway="2001:db8:0:1::9", oif=kernel.nh0, replace=True)
    ours = assert_kernel_agrees(kernel)
    assert [n.gateway for n in ours] == ["198.18.0.9", "2001:db8:0:1::9", None]

    for i in (1, 2, 3):
        kernel(nh.delete_nexthop, i)
    assert kernel(nh.dump_nexthops) == []
    assert kernel.ip("nexthop", "show") == []


def test_groups_and_buckets_match_iproute2(kernel: Kernel) -> None:
    add_members(kernel)
    kernel(nh.set_group, 100, [(1, 1), (2, 3), (3, 256)], resilient=None)
    kernel(nh.set_group, 110, [(11, 1), (12, 2)], resilient=None)
    kernel(nh.set_group, 200, [(i, 1) for i in range(1, 5)], resilient=RESILIENT)

    ours = {n.id: n for n in assert_kernel_agrees(kernel)}
    assert ours[100].group == ((1, 1), (2, 3), (3, 256))
    assert ours[100].group_type is nh.GroupType.MPATH and ours[100].resilient is None
    assert ours[100].family == socket.AF_UNSPEC  # the kernel reports groups without family
    assert ours[110].group == ((11, 1), (12, 2))
    assert ours[200].group_type is nh.GroupType.RESILIENT
    assert ours[200].resilient == RESILIENT  # 100 and 3000 clock_t on the wire, 1 s and 30 s

    buckets = our_buckets(kernel, 200)
    assert buckets == iproute2_buckets(kernel, 200)
    assert [index for index, _ in buckets] == list(range(128))
    for member in range(1, 5):  # equal weights, 128 buckets: 32 each
        assert sum(1 for _, n in buckets if n == member) == 32

    # 16-bit weights (kernel 6.12+): iproute2 6.1 cannot show them, our dump can.
    kernel(nh.set_group, 100, [(1, 1), (2, 300), (3, 65535)], resilient=None)
    assert kernel(nh.get_nexthop, 100).group == ((1, 1), (2, 300), (3, 65535))


def test_resilient_replace_in_place_keeps_route_and_surviving_buckets(kernel: Kernel) -> None:
    add_members(kernel)
    kernel(nh.set_group, 200, [(i, 1) for i in range(1, 5)], resilient=RESILIENT)
    kernel(nh.replace_route_nhid, family=V4, table=TABLE, dst="default", nhid=200)
    before = dict(our_buckets(kernel, 200))

    kernel(nh.set_group, 200, [(1, 1), (3, 1), (4, 1)], resilient=RESILIENT)  # member 2 leaves

    after = dict(our_buckets(kernel, 200))
    assert sorted(after.items()) == iproute2_buckets(kernel, 200)
    moved = {i for i in before if before[i] != after[i]}
    assert moved == {i for i in before if before[i] == 2}, "only member 2's buckets may move"
    assert len(moved) == 32
    assert set(after.values()) == {1, 3, 4}
    assert kernel(nh.get_nexthop, 200).group == ((1, 1), (3, 1), (4, 1))

    routes = kernel(nh.dump_routes, TABLE, V4)
    assert [(r.dst, r.nhid) for r in routes] == [(DEFAULT_V4, 200)]
    assert [(r["dst"], r["nhid"]) for r in kernel.ip("route", "show", "table", str(TABLE))] == [
        ("default", 200)
    ]

    # Changing the bucket count in place is refused, and says so.
    with pytest.raises(InvalidArgument, match="buckets"):
        kernel(nh.set_group, 200, [(1, 1)], resilient=nh.ResilientParams(64, 1, 30), replace=True)


def test_default_routes_by_nhid_in_both_families(kernel: Kernel) -> None:
    add_members(kernel)
    kernel(nh.set_group, 100, [(1, 1), (2, 1)], resilient=None)
    kernel(nh.set_group, 101, [(3, 1), (4, 1)], resilient=RESILIENT)
    kernel(nh.set_group, 110, [(11, 1), (12, 1)], resilient=None)
    kernel(nh.replace_route_nhid, family=V4, table=TABLE, dst="default", nhid=100)
    kernel(nh.replace_route_nhid, family=V6, table=TABLE, dst="default", nhid=110)

    assert kernel(nh.dump_routes, TABLE, V4) == [
        nh.Route(V4, TABLE, DEFAULT_V4, nh.RouteType.UNICAST, protocol=BOOT, nhid=100)
    ]
    assert kernel(nh.dump_routes, TABLE, V6) == [
        nh.Route(V6, TABLE, DEFAULT_V6, nh.RouteType.UNICAST, 1024, protocol=BOOT, nhid=110)
    ]
    shown = kernel.ip("-6", "route", "show", "table", str(TABLE))
    assert [(r["dst"], r["nhid"], r["metric"]) for r in shown] == [("default", 110, 1024)]

    # Replacing moves the one route to another group; nothing is added next to it.
    kernel(nh.replace_route_nhid, family=V4, table=TABLE, dst="default", nhid=101)
    routes = kernel(nh.dump_routes, TABLE, V4)
    assert [(r.dst, r.nhid) for r in routes] == [(DEFAULT_V4, 101)]

    # A prefix and a metric, too; and the main table is not mixed in.
    kernel(nh.replace_route_nhid, family=V4, table=TABLE, dst="198.18.7.0/24", nhid=100, priority=7)
    routes = kernel(nh.dump_routes, TABLE, V4)
    assert [(str(r.dst), r.dst_len, r.priority, r.nhid) for r in routes] == [
        ("0.0.0.0/0", 0, 0, 101),
        ("198.18.7.0/24", 24, 7, 100),
    ]
    assert kernel(nh.dump_routes, 254, V4) == [
        nh.Route(
            V4,
            254,
            ip_network("198.18.0.0/24"),
            protocol=2,  # kernel
            scope=253,  # link
            oif=kernel.nh0,
            prefsrc="198.18.0.1",
        )
    ]


def test_guard_and_legacy_multipath_routes(kernel: Kernel) -> None:
    for family in (V4, V6):
        kernel(
            nh.replace_route_type,
            family=family,
            table=TABLE,
            dst="default",
            type=nh.RouteType.UNREACHABLE,
            priority=GUARD_METRIC,
        )
    kernel(
        lambda ipr: ipr.route(
            "replace",
            dst="0.0.0.0/0",
            table=TABLE,
            priority=100,
            proto=BOOT,
            multipath=[
                {"gateway": "198.18.0.2", "oif": kernel.nh0},
                {"gateway": "198.18.0.3", "oif": kernel.nh0, "hops": 2},
            ],
        )
    )
    kernel(
        lambda ipr: ipr.route(
            "replace",
            family=V6,
            dst="::/0",
            table=TABLE,
            priority=100,
            proto=BOOT,
            multipath=[
                {"gateway": "2001:db8:0:1::2", "oif": kernel.nh0},
                {"gateway": "2001:db8:0:1::3", "oif": kernel.nh0},
            ],
        )
    )

    guard_v4 = nh.Route(
        V4, TABLE, DEFAULT_V4, nh.RouteType.UNREACHABLE, GUARD_METRIC, protocol=BOOT
    )
    v4 = kernel(nh.dump_routes, TABLE, V4)
    assert v4 == [
        nh.Route(
            V4,
            TABLE,
            DEFAULT_V4,
            nh.RouteType.UNICAST,
            100,
            protocol=BOOT,
            multipath=(
                nh.MultipathHop("198.18.0.2", kernel.nh0, 1),
                nh.MultipathHop("198.18.0.3", kernel.nh0, 3),
            ),
        ),
        guard_v4,
    ]
    assert v4[0].multipath_gateways == ("198.18.0.2", "198.18.0.3")
    v6 = kernel(nh.dump_routes, TABLE, V6)
    assert [(r.type, r.priority, r.multipath_gateways, r.oif) for r in v6] == [
        (nh.RouteType.UNICAST, 100, ("2001:db8:0:1::2", "2001:db8:0:1::3"), None),
        (nh.RouteType.UNREACHABLE, GUARD_METRIC, (), None),
    ]
    for flag in ("-4", "-6"):
        shown = kernel.ip(flag, "route", "show", "table", str(TABLE))
        assert {(r.get("type", "unicast"), r["metric"]) for r in shown} == {
            ("unicast", 100),
            ("unreachable", GUARD_METRIC),
        }

    # What a previous instance left (legacy multipath) becomes a route by nhid in place.
    add_members(kernel)
    kernel(nh.set_group, 110, [(11, 1), (12, 1)], resilient=None)
    kernel(nh.replace_route_nhid, family=V6, table=TABLE, dst="::/0", nhid=110, priority=100)
    v6 = kernel(nh.dump_routes, TABLE, V6)
    assert [(r.type, r.priority, r.nhid, r.multipath) for r in v6] == [
        (nh.RouteType.UNICAST, 100, 110, ()),
        (nh.RouteType.UNREACHABLE, GUARD_METRIC, None, ()),
    ]

    kernel(nh.delete_route, family=V4, table=TABLE, dst="default", priority=100)
    assert kernel(nh.dump_routes, TABLE, V4) == [guard_v4]
    with pytest.raises(NotFound):
        kernel(nh.delete_route, family=V4, table=TABLE, dst="default", priority=100)


def test_errors_are_mapped_with_the_kernels_message(kernel: Kernel) -> None:
    with pytest.raises(NotFound) as missing:
        kernel(nh.delete_nexthop, 77)
    assert missing.value.operation == "delete nexthop 77"

    kernel(nh.add_nexthop, 1, family=V4, gateway="198.18.0.2", oif=kernel.nh0)
    with pytest.raises(Exists):
        kernel(nh.add_nexthop, 1, family=V4, gateway="198.18.0.2", oif=kernel.nh0)

    with pytest.raises(InvalidArgument) as bad_member:
        kernel(nh.set_group, 100, [(1, 1), (77, 1)], resilient=None)
    assert bad_member.value.extack == "Invalid nexthop id"
    assert "Invalid nexthop id" in str(bad_member.value)

    with pytest.raises(InvalidArgument, match="Invalid device index"):
        kernel(nh.add_nexthop, 2, family=V4, gateway="198.18.0.3", oif=9999)

    kernel(nh.set_group, 101, [(1, 1)], resilient=None, replace=False)
    with pytest.raises(InvalidArgument, match="different type"):
        kernel(nh.set_group, 101, [(1, 1)], resilient=RESILIENT)

    with pytest.raises(InvalidArgument, match="resilient"):
        kernel(nh.dump_buckets, 101)
    with pytest.raises(NotFound):
        kernel(nh.dump_buckets, 77)
    with pytest.raises(NotFound):
        kernel(nh.get_nexthop, 77)
    with pytest.raises(InvalidArgument, match="Nexthop id does not exist"):
        kernel(nh.replace_route_nhid, family=V4, table=TABLE, dst="default", nhid=77)
    assert kernel(nh.dump_nexthops) == [
        nh.Nexthop(1, V4, BOOT, 253, gateway="198.18.0.2", oif=kernel.nh0),
        nh.Nexthop(101, socket.AF_UNSPEC, BOOT, group=((1, 1),), group_type=nh.GroupType.MPATH),
    ], "failed requests leave nothing behind"


def test_probe_support_says_yes_and_leaves_nothing(kernel: Kernel) -> None:
    add_members(kernel)
    kernel(nh.set_group, 200, [(1, 1), (2, 1)], resilient=RESILIENT)
    before = kernel(nh.dump_nexthops)

    assert kernel(nh.probe_support) == nh.Support(nexthop_objects=True, resilient_groups=True)

    assert kernel(nh.dump_nexthops) == before
    assert not [n for n in kernel(nh.dump_nexthops) if n.id in nh.RESERVED_IDS]

    # A probe interrupted earlier left its objects behind: the next one copes and cleans up.
    kernel(nh.add_nexthop, nh.PROBE_BLACKHOLE_ID, family=V4, blackhole=True)
    kernel(
        nh.set_group,
        nh.PROBE_GROUP_ID,
        [(nh.PROBE_BLACKHOLE_ID, 1)],
        resilient=nh.ResilientParams(2, 0, 0),
    )
    assert kernel(nh.probe_support).resilient_groups
    assert kernel(nh.dump_nexthops) == before


class RefuseGroups:
    """An IPRoute stand-in whose group requests fail as if the kernel said EPERM."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ipr, name)

    def nlm_request_batch(self, msgs: list[Any], noraise: bool = False) -> Any:
        for msg in msgs:
            if any(name == "NHA_GROUP" for name, *_ in msg["attrs"]):
                raise NetlinkError(errno.EPERM, "injected")
        return self._ipr.nlm_request_batch(msgs, noraise)


def test_probe_cleans_up_when_it_fails_half_way(kernel: Kernel) -> None:
    with pytest.raises(PermissionDenied, match="injected"):
        kernel(lambda ipr: nh.probe_support(RefuseGroups(ipr)))
    assert kernel(nh.dump_nexthops) == []  # the blackhole it had made is gone again

    sh("ip", "-n", kernel.netns, "link", "set", "lo", "down")
    with pytest.raises(KernelError, match="not up") as down:
        kernel(nh.probe_support)
    assert down.value.errno == errno.ENETDOWN
    assert kernel(nh.dump_nexthops) == []


@pytest.mark.parametrize("buckets", [128, 512])
def test_timing_64_nexthops_and_100_group_replaces(kernel: Kernel, buckets: int) -> None:
    members = list(range(1, 65))

    def build(ipr: Any) -> tuple[float, float, list[float]]:
        start = time.perf_counter()
        for i in members:
            nh.add_nexthop(
                ipr, i, family=V4, gateway=f"198.18.0.{i + 1}", oif=kernel.nh0, replace=True
            )
        created = time.perf_counter()
        params = nh.ResilientParams(buckets=buckets, idle_timer=1, unbalanced_timer=30)
        nh.set_group(ipr, 1000, [(i, 1) for i in members], resilient=params)
        grouped = time.perf_counter()
        replaces = []
        for round_ in range(100):
            left_out = members[round_ % len(members)]
            t0 = time.perf_counter()
            nh.set_group(ipr, 1000, [(i, 1) for i in members if i != left_out], resilient=params)
            replaces.append(time.perf_counter() - t0)
        return created - start, grouped - created, replaces

    create, group, replaces = kernel(build)
    p50 = statistics.median(replaces)
    p99 = sorted(replaces)[98]
    print(
        f"\n64 nexthops: {create * 1e3:.1f} ms ({create / 64 * 1e6:.0f} us each); "
        f"resilient group (64 members, {buckets} buckets): {group * 1e3:.2f} ms; "
        f"100 replaces: p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us, "
        f"total {sum(replaces) * 1e3:.1f} ms"
    )
    final = kernel(nh.get_nexthop, 1000)
    assert [m.id for m in final.group] == [i for i in members if i != members[99 % 64]]
    assert p50 < 0.01, f"a group replace took {p50 * 1e3:.1f} ms (p50); expected < 1 ms"
