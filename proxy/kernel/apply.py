"""Carry out planned operations (runs on the netlink worker, one batch per reconcile).

Each operation is idempotent: an add that finds its object (EEXIST) and a delete that finds
nothing (ENOENT, ESRCH, EADDRNOTAVAIL) count as done. A failed operation does not stop the
batch: later ones may not depend on it, and the next reconcile retries what is still missing.
"""

from __future__ import annotations

from typing import Any

import attrs
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxy.kernel import announce, nexthop, rtnl
from proxy.kernel.errors import Exists, KernelError, NotFound, from_netlink_error
from proxy.kernel.model import Family, RouteType, Scope
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

IFA_F_NODAD = 0x02


@attrs.frozen
class Failure:
    op: Op
    error: KernelError


@attrs.frozen
class Applied:
    done: int
    failures: tuple[Failure, ...]


def apply_all(ipr: IPRoute, ops: list[Op], scope: Scope) -> Applied:
    """Carry out `ops` in order; the rule changes (last in a plan) go out as one fast batch."""
    failures = []
    rules = [op for op in ops if isinstance(op, AddRule | DelRule)]
    for op in ops:
        if isinstance(op, AddRule | DelRule):
            continue
        try:
            _apply(ipr, op, scope)
        except NetlinkError as exc:
            error = from_netlink_error(exc, operation=describe(op))
            if not _already_done(op, error):
                failures.append(Failure(op, error))
        except KernelError as error:
            if not _already_done(op, error):
                failures.append(Failure(op, error))
    answers = rtnl.write_rules([(isinstance(op, AddRule), op.rule) for op in rules])
    for rule_op, answer in zip(rules, answers, strict=True):
        if answer is not None and not _already_done(rule_op, answer):
            answer.operation = describe(rule_op)
            failures.append(Failure(rule_op, answer))
    return Applied(len(ops) - len(failures), tuple(failures))


def _already_done(op: Op, error: KernelError) -> bool:
    adds = (CreateBridge, AddAddress, AddRule)
    deletes = (DelAddress, DelNexthop, DelRoute, DelRule)
    return (isinstance(op, adds) and isinstance(error, Exists)) or (
        isinstance(op, deletes) and isinstance(error, NotFound)
    )


def describe(op: Op) -> str:
    """`add rule from 198.51.100.1/32 lookup 4096 prio 30000`-style text for logs."""
    return f"{type(op).__name__} {attrs.asdict(op, recurse=False)}"


def _index(ipr: IPRoute, name: str) -> int:
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise KernelError(19, "No such device", operation=f"look up {name}")  # ENODEV
    return int(found[0])


def _apply(ipr: IPRoute, op: Op, scope: Scope) -> None:
    match op:
        case CreateBridge(name=name, mac=mac):
            ipr.link("add", ifname=name, kind="bridge", address=mac)
            ipr.link("set", index=_index(ipr, name), state="up")
        case SetLink(name=name):
            changes: dict[str, Any] = {}
            if op.up is not None:
                changes["state"] = "up" if op.up else "down"
            if op.mac is not None:
                changes["address"] = op.mac
            if op.master is not None:
                changes["master"] = _index(ipr, op.master)
            if op.release:
                changes["master"] = 0
            ipr.link("set", index=_index(ipr, name), **changes)
        case AddAddress(device=device, address=address):
            flags = IFA_F_NODAD if address.version == 6 else 0
            ipr.addr(
                "add",
                index=_index(ipr, device),
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=Family.of(address),
                flags=flags,
            )
        case DelAddress(device=device, address=address):
            ipr.addr(
                "del",
                index=_index(ipr, device),
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=Family.of(address),
            )
        case Announce(device=device, address=address):
            announce.announce(_index(ipr, device), device, address, _mac(ipr, device))
        case PutNexthop(nexthop=nh):
            if nh.is_group:
                resilient = None
                if nh.resilience is not None:
                    resilient = nexthop.ResilientParams(
                        nh.resilience.buckets,
                        nh.resilience.idle_timer,
                        nh.resilience.unbalanced_timer,
                    )
                nexthop.set_group(ipr, nh.id, [(m, 1) for m in nh.members], resilient=resilient)
            else:
                assert nh.device is not None and nh.gateway is not None
                nexthop.add_nexthop(
                    ipr,
                    nh.id,
                    family=nh.family,
                    gateway=str(nh.gateway),
                    oif=_index(ipr, nh.device),
                    replace=True,
                )
        case DelNexthop(id=id):
            nexthop.delete_nexthop(ipr, id)
        case PutRoute(route=route, table=table):
            if route.nexthop_id is not None:
                nexthop.replace_route_nhid(
                    ipr,
                    family=route.family,
                    table=table,
                    dst="default",
                    nhid=route.nexthop_id,
                    priority=route.metric,
                )
            elif route.type is not RouteType.UNICAST:
                nexthop.replace_route_type(
                    ipr,
                    family=route.family,
                    table=table,
                    dst="default",
                    type=nexthop.RouteType(route.type),
                    priority=route.metric,
                )
            else:  # legacy multipath through the bridge
                bridge = _index(ipr, scope.bridge)
                ipr.route(
                    "replace",
                    dst="0.0.0.0/0" if route.family is Family.V4 else "::/0",
                    family=route.family,
                    table=table,
                    priority=route.metric,
                    proto=nexthop.DEFAULT_PROTOCOL,
                    multipath=[{"gateway": str(g), "oif": bridge} for g in sorted(route.gateways)],
                )
        case DelRoute(route=route, table=table):
            nexthop.delete_route(
                ipr, family=route.family, table=table, dst="default", priority=route.metric
            )
        case AddRule() | DelRule():
            raise AssertionError("rules are written in one batch by apply_all")


def _mac(ipr: IPRoute, device: str) -> str:
    message = ipr.link("get", index=_index(ipr, device))[0]
    return str(message.get_attr("IFLA_ADDRESS"))


__all__ = ["Applied", "Failure", "apply_all", "describe"]
