"""The lab's kernel forwarder against a real kernel, in throw-away namespaces.

Each test gets a client and an endpoint namespace (`mp-fw-c-<random>`, `mp-fw-e-<random>`,
deleted whatever happens) and a running forwarder; what it checks is what `ip -j` shows and what
`ping` gets through.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from proxy.api.networkservice.connectioncontext_pb2 import IPContext, PolicyRoute, Route
from proxy.lab.nsm.forwarding import Wiring
from proxy.lab.nsm.kernel import (
    POLICY_RULE_PRIORITY,
    POLICY_TABLES,
    KernelForwarder,
    NamespaceMissing,
    NameTaken,
    WiringError,
    open_kernel_forwarder,
)
from tests.integration.netns import ip, ip_json, namespaces

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

VIP4, VIP6 = "198.19.100.1", "2001:db8:100::1"
FAR4 = "198.19.200.1"  # only on the endpoint's end: reachable from the client only by policy


@pytest.fixture
def ns() -> Iterator[dict[str, str]]:
    with namespaces("fw-c", "fw-e") as names:
        yield {"client": names["fw-c"], "endpoint": names["fw-e"]}


@pytest.fixture
async def forwarder() -> AsyncIterator[KernelForwarder]:
    async with open_kernel_forwarder() as running:
        yield running


def policy(source: str, *routes: Route) -> PolicyRoute:
    made = PolicyRoute(routes=list(routes))
    setattr(made, "from", source)  # `from` is a Python keyword
    return made


def context(client4: str = "198.18.0.2/24") -> IPContext:
    return IPContext(
        src_ip_addrs=[client4, "2001:db8::2/64", f"{VIP4}/32"],
        dst_ip_addrs=["198.18.0.1/24", "2001:db8::1/64", f"{FAR4}/32"],
        src_routes=[
            Route(prefix="198.19.1.0/24", nextHop="198.18.0.1"),
            Route(prefix="2001:db8:1::/64", nextHop="2001:db8::1"),
            Route(prefix="198.19.2.0/24"),  # on-link
        ],
        dst_routes=[Route(prefix=f"{VIP4}/32", nextHop=client4.split("/")[0])],
        policies=[
            policy(f"{VIP4}/32", Route(prefix="0.0.0.0/0", nextHop="198.18.0.1")),
            policy(f"{VIP6}/128", Route(prefix="::/0", nextHop="2001:db8::1")),
        ],
    )


def wiring(ns: dict[str, str], **changes: Any) -> Wiring:
    fields: dict[str, Any] = {
        "connection_id": "conn-1",
        "client_netns": f"/run/netns/{ns['client']}",
        "client_ifname": "nsc-a",
        "endpoint_netns": f"/run/netns/{ns['endpoint']}",
        "endpoint_ifname": "nse-a",
        "mtu": 1400,
        "ip_context": context(),
    }
    fields.update(changes)
    return Wiring(**fields)


def link(netns: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = ip_json("-d", "link", "show", "dev", name, netns=netns)
    return found[0]


def links(netns: str) -> set[str]:
    return {entry["ifname"] for entry in ip_json("link", "show", netns=netns)}


def addresses(netns: str, name: str) -> set[str]:
    found = ip_json("addr", "show", "dev", name, netns=netns)
    return {
        f"{a['local']}/{a['prefixlen']}"
        for a in found[0]["addr_info"]
        if a.get("scope") == "global"
    }


def routes(netns: str, *args: str, family: str = "-4") -> set[tuple[str, str | None, str]]:
    found = ip_json(family, "route", "show", *args, netns=netns)
    return {(r["dst"], r.get("gateway"), r["dev"]) for r in found}


def our_rules(netns: str) -> list[dict[str, Any]]:
    found = ip_json("-4", "rule", "show", netns=netns) + ip_json("-6", "rule", "show", netns=netns)
    return [r for r in found if r.get("table", "").isdigit() and int(r["table"]) in POLICY_TABLES]


def ping(netns: str, target: str, *options: str) -> bool:
    command = ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "2", *options, target]
    return subprocess.run(command, capture_output=True, timeout=10).returncode == 0


async def test_connect_wires_the_pair_as_the_context_says(
    ns: dict[str, str], forwarder: KernelForwarder
) -> None:
    await forwarder.connect(wiring(ns))
    client, endpoint = link(ns["client"], "nsc-a"), link(ns["endpoint"], "nse-a")
    for end in (client, endpoint):
        assert end["linkinfo"]["info_kind"] == "veth"
        assert end["mtu"] == 1400
        assert "UP" in end["flags"]
        assert end["ifalias"] == "lab-nsm:conn-1"
    assert client["link_index"] == endpoint["ifindex"]
    assert addresses(ns["client"], "nsc-a") == {"198.18.0.2/24", "2001:db8::2/64", f"{VIP4}/32"}
    assert addresses(ns["endpoint"], "nse-a") == {"198.18.0.1/24", "2001:db8::1/64", f"{FAR4}/32"}
    assert {
        ("198.19.1.0/24", "198.18.0.1", "nsc-a"),
        ("198.19.2.0/24", None, "nsc-a"),
    } <= routes(ns["client"])
    assert ("2001:db8:1::/64", "2001:db8::1", "nsc-a") in routes(ns["client"], family="-6")
    assert (f"{VIP4}", "198.18.0.2", "nse-a") in routes(ns["endpoint"])
    # one rule and one table of its own per policy, on the client side only
    rules = our_rules(ns["client"])
    assert {(r["src"], r["priority"]) for r in rules} == {
        (VIP4, POLICY_RULE_PRIORITY),
        (VIP6, POLICY_RULE_PRIORITY),
    }
    assert all("srclen" not in r for r in rules)  # `ip -j` leaves it out for a single host
    tables = {r["src"]: r["table"] for r in rules}
    assert routes(ns["client"], "table", tables[VIP4]) == {("default", "198.18.0.1", "nsc-a")}
    assert routes(ns["client"], "table", tables[VIP6], family="-6") == {
        ("default", "2001:db8::1", "nsc-a")
    }
    assert our_rules(ns["endpoint"]) == []
    # traffic, both families, at once (nodad); FAR4 is reachable from the VIP only by policy
    assert ping(ns["client"], "198.18.0.1")
    assert ping(ns["client"], "2001:db8::1")
    assert ping(ns["client"], FAR4, "-I", VIP4)
    assert not ping(ns["client"], FAR4, "-I", "198.18.0.2")


async def test_a_refresh_brings_the_pair_in_line_without_recreating_it(
    ns: dict[str, str], forwarder: KernelForwarder
) -> None:
    await forwarder.connect(wiring(ns))
    before = (link(ns["client"], "nsc-a")["ifindex"], link(ns["endpoint"], "nse-a")["ifindex"])
    ip("addr", "add", "198.19.50.1/32", "dev", "nsc-a", netns=ns["client"])  # not the context's
    changed = context(client4="198.18.0.3/24")
    del changed.src_routes[2]
    del changed.policies[1]
    changed.policies.append(
        policy("198.19.101.0/24", Route(prefix="198.19.3.0/24", nextHop="198.18.0.1"))
    )
    await forwarder.connect(wiring(ns, ip_context=changed, mtu=1300))

    after = (link(ns["client"], "nsc-a")["ifindex"], link(ns["endpoint"], "nse-a")["ifindex"])
    assert after == before
    assert link(ns["client"], "nsc-a")["mtu"] == link(ns["endpoint"], "nse-a")["mtu"] == 1300
    assert addresses(ns["client"], "nsc-a") == {
        "198.18.0.3/24",
        "2001:db8::2/64",
        f"{VIP4}/32",
        "198.19.50.1/32",  # never the forwarder's: left alone
    }
    assert ("198.19.2.0/24", None, "nsc-a") not in routes(ns["client"])
    assert (f"{VIP4}", "198.18.0.3", "nse-a") in routes(ns["endpoint"])
    rules = {r["src"]: r["table"] for r in our_rules(ns["client"])}
    assert set(rules) == {VIP4, "198.19.101.0"}
    assert routes(ns["client"], "table", rules["198.19.101.0"]) == {
        ("198.19.3.0/24", "198.18.0.1", "nsc-a")
    }
    assert len(set(rules.values())) == 2
    assert ping(ns["client"], FAR4, "-I", VIP4)
    # the same context again changes nothing
    await forwarder.connect(wiring(ns, ip_context=changed, mtu=1300))
    assert {r["src"]: r["table"] for r in our_rules(ns["client"])} == rules


async def test_disconnect_removes_the_pair_and_its_rules(
    ns: dict[str, str], forwarder: KernelForwarder
) -> None:
    await forwarder.connect(wiring(ns))
    await forwarder.disconnect("conn-1")
    assert "nsc-a" not in links(ns["client"])
    assert "nse-a" not in links(ns["endpoint"])
    assert our_rules(ns["client"]) == []
    assert routes(ns["client"], "table", "all") & {("default", "198.18.0.1", "nsc-a")} == set()
    assert forwarder.pairs == {}
    await forwarder.disconnect("conn-1")  # unknown by now: fine
    await forwarder.disconnect("never-seen")


async def test_two_connections_get_their_own_tables(
    ns: dict[str, str], forwarder: KernelForwarder
) -> None:
    await forwarder.connect(wiring(ns))
    second = IPContext(
        src_ip_addrs=["198.18.1.2/24"],
        dst_ip_addrs=["198.18.1.1/24"],
        policies=[policy("198.19.102.1/32", Route(prefix="0.0.0.0/0", nextHop="198.18.1.1"))],
    )
    await forwarder.connect(
        wiring(
            ns,
            connection_id="conn-2",
            client_ifname="nsc-b",
            endpoint_ifname="nse-b",
            ip_context=second,
        )
    )
    tables = [r["table"] for r in our_rules(ns["client"])]
    assert len(tables) == len(set(tables)) == 3
    await forwarder.disconnect("conn-1")
    assert {r["src"] for r in our_rules(ns["client"])} == {"198.19.102.1"}
    assert ping(ns["client"], "198.18.1.1")


async def test_bad_wirings_are_refused_clearly(
    ns: dict[str, str], forwarder: KernelForwarder
) -> None:
    with pytest.raises(WiringError, match="16 characters; Linux allows at most 15"):
        await forwarder.connect(wiring(ns, client_ifname="a-name-too-long1"))
    broken = IPContext(src_ip_addrs=["198.18.0.300/24"])
    with pytest.raises(WiringError, match=r"src_ip_addrs\[0\]"):
        await forwarder.connect(wiring(ns, ip_context=broken))
    with pytest.raises(NamespaceMissing, match="does not exist"):
        await forwarder.connect(wiring(ns, endpoint_netns="/run/netns/mp-fw-no-such-ns"))
    assert "nsc-a" not in links(ns["client"])
    assert forwarder.pairs == {}


async def test_a_name_held_by_another_link_is_refused(
    ns: dict[str, str], forwarder: KernelForwarder
) -> None:
    ip("link", "add", "nsc-a", "type", "veth", "peer", "name", "other", netns=ns["client"])
    with pytest.raises(NameTaken, match="client interface name 'nsc-a' is taken"):
        await forwarder.connect(wiring(ns))
    ip("link", "del", "nsc-a", netns=ns["client"])
    ip("link", "add", "nse-a", "type", "veth", "peer", "name", "other", netns=ns["endpoint"])
    with pytest.raises(NameTaken, match="nse-a"):
        await forwarder.connect(wiring(ns))
    assert "nsc-a" not in links(ns["client"])  # nothing half-made
    ip("link", "del", "nse-a", netns=ns["endpoint"])
    await forwarder.connect(wiring(ns))
    with pytest.raises(NameTaken, match=r"another connection \(lab-nsm:conn-1\)"):
        await forwarder.connect(wiring(ns, connection_id="conn-2"))
    assert link(ns["client"], "nsc-a")["ifalias"] == "lab-nsm:conn-1"


async def test_a_restarted_forwarder_adopts_its_pair(ns: dict[str, str]) -> None:
    async with open_kernel_forwarder() as first:
        await first.connect(wiring(ns))
    index = link(ns["client"], "nsc-a")["ifindex"]
    async with open_kernel_forwarder() as second:
        await second.connect(wiring(ns))
        assert link(ns["client"], "nsc-a")["ifindex"] == index
        assert ping(ns["client"], "198.18.0.1")
        await second.disconnect("conn-1")
    assert "nsc-a" not in links(ns["client"])
