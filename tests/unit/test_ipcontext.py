"""IP-context decisions: upstream's unit-test cases (behaviour reference §10.1) and its bugs."""

from __future__ import annotations

import ipaddress

from proxy.api.networkservice.connectioncontext_pb2 import (
    IPContext,
    IpNeighbor,
    PolicyRoute,
    Route,
)
from proxy.nsm.ipcontext import context_problems, nsc_context, nse_context

BRIDGE = [ipaddress.ip_interface("172.16.0.100/24"), ipaddress.ip_interface("fd00::100/64")]
SRC = [ipaddress.ip_interface("172.16.0.1/24"), ipaddress.ip_interface("fd00::1/64")]
DST = [ipaddress.ip_interface("172.16.0.2/24"), ipaddress.ip_interface("fd00::2/64")]


def context(**fields: list[str]) -> IPContext:
    return IPContext(**fields)  # type: ignore[arg-type]


def policy(source: str, *hops: str) -> PolicyRoute:
    route = PolicyRoute(routes=[Route(prefix="0.0.0.0/0", nextHop=h) for h in hops])
    setattr(route, "from", source)
    return route


def test_nsc_empty_connection_gets_dst_child_locally_and_src_child_for_the_lb() -> None:
    result = nsc_context(IPContext(), src=SRC, dst=DST)
    assert list(result.dst_ip_addrs) == ["172.16.0.1/24", "fd00::1/64"]
    assert list(result.src_ip_addrs) == ["172.16.0.2/24", "fd00::2/64"]
    assert not result.extra_prefixes and not result.policies


def test_nse_first_request_gets_addresses_and_the_bridge_as_gateways() -> None:
    result = nse_context(IPContext(), src=SRC, dst=DST, gateways=BRIDGE)
    assert list(result.src_ip_addrs) == ["172.16.0.1/24", "fd00::1/64"]
    assert list(result.dst_ip_addrs) == ["172.16.0.2/24", "fd00::2/64"]
    assert list(result.extra_prefixes) == ["172.16.0.100/24", "fd00::100/64"]


def test_nse_update_with_matching_data_changes_nothing() -> None:
    current = context(
        src_ip_addrs=["172.16.0.1/24", "fd00::1/64", "20.0.0.1/32", "2000::1/128"],
        dst_ip_addrs=["172.16.0.2/24", "fd00::2/64"],
        extra_prefixes=["172.16.0.100/24", "fd00::100/64"],
    )
    current.policies.extend([policy("20.0.0.1/32", "172.16.0.100")])
    assert nse_context(current, src=SRC, dst=DST, gateways=BRIDGE) == current


def test_nse_update_with_new_ips_and_gateway_keeps_vips_and_rewrites_hops() -> None:
    current = context(
        src_ip_addrs=["172.16.0.1/24", "fd00::1/64", "20.0.0.1/32", "2000::1/128"],
        dst_ip_addrs=["172.16.0.2/24", "fd00::2/64"],
        extra_prefixes=["172.16.0.10/24", "fd00::10/64"],
    )
    current.policies.extend(
        [policy("20.0.0.1/32", "172.16.0.10"), policy("2000::1/128", "fd00::10")]
    )
    src = [ipaddress.ip_interface("172.16.0.10/24"), ipaddress.ip_interface("fd00::10/64")]
    dst = [ipaddress.ip_interface("172.16.0.20/24"), ipaddress.ip_interface("fd00::20/64")]
    result = nse_context(current, src=src, dst=dst, gateways=BRIDGE)
    assert set(result.src_ip_addrs) == {
        "172.16.0.10/24",
        "fd00::10/64",
        "20.0.0.1/32",
        "2000::1/128",
    }
    assert set(result.dst_ip_addrs) == {"172.16.0.20/24", "fd00::20/64"}
    assert list(result.extra_prefixes) == ["172.16.0.100/24", "fd00::100/64"]
    assert [r.nextHop for p in result.policies for r in p.routes] == ["172.16.0.100", "fd00::100"]


def test_rebuild_without_old_gateways_does_not_pile_up_addresses() -> None:
    """Upstream §11.18: an empty old extraPrefixes kept every old address."""
    current = context(src_ip_addrs=["172.16.0.1/24", "20.0.0.1/32"], dst_ip_addrs=["172.16.0.2/24"])
    src = [ipaddress.ip_interface("172.16.0.7/24")]
    dst = [ipaddress.ip_interface("172.16.0.8/24")]
    result = nse_context(current, src=src, dst=dst, gateways=BRIDGE[:1])
    assert set(result.src_ip_addrs) == {"172.16.0.7/24", "20.0.0.1/32"}
    assert list(result.dst_ip_addrs) == ["172.16.0.8/24"]


def test_a_changed_bridge_address_alone_updates_gateways_and_hops() -> None:
    """Upstream's "update gateways" branch could never run."""
    current = nse_context(IPContext(), src=SRC, dst=DST, gateways=BRIDGE)
    current.policies.extend([policy("20.0.0.1/32", "172.16.0.100")])
    moved = [ipaddress.ip_interface("172.16.0.101/24"), BRIDGE[1]]
    result = nse_context(current, src=SRC, dst=DST, gateways=moved)
    assert list(result.extra_prefixes) == ["172.16.0.101/24", "fd00::100/64"]
    assert result.policies[0].routes[0].nextHop == "172.16.0.101"
    assert set(result.src_ip_addrs) == {"172.16.0.1/24", "fd00::1/64"}


def test_inputs_are_never_modified() -> None:
    current = context(src_ip_addrs=["172.16.0.9/24"], dst_ip_addrs=["172.16.0.8/24"])
    before = IPContext()
    before.CopyFrom(current)
    nse_context(current, src=SRC, dst=DST, gateways=BRIDGE)
    nsc_context(current, src=SRC, dst=DST)
    assert current == before


def test_families_always_ipv4_first() -> None:
    """Upstream §11.26: the order followed Go's random map iteration."""
    result = nse_context(IPContext(), src=SRC[::-1], dst=DST[::-1], gateways=BRIDGE[::-1])
    assert list(result.src_ip_addrs) == ["172.16.0.1/24", "fd00::1/64"]
    assert list(result.extra_prefixes) == ["172.16.0.100/24", "fd00::100/64"]


def test_context_problems_accepts_what_nsm_and_the_proxy_write() -> None:
    good = nse_context(IPContext(), src=SRC, dst=DST, gateways=BRIDGE)
    good.src_ip_addrs.append("198.19.0.1/32")  # a target's VIP
    good.policies.append(policy("198.19.0.1/32", "172.16.0.100"))
    good.src_routes.append(Route(prefix="198.18.0.0/16"))
    good.ip_neighbors.append(IpNeighbor(ip="fd00::100", hardware_address="02:00:00:00:00:01"))
    assert context_problems(good) == []
    assert context_problems(IPContext()) == []


def test_context_problems_names_each_value_that_is_not_an_address() -> None:
    bad = context(
        src_ip_addrs=["not-an-ip", "198.18.0.1"],  # the second: no length
        dst_ip_addrs=["300.1.2.3/32"],
        extra_prefixes=["198.19.9.9/40"],
    )
    bad.policies.append(policy("2001:db8::zz/128", "fd00::100"))
    assert context_problems(bad) == [
        "src_ip_addrs[0] 'not-an-ip' is not an address/length",
        "src_ip_addrs[1] '198.18.0.1' is not an address/length",
        "dst_ip_addrs[0] '300.1.2.3/32' is not an address/length",
        "extra_prefixes[0] '198.19.9.9/40' is not an address/length",
        "policies[0].from '2001:db8::zz/128' is not an address/length",
    ]
    routes = context(src_ip_addrs=[" 198.18.0.1/24", "198.18.0.1/255.255.255.0"])
    routes.dst_routes.append(Route(prefix="0.0.0.0/0", nextHop="gateway"))
    routes.policies.append(policy("", "x" * 100))
    problems = context_problems(routes)
    assert problems[:3] == [
        "src_ip_addrs[0] ' 198.18.0.1/24' is not an address/length",
        "src_ip_addrs[1] '198.18.0.1/255.255.255.0' is not an address/length",
        "dst_routes[0].nextHop 'gateway' is not an address",
    ]
    assert problems[3].endswith("...(100 characters) is not an address")


def test_context_problems_shows_five_and_counts_the_rest() -> None:
    problems = context_problems(context(src_ip_addrs=[f"bad-{n}" for n in range(8)]))
    assert len(problems) == 6 and problems[-1] == "and 3 more"
