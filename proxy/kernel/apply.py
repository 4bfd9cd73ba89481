"""Carry out planned operations (runs on the netlink worker, one batch per reconcile).

Each operation is idempotent: an add that finds its object (EEXIST) and a delete that finds
nothing (ENOENT, ESRCH, EADDRNOTAVAIL) count as done. A failed operation does not stop the
batch: later ones may not depend on it, and the next reconcile retries what is still missing.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

import attrs
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxy.kernel import announce, nexthop, rtnl
from proxy.kernel.errors import Exists, KernelError, NoSuchDevice, NotFound, from_netlink_error
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
    """Carry out `ops` in order. Nexthops go through `rtnl` (struct-built messages, one socket);
    the rule changes (last in a plan) go out as one fast batch; the rest through pyroute2."""
    failures: list[Failure] = []
    rules = [op for op in ops if isinstance(op, AddRule | DelRule)]
    with rtnl.Requester() as requester:
        for op in ops:
            if isinstance(op, AddRule | DelRule):
                continue
            _apply_one(ipr, requester, op, scope, failures)
    answers = rtnl.write_rules([(isinstance(op, AddRule), op.rule) for op in rules])
    for rule_op, answer in zip(rules, answers, strict=True):
        if answer is not None and not _already_done(rule_op, answer):
            answer.operation = describe(rule_op)
            failures.append(Failure(rule_op, answer))
    return Applied(len(ops) - len(failures), tuple(failures))


def _apply_one(
    ipr: IPRoute, requester: rtnl.Requester, op: Op, scope: Scope, failures: list[Failure]
) -> None:
    try:
        if isinstance(op, PutNexthop):
            oif = None if op.nexthop.is_group else _index(ipr, op.nexthop.device or "")
            requester.put_nexthop(op.nexthop, oif)
            if oif is not None and op.nexthop.gateway is not None:
                # A new member is a load-balancer that (re)appeared: maybe with a new MAC.
                requester.forget_neighbour(op.nexthop.gateway, oif)
        elif isinstance(op, DelNexthop):
            requester.delete_nexthop(op.id)
        else:
            _apply(ipr, op, scope)
    except NetlinkError as exc:
        error = from_netlink_error(exc, operation=describe(op))
        if not _already_done(op, error):
            failures.append(Failure(op, error))
    except KernelError as error:
        if not _already_done(op, error):
            failures.append(Failure(op, error))


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
    """The index of a link in the calling thread's namespace (an ioctl: no dump of every link,
    which pyroute2's `link_lookup` does)."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        raise NoSuchDevice(errno.ENODEV, None, None, f"look up {name!r}") from None


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
        case PutNexthop() | DelNexthop():
            raise AssertionError("nexthops are written by apply_all's requester")
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
