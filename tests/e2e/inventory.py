"""What the proxy holds in its namespace and in IPAM, next to what it should hold, for the tests
that check nothing is left behind (target churn, bad input).

What the proxy should hold follows from the lab's LBs and targets alone:

* bridge ports: one per running LB (`interface_name(<LB service>, <LB connection id>)`, the
  connection id being `<NSM_NAME>-<LB service>-<LB name>`) and one per target
  (`interface_name(<proxy service>, <target's connection id>)`, the id being
  `<target>-<namespace>-0`, its first path segment's);
* IPAM child records, per family: `bridge`, and `<key>-src` and `<key>-dst` for the key of each
  LB connection and of each target (proxy/ipam_model.py), named here `<child>/<family>`;
* VIP rules: `from <VIP> lookup 4096` for every VIP of every target, and no other rule than the
  kernel's own three (local, main, default).
"""

from __future__ import annotations

from typing import Any

import attrs

from proxy.lab.scenarios import ipam_records
from proxy.lab.topology import LB_SERVICE, PROXY_SERVICE, PROXY_TABLE, Topology, ip_json
from proxy.nsm.wire import interface_name

KERNEL_TABLES = ("local", "main", "default")


def lb_key(topology: Topology, lb: str) -> str:
    return f"{topology.proxy_name}-{LB_SERVICE}-{lb}"


def target_key(target: str) -> str:
    return f"{target}-{PROXY_SERVICE.rsplit('.', 1)[-1]}-0"


def target_port(target: str) -> str:
    return interface_name(PROXY_SERVICE, target_key(target))


def expected_ports(topology: Topology) -> set[str]:
    lbs = [lb.name for lb in topology.lbs.values() if topology.is_running(lb.name)]
    return {interface_name(LB_SERVICE, lb_key(topology, lb)) for lb in lbs} | {
        target_port(target.name) for target in topology.targets.values()
    }


def key_records(key: str, families: tuple[int, ...]) -> set[str]:
    return {f"{key}-{end}/{family}" for family in families for end in ("src", "dst")}


def expected_records(topology: Topology) -> set[str]:
    keys = [lb_key(topology, lb.name) for lb in topology.lbs.values()]
    keys += [target_key(target.name) for target in topology.targets.values()]
    found = {f"bridge/{family}" for family in topology.families}
    for key in keys:
        found |= key_records(key, topology.families)
    return found


def expected_vips(topology: Topology) -> set[str]:
    return {vip.split("/")[0] for t in topology.targets.values() for vip in t.vips}


@attrs.frozen
class Inventory:
    """The proxy's namespace and the lab IPAM's records at one moment."""

    links: frozenset[str]  # every interface in the proxy's namespace
    ports: frozenset[str]  # those on bridge0
    rules: frozenset[tuple[str, str]]  # (source, table) of every rule but the kernel's own
    routes: tuple[dict[str, Any], ...]  # `ip route show table all`, both families
    addresses: frozenset[str]  # global addresses in the proxy's namespace
    records: dict[str, str]  # IPAM child records: `<child>/<family>` -> address

    @property
    def vip_rules(self) -> set[str]:
        return {source for source, table in self.rules if table == str(PROXY_TABLE)}

    def devices_routed(self) -> set[str]:
        return {route["dev"] for route in self.routes if "dev" in route}

    def mentions(self, addresses: set[str]) -> list[dict[str, Any]]:
        """Routes whose destination, gateway or preferred source is one of `addresses`."""
        return [
            route
            for route in self.routes
            if {route.get("dst"), route.get("gateway"), route.get("prefsrc")} & addresses
        ]

    def table_routes(self) -> list[tuple[str, str]]:
        """(type, destination) of the proxy's table, sorted: per family the default route over
        the LBs and the `unreachable` guard behind it."""
        return sorted(
            (route.get("type", "unicast"), route["dst"])
            for route in self.routes
            if route.get("table") == str(PROXY_TABLE)
        )


async def inventory(topology: Topology) -> Inventory:
    proxy = topology.netns("proxy")
    links = await ip_json("link", "show", netns=proxy)
    rules: set[tuple[str, str]] = set()
    routes: list[dict[str, Any]] = []
    for version in topology.families:
        for rule in await ip_json(f"-{version}", "rule", "show", netns=proxy):
            if rule.get("table") not in KERNEL_TABLES:
                rules.add((rule.get("src", "all"), str(rule.get("table"))))
        routes += await ip_json(f"-{version}", "route", "show", "table", "all", netns=proxy)
    addresses = {a for found in (await topology.addresses("proxy")).values() for a in found}
    return Inventory(
        links=frozenset(link["ifname"] for link in links),
        ports=frozenset(link["ifname"] for link in links if link.get("master") == "bridge0"),
        rules=frozenset(rules),
        routes=tuple(routes),
        addresses=frozenset(addresses),
        records=ipam_records(topology),
    )
