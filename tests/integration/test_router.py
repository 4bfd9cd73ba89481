"""The router against the real kernel: a proxy namespace with a bridge, and veth "LBs" whose
other ends live in namespaces of their own.

Flow placement is read with `ip route get ... from <VIP> iif bridge0` over many UDP 5-tuples,
with fib_multipath_hash_policy=1 (L4), which is the kernel's real ECMP decision for a packet a
target sends from its VIP.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio

from proxy.kernel.model import EgressMode, Observed, Scope, stable_mac
from proxy.kernel.monitor import LinkEvent, LinkMonitor, Resynced
from proxy.kernel.netlink import NetlinkWorker, in_netns
from proxy.kernel.router import (
    ConnectionsKnown,
    Router,
    SetBridgeAddresses,
    SetLoadBalancer,
    SetTargetPort,
    SetVips,
)
from tests.integration.netns import MADE, ip, ip_json, namespaces, sysctl, veth

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

BRIDGE_V4 = ipaddress.ip_interface("198.18.0.1/24")
BRIDGE_V6 = ipaddress.ip_interface("2001:db8::1/64")
VIP_V4 = ipaddress.ip_network("198.51.100.1/32")
VIP_V6 = ipaddress.ip_network("2001:db8:ff::1/128")
OUTSIDE = {4: "203.0.113.7", 6: "2001:db8:ee::7"}
FLOWS = 300


def lb_addresses(i: int) -> tuple[str, str]:
    return f"198.18.0.{10 + i}", f"2001:db8::{10 + i:x}"


@attrs.define
class Lab:
    proxy: str
    lbs: dict[int, str]  # LB number -> namespace
    router: Router
    events: trio.MemorySendChannel  # type: ignore[type-arg]
    worker: NetlinkWorker

    async def add_lb(self, i: int) -> None:
        v4, v6 = lb_addresses(i)
        await self.events.send(
            SetLoadBalancer(
                f"conn-{i}",
                f"lb{i}",
                frozenset({ipaddress.ip_address(v4), ipaddress.ip_address(v6)}),
            )
        )

    async def settle(self, condition: Callable[[Observed], object], within: float = 10) -> float:
        """Wait until `condition(kernel as last observed)` holds; the time it took."""
        start = trio.current_time()
        with trio.fail_after(within):
            seen = self.router.observed.value
            while seen is None or not condition(seen):
                seen = await self.router.observed.wait_change(seen)
        return trio.current_time() - start


def members(observed, version: int) -> set[str]:
    return {
        str(nh.gateway)
        for nh in observed.nexthops.values()
        if not nh.is_group
        and nh.gateway is not None
        and nh.gateway.version == version
        and any(nh.id in g.members for g in observed.nexthops.values() if g.is_group)
    }


def flows(netns: str, version: int, count: int = FLOWS) -> dict[int, str]:
    """Source port -> chosen gateway (or the error) for UDP flows from the VIP to outside."""
    vip = str(VIP_V4.network_address if version == 4 else VIP_V6.network_address)
    lines = [
        f"route get {OUTSIDE[version]} from {vip} iif bridge0 ipproto udp "
        f"sport {10000 + n} dport 53"
        for n in range(count)
    ]
    result = subprocess.run(
        ["ip", "-n", netns, "-j", "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    decoder = json.JSONDecoder()
    text, position, answers = result.stdout, 0, []
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(text, position)
        answers.append(value[0] if value else {})
    if len(answers) != count:  # an unreachable answer is an error on stderr, not JSON
        return {10000 + n: "unreachable" for n in range(count)}
    return {10000 + n: a.get("gateway", a.get("type", "?")) for n, a in enumerate(answers)}


@asynccontextmanager
async def lab(lb_count: int, mode: EgressMode = EgressMode.RESILIENT) -> AsyncIterator[Lab]:
    roles = ["proxy", *(f"lb{i}" for i in range(lb_count))]
    with namespaces(*roles) as names:
        proxy = names["proxy"]
        for name, value in [
            ("net.ipv4.conf.all.forwarding", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ]:
            sysctl(proxy, name, value)
        lbs = {i: names[f"lb{i}"] for i in range(lb_count)}
        for i, ns in lbs.items():
            veth(proxy, f"lb{i}", ns, "eth0")
            v4, v6 = lb_addresses(i)
            ip("addr", "add", f"{v4}/24", "dev", "eth0", netns=ns)
            ip("addr", "add", f"{v6}/64", "dev", "eth0", "nodad", netns=ns)
        worker = NetlinkWorker(proxy)
        scope = Scope(mode=mode)
        router = Router(worker, scope, stable_mac("node-a", "trench-a", "conduit-a"), interval=3600)
        send, receive = trio.open_memory_channel[object](100)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await nursery.start(LinkMonitor(worker, send.clone()).run)
            await nursery.start(router.run, receive)
            await send.send(SetBridgeAddresses(frozenset({BRIDGE_V4, BRIDGE_V6})))
            await send.send(SetVips(frozenset({VIP_V4, VIP_V6})))
            await send.send(ConnectionsKnown())  # no previous instance to wait for here
            yield Lab(proxy, lbs, router, send, worker)
            nursery.cancel_scope.cancel()


async def test_bridge_addresses_guards_and_vip_rules() -> None:
    async with lab(1) as env:
        await env.add_lb(0)
        await env.settle(lambda o: members(o, 4) and members(o, 6))
        [bridge] = ip_json("link", "show", "bridge0", netns=env.proxy)
        assert bridge["address"] == stable_mac("node-a", "trench-a", "conduit-a")
        assert "UP" in bridge["flags"]
        addresses = {
            f"{a['local']}/{a['prefixlen']}"
            for a in ip_json("addr", "show", "bridge0", netns=env.proxy)[0]["addr_info"]
            if a.get("scope") == "global"
        }
        assert addresses == {str(BRIDGE_V4), str(BRIDGE_V6)}
        [port] = ip_json("link", "show", "lb0", netns=env.proxy)
        assert port["master"] == "bridge0"
        for version, vip in ((4, VIP_V4), (6, VIP_V6)):
            rules = ip_json(f"-{version}", "rule", "show", "table", "4096", netns=env.proxy)
            assert [(r["priority"], r["src"]) for r in rules] == [(30000, str(vip.network_address))]
            routes = ip_json(f"-{version}", "route", "show", "table", "4096", netns=env.proxy)
            kinds = sorted((r.get("type", "unicast"), r.get("metric", 0)) for r in routes)
            assert kinds == [("unicast", 100), ("unreachable", 4294967295)]
            assert any("nhid" in r for r in routes)


@pytest.mark.parametrize("count", [1, 2, 4, 8])
async def test_ecmp_spreads_flows_over_every_load_balancer(count: int) -> None:
    async with lab(count) as env:
        for i in range(count):
            await env.add_lb(i)
        await env.settle(lambda o: len(members(o, 4)) == count and len(members(o, 6)) == count)
        for version in (4, 6):
            placed = flows(env.proxy, version)
            share = {gw: list(placed.values()).count(gw) for gw in set(placed.values())}
            print(f"IPv{version}, {count} LBs, {FLOWS} flows: {sorted(share.values())}")
            expected = {lb_addresses(i)[0 if version == 4 else 1] for i in range(count)}
            assert set(share) == expected
            # Fair share within +-50% for this many flows (resilient buckets, L4 hash).
            assert min(share.values()) >= 0.5 * FLOWS / count


@pytest.mark.parametrize("mode", [EgressMode.RESILIENT, EgressMode.MULTIPATH])
async def test_losing_a_load_balancer_keeps_the_other_flows_in_place(mode: EgressMode) -> None:
    async with lab(4, mode) as env:
        for i in range(4):
            await env.add_lb(i)
        await env.settle(lambda o: len(members(o, 4) or _gateways(o, 4)) == 4)
        before = {v: flows(env.proxy, v) for v in (4, 6)}
        lost = lb_addresses(2)
        started = time.monotonic()
        ip("netns", "del", env.lbs.pop(2))  # the LB's namespace and its veth vanish
        took = await env.settle(
            lambda o: (
                lost[0] not in (members(o, 4) | _gateways(o, 4))
                and lost[1] not in (members(o, 6) | _gateways(o, 6))
            )
        )
        elapsed = (time.monotonic() - started) * 1000
        print(
            f"{mode.name}: LB gone -> kernel updated in {elapsed:.1f} ms (router {took * 1e3:.1f})"
        )
        for version in (4, 6):
            after = flows(env.proxy, version)
            survivors = [p for p, gw in before[version].items() if gw not in lost]
            moved = [p for p in survivors if after[p] != before[version][p]]
            print(f"{mode.name} IPv{version}: {len(moved)}/{len(survivors)} surviving flows moved")
            assert not any(gw in lost for gw in after.values())
            if mode is EgressMode.RESILIENT:
                assert moved == []


def _gateways(observed, version: int) -> set[str]:
    return {str(g) for r in observed.routes for g in r.gateways if g.version == version}


async def test_without_load_balancers_the_guard_answers_not_the_main_table() -> None:
    async with lab(1) as env:
        ip("link", "set", "lb0", "up", netns=env.proxy)
        # A main-table default route the VIP traffic must never take.
        ip("addr", "add", "198.18.9.1/24", "dev", "lb0", netns=env.proxy)
        ip("route", "add", "default", "via", "198.18.9.2", netns=env.proxy)
        await env.settle(lambda o: len(o.rules) == 2 and o.routes)
        assert set(flows(env.proxy, 4, 5).values()) == {"unreachable"}
        assert set(flows(env.proxy, 6, 5).values()) == {"unreachable"}


async def test_drift_is_repaired_and_logged() -> None:
    async with lab(2) as env:
        for i in range(2):
            await env.add_lb(i)
        await env.settle(lambda o: len(members(o, 4)) == 2)
        ip("rule", "del", "from", str(VIP_V4.network_address), "lookup", "4096", netns=env.proxy)
        ip("link", "set", "lb1", "nomaster", netns=env.proxy)
        ip(
            "route",
            "replace",
            "default",
            "via",
            "198.18.0.10",
            "table",
            "4096",
            "metric",
            "100",
            netns=env.proxy,
        )
        ops = await env.router.reconcile(periodic=True)
        assert len(ops) >= 3
        assert await env.router.reconcile(periodic=True) == []
        rules = ip_json("rule", "show", "table", "4096", netns=env.proxy)
        assert str(VIP_V4.network_address) in {r["src"] for r in rules}
        assert ip_json("link", "show", "lb1", netns=env.proxy)[0]["master"] == "bridge0"


async def test_restart_adopts_everything_with_zero_writes() -> None:
    async with lab(2) as env:
        for i in range(2):
            await env.add_lb(i)
        await env.settle(lambda o: len(members(o, 4)) == 2 and len(members(o, 6)) == 2)
        intent = env.router.intent
        # A second instance (the restarted proxy) with the same wishes, watching route changes.
        events = _route_event_socket(env.proxy)
        second = Router(env.worker, env.router.scope, env.router.mac, interval=3600)
        second.intent = attrs.evolve(intent, load_balancers=dict(intent.load_balancers))
        ops = await second.reconcile(periodic=False)
        assert ops == []
        assert second.writes == 0
        assert second.egress.value is True
        events.setblocking(False)
        with pytest.raises(BlockingIOError):
            events.recv(65536)  # not one route, rule or nexthop event
        events.close()


def _route_event_socket(netns: str) -> socket.socket:
    groups = 0x40 | 0x400 | 0x80000 | 0x100000  # IPV4_ROUTE, IPV6_ROUTE, IPV4_RULE, IPV6_RULE

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        sock.bind((0, groups))
        sock.setsockopt(270, 1, 32)  # NETLINK_ADD_MEMBERSHIP: RTNLGRP_NEXTHOP
        return sock

    return in_netns(netns, make)


async def test_stale_objects_of_an_old_instance_are_removed() -> None:
    with namespaces("proxy", "lb0") as names:
        proxy = names["proxy"]
        veth(proxy, "lb0", names["lb0"], "eth0")
        # What an old instance left: a bridge, a rule for a VIP no longer there, a route for a
        # load-balancer no longer there, a nexthop in our id range.
        ip("link", "add", "bridge0", "type", "bridge", netns=proxy)
        ip("link", "set", "bridge0", "up", netns=proxy)
        ip("addr", "add", "198.18.0.1/24", "dev", "bridge0", netns=proxy)
        ip(
            "rule",
            "add",
            "from",
            "198.51.100.99",
            "lookup",
            "4096",
            "priority",
            "30000",
            netns=proxy,
        )
        ip(
            "route",
            "add",
            "default",
            "via",
            "198.18.0.77",
            "table",
            "4096",
            "metric",
            "1024",
            netns=proxy,
        )
        stale_id = Scope().member_ids[40]
        ip(
            "nexthop",
            "add",
            "id",
            str(stale_id),
            "via",
            "198.18.0.78",
            "dev",
            "bridge0",
            netns=proxy,
        )
        worker = NetlinkWorker(proxy)
        router = Router(worker, Scope(), stable_mac("n", "t", "c"), interval=3600)
        router.intent.update(SetBridgeAddresses(frozenset({BRIDGE_V4})))
        router.intent.update(SetVips(frozenset({VIP_V4})))
        router.intent.update(ConnectionsKnown())
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await router.reconcile(periodic=False)
            nursery.cancel_scope.cancel()
        rules = ip_json("rule", "show", "table", "4096", netns=proxy)
        assert [r["src"] for r in rules] == [str(VIP_V4.network_address)]
        routes = ip_json("route", "show", "table", "4096", netns=proxy)
        assert [r.get("type") for r in routes] == ["unreachable"]
        assert ip_json("nexthop", "show", netns=proxy) == []


async def test_link_monitor_resyncs_after_an_overflow() -> None:
    with namespaces("proxy") as names:
        proxy = names["proxy"]
        worker = NetlinkWorker(proxy)
        send, receive = trio.open_memory_channel[LinkEvent](0)  # nobody reads: it must block
        monitor = LinkMonitor(worker, send, receive_buffer=4096)
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            await nursery.start(monitor.run)
            for i in range(60):  # far more events than 4 KiB of socket buffer holds
                ip("link", "add", f"v{i}", "type", "veth", "peer", "name", f"p{i}", netns=proxy)
            seen: list[LinkEvent] = []
            with trio.fail_after(10):
                while not any(isinstance(e, Resynced) for e in seen):
                    seen.append(await receive.receive())
            resync = next(e for e in seen if isinstance(e, Resynced))
            assert {f"v{i}" for i in range(60)} <= {link.name for link in resync.links}
            assert monitor.resyncs == 1
            # Not deaf afterwards: a new link is still seen.
            ip("link", "add", "late", "type", "veth", "peer", "name", "late-p", netns=proxy)
            with trio.fail_after(10):
                while True:
                    event = await receive.receive()
                    if not isinstance(event, Resynced) and event.link.name == "late":
                        break
            nursery.cancel_scope.cancel()


async def test_new_address_is_announced_with_gratuitous_arp() -> None:
    async with lab(1) as env:
        listener = in_netns(env.lbs[0], _arp_listener)
        try:
            await env.add_lb(0)
            await env.settle(lambda o: members(o, 4))
            await env.events.send(
                SetBridgeAddresses(frozenset({ipaddress.ip_interface("198.18.0.2/24"), BRIDGE_V6}))
            )
            await env.settle(
                lambda o: ipaddress.ip_interface("198.18.0.2/24") in o.bridge_addresses
            )
            frames = _drain(listener)
            mac = bytes.fromhex(env.router.mac.replace(":", ""))
            garps = [f for f in frames if f[22:28] == mac and f[28:32] == bytes([198, 18, 0, 2])]
            assert garps, "no gratuitous ARP for the new address"
        finally:
            listener.close()


def _arp_listener() -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    sock.bind(("eth0", 0x0806))
    return sock


def _drain(sock: socket.socket) -> list[bytes]:
    sock.setblocking(False)
    frames = []
    while True:
        try:
            frames.append(sock.recv(2048))
        except BlockingIOError:
            return frames


async def test_target_ports_are_enslaved_when_they_appear() -> None:
    async with lab(1) as env:
        await env.events.send(SetTargetPort("tg0"))
        await env.settle(lambda o: "bridge0" in o.links)
        with namespaces("tg") as names:
            veth(env.proxy, "tg0", names["tg"], "eth0")
            await env.settle(
                lambda o: "tg0" in o.links and o.links["tg0"].master == o.links["bridge0"].index
            )


@pytest.fixture(autouse=True)
def no_leftover_namespaces() -> Iterator[None]:
    """What this test made is gone afterwards (by name: other runs may share the machine)."""
    first = len(MADE)
    yield
    existing = set(ip("netns", "list").split())
    leftover = [name for name in MADE[first:] if name in existing]
    assert not leftover, f"namespaces left behind: {leftover}"


async def test_a_restart_keeps_what_sources_have_not_reported_yet() -> None:
    """Until IPAM, NSP and NSM have spoken again, the kernel's state is adopted, not removed."""
    async with lab(2) as env:
        for i in range(2):
            await env.add_lb(i)
        await env.settle(lambda o: len(members(o, 4)) == 2 and len(o.rules) == 2)
        before = ip_json("rule", "show", "table", "4096", netns=env.proxy)
        fresh = Router(env.worker, env.router.scope, env.router.mac, interval=3600)
        assert await fresh.reconcile() == []  # nothing reported yet: everything adopted
        fresh.intent.update(SetVips(frozenset({VIP_V4})))  # NSP speaks: only its VIPs stay
        ops = await fresh.reconcile()
        assert [type(op).__name__ for op in ops] == ["DelRule"]
        assert ip_json("rule", "show", "table", "4096", netns=env.proxy) == [
            r for r in before if r["src"] == str(VIP_V4.network_address)
        ]
        fresh.intent.update(ConnectionsKnown())  # NSM settled, no LB reported: egress goes
        await fresh.reconcile()
        assert fresh.egress.value is False


async def test_ports_nobody_mentioned_stay_ports_released_ones_go() -> None:
    """After a restart, the ports of targets not heard from yet must stay on the bridge."""
    async with lab(1) as env:
        await env.events.send(SetTargetPort("tg0"))
        with namespaces("tg") as names:
            veth(env.proxy, "tg0", names["tg"], "eth0")
            await env.settle(
                lambda o: "tg0" in o.links and o.links["tg0"].master == o.links["bridge0"].index
            )
            fresh = Router(env.worker, env.router.scope, env.router.mac, interval=3600)
            fresh.intent.update(ConnectionsKnown())
            assert [op for op in await fresh.reconcile() if type(op).__name__ == "SetLink"] == []
            # Released when the control plane says so (through the running router: a second
            # router would fight the first one).
            await env.events.send(SetTargetPort("tg0", wanted=False))
            await env.settle(lambda o: o.links["tg0"].master is None)
            assert "master" not in ip_json("link", "show", "tg0", netns=env.proxy)[0]


async def test_a_load_balancer_that_comes_back_is_not_sent_to_its_old_mac() -> None:
    """Same addresses, new interface, new MAC: the old neighbour entry must go at once."""
    async with lab(1) as env:
        await env.settle(lambda o: BRIDGE_V4 in o.bridge_addresses)
        v4, v6 = lb_addresses(0)
        for address in (v4, v6):
            ip("neigh", "replace", address, "lladdr", "02:00:00:00:99:99", "dev", "bridge0",
               "nud", "reachable", netns=env.proxy)  # fmt: skip
        await env.add_lb(0)
        await env.settle(lambda o: members(o, 4) and members(o, 6))
        for address in (v4, v6):
            entries = ip_json("neigh", "show", address, "dev", "bridge0", netns=env.proxy)
            assert all(e.get("lladdr") != "02:00:00:00:99:99" for e in entries), entries
