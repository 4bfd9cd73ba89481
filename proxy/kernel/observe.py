"""Read the managed objects out of the kernel into an `Observed` (runs on the netlink worker)."""

from __future__ import annotations

import enum

from proxy.kernel import rtnl
from proxy.kernel.model import Observed, Scope


class Kinds(enum.Flag):
    """The kinds of managed objects, so that a reconcile can look only at what may have moved."""

    LINKS = enum.auto()
    ADDRESSES = enum.auto()
    RULES = enum.auto()
    ROUTES = enum.auto()
    NEXTHOPS = enum.auto()
    ALL = LINKS | ADDRESSES | RULES | ROUTES | NEXTHOPS


def observe(scope: Scope, kinds: Kinds = Kinds.ALL, previous: Observed | None = None) -> Observed:
    """Dump `kinds`; the other kinds are taken from `previous` (all dumped when it is None).

    Call it on the netlink worker thread (it must run in the proxy's namespace)."""
    if previous is None:
        kinds = Kinds.ALL
        previous = Observed()
    links = previous.links
    if Kinds.LINKS in kinds:
        links = {link.name: link for link in rtnl.dump_links()}
    bridge = links.get(scope.bridge)
    addresses = previous.bridge_addresses
    if Kinds.ADDRESSES in kinds:
        addresses = rtnl.dump_addresses(bridge.index) if bridge else frozenset()
    nexthops = previous.nexthops
    if Kinds.NEXTHOPS in kinds:
        names = {link.index: link.name for link in links.values()}
        nexthops = rtnl.dump_nexthops(scope.nexthop_ids, names)
    return Observed(
        links=links,
        bridge_addresses=addresses,
        rules=rtnl.dump_rules(scope.table) if Kinds.RULES in kinds else previous.rules,
        routes=rtnl.dump_default_routes(scope.table) if Kinds.ROUTES in kinds else previous.routes,
        nexthops=nexthops,
    )
