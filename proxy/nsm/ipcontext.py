"""IP-context decisions (pure): which addresses a connection's interfaces get.

Upstream's rules (behaviour reference §3.3, pinned by its unit tests §10.1): the `-src` child
always goes to the remote peer (target or load-balancer), the `-dst` child to the proxy's own
port; a target also gets the bridge addresses as gateways (`extra_prefixes`). Fixed here:

* §11.18: a rebuild whose old context had no gateways kept every old address (they piled up);
  here the addresses in the node subnet (old and new gateway subnets) are replaced, whatever
  was there, and only addresses outside it (the target's VIPs) are kept;
* §11.26: families in a fixed order, IPv4 first (upstream iterated a Go map);
* the "update gateways" branch upstream could never reach: a changed bridge address rewrites
  the gateways and the policy routes' next hops.

The functions take the current context and return a new one; they never change their input.

`context_problems` checks a client's context before anything is built on it: the proxy hands
the addresses and routes back to NSM, whose forwarder writes them to the kernel, so a value that
is not an address must be refused at the edge (INVALID_ARGUMENT) rather than echoed back.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

from proxy.api.networkservice.connectioncontext_pb2 import IPContext, Route
from proxy.kernel.model import IPInterface


def nsc_context(
    current: IPContext, *, src: Sequence[IPInterface], dst: Sequence[IPInterface]
) -> IPContext:
    """The proxy as a client of a load-balancer: the proxy's port gets the `-dst` addresses
    (`src_ip_addrs`, the client side), the LB's interface the `-src` ones (`dst_ip_addrs`)."""
    context = _copy(current)
    del context.src_ip_addrs[:]
    del context.dst_ip_addrs[:]
    context.src_ip_addrs.extend(_texts(dst))
    context.dst_ip_addrs.extend(_texts(src))
    return context


def nse_context(
    current: IPContext,
    *,
    src: Sequence[IPInterface],
    dst: Sequence[IPInterface],
    gateways: Sequence[IPInterface],
) -> IPContext:
    """The proxy as the endpoint of a target: the target gets `src` (plus its own VIPs, which
    it adds to `src_ip_addrs` itself), the proxy's port `dst`, and the bridge addresses as
    gateways. A context that already holds all of it is returned unchanged."""
    new_src, new_dst, new_gateways = _texts(src), _texts(dst), _texts(gateways)
    if not current.src_ip_addrs and not current.dst_ip_addrs:
        context = _copy(current)
        context.src_ip_addrs.extend(new_src)
        context.dst_ip_addrs.extend(new_dst)
        del context.extra_prefixes[:]
        context.extra_prefixes.extend(new_gateways)
        return context
    if (
        set(new_gateways) <= set(current.extra_prefixes)
        and set(new_src) <= set(current.src_ip_addrs)
        and set(new_dst) <= set(current.dst_ip_addrs)
    ):
        return _copy(current)
    return _rebuild(current, new_src, new_dst, gateways)


def _rebuild(
    current: IPContext,
    new_src: list[str],
    new_dst: list[str],
    gateways: Sequence[IPInterface],
) -> IPContext:
    """Replace everything in the node subnet (old and new gateways' subnets), keep the rest."""
    subnets = [g.network for g in gateways] + [
        ipaddress.ip_interface(text).network for text in current.extra_prefixes if _valid(text)
    ]
    context = _copy(current)
    kept_src = [a for a in current.src_ip_addrs if not _inside(a, subnets)]
    kept_dst = [a for a in current.dst_ip_addrs if not _inside(a, subnets)]
    del context.src_ip_addrs[:]
    del context.dst_ip_addrs[:]
    context.src_ip_addrs.extend(_unique(new_src + kept_src))
    context.dst_ip_addrs.extend(_unique(new_dst + kept_dst))
    del context.extra_prefixes[:]
    context.extra_prefixes.extend(_texts(gateways))
    by_family = {g.version: str(g.ip) for g in gateways}
    for policy in context.policies:
        source = getattr(policy, "from")
        if not _valid(source):
            continue
        hop = by_family.get(ipaddress.ip_interface(source).version, "")
        for route in policy.routes:
            route.nextHop = hop
    return context


_ADDRESS = re.compile(r"[0-9A-Fa-f:.]+")
_WITH_LENGTH = re.compile(r"[0-9A-Fa-f:.]+/[0-9]{1,3}")
_SHOWN_CHARACTERS = 60  # of a bad value in a message (a client could send anything)
_PROBLEMS_SHOWN = 5


def context_problems(context: IPContext) -> list[str]:
    """Each value of a client's IP context that is not what NSM's forwarder expects there
    (empty: none): `address/length` in the address and prefix lists, the routes' prefixes and
    the policies' `from`; a plain address as a next hop or neighbour. Pure; at most
    `_PROBLEMS_SHOWN` problems and a count of the rest."""
    problems: list[str] = []
    for field in ("src_ip_addrs", "dst_ip_addrs", "excluded_prefixes", "extra_prefixes"):
        for index, text in enumerate(getattr(context, field)):
            if not _is_interface(text):
                problems.append(f"{field}[{index}] {_shown(text)} is not an address/length")
    for field in ("src_routes", "dst_routes"):
        for index, route in enumerate(getattr(context, field)):
            problems += _route_problems(f"{field}[{index}]", route)
    for index, policy in enumerate(context.policies):
        source = getattr(policy, "from")
        if source and not _is_interface(source):
            problems.append(f"policies[{index}].from {_shown(source)} is not an address/length")
        for number, route in enumerate(policy.routes):
            problems += _route_problems(f"policies[{index}].routes[{number}]", route)
    for index, neighbour in enumerate(context.ip_neighbors):
        if not _is_address(neighbour.ip):
            problems.append(f"ip_neighbors[{index}].ip {_shown(neighbour.ip)} is not an address")
    if len(problems) > _PROBLEMS_SHOWN:
        left = len(problems) - _PROBLEMS_SHOWN
        problems = [*problems[:_PROBLEMS_SHOWN], f"and {left} more"]
    return problems


def _route_problems(where: str, route: Route) -> list[str]:
    problems = []
    if not _is_interface(route.prefix):
        problems.append(f"{where}.prefix {_shown(route.prefix)} is not an address/length")
    if route.nextHop and not _is_address(route.nextHop):
        problems.append(f"{where}.nextHop {_shown(route.nextHop)} is not an address")
    return problems


def _is_interface(text: str) -> bool:
    """`address/length`, written plainly (no netmask form, scope or whitespace)."""
    return _WITH_LENGTH.fullmatch(text) is not None and _valid(text)


def _is_address(text: str) -> bool:
    if _ADDRESS.fullmatch(text) is None:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _shown(text: str) -> str:
    if len(text) > _SHOWN_CHARACTERS:
        return repr(text[:_SHOWN_CHARACTERS]) + f"...({len(text)} characters)"
    return repr(text)


def _copy(context: IPContext) -> IPContext:
    copy = IPContext()
    copy.CopyFrom(context)
    return copy


def _texts(addresses: Iterable[IPInterface]) -> list[str]:
    """`address/prefix` strings, IPv4 first."""
    return [str(a) for a in sorted(addresses, key=lambda a: a.version)]


def _valid(text: str) -> bool:
    try:
        ipaddress.ip_interface(text)
    except ValueError:
        return False
    return True


def _inside(text: str, subnets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if not _valid(text):
        return False
    address = ipaddress.ip_interface(text).ip
    return any(address.version == net.version and address in net for net in subnets)


def _unique(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))
