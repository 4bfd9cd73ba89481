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
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from proxy.api.networkservice.connectioncontext_pb2 import IPContext
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
