"""The IPAM client's decisions, free of I/O: what to ask for and what an answer means.

* One `Subnet` per family, IPv4 first (upstream iterated a Go map: random order, §11.26):
  `{conduit: {name, trench: {name}}, node, ipFamily}`.
* Children: `bridge` (the gateway of each family), and `<key>-src` then `<key>-dst` per
  connection in each family. The `-src` child goes to the remote peer (target or LB), the `-dst`
  child to the proxy's own port (behaviour reference §3.3).
* An answer `Prefix{address, prefixLength}` is `address/prefixLength`, checked: a malformed or
  wrong-family answer is a `MalformedAnswer`, never an exception from deep inside ipaddress.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import attrs

from proxy.api.ipam.v1.ipam_pb2 import IPV4, IPV6, Child, IPFamily, Prefix, Subnet
from proxy.api.nsp.v1.model_pb2 import Conduit, Trench
from proxy.config import IpFamily
from proxy.kernel.model import Family, IPInterface

BRIDGE_CHILD = "bridge"

_WIRE_FAMILY: dict[Family, IPFamily] = {Family.V4: IPV4, Family.V6: IPV6}


class MalformedAnswer(ValueError):
    """IPAM answered with something that is not an address of the family asked for."""


@attrs.frozen
class Owner:
    """Whose addresses these are: one node's share of one conduit (the Subnet's fields)."""

    trench: str
    conduit: str
    node: str
    families: tuple[Family, ...] = (Family.V4, Family.V6)

    def __attrs_post_init__(self) -> None:
        if not self.families or len(set(self.families)) != len(self.families):
            raise ValueError(f"families must be distinct and not empty: {self.families}")
        # IPv4 first, whatever order was given: address lists compare equal across runs.
        object.__setattr__(self, "families", tuple(sorted(self.families)))


def families_of(ip_family: IpFamily) -> tuple[Family, ...]:
    """NSM_IP_FAMILY as kernel families, IPv4 first."""
    return {
        IpFamily.IPV4: (Family.V4,),
        IpFamily.IPV6: (Family.V6,),
        IpFamily.DUALSTACK: (Family.V4, Family.V6),
    }[ip_family]


def subnet(owner: Owner, family: Family) -> Subnet:
    return Subnet(
        conduit=Conduit(name=owner.conduit, trench=Trench(name=owner.trench)),
        node=owner.node,
        ipFamily=_WIRE_FAMILY[family],
    )


def child(owner: Owner, family: Family, name: str) -> Child:
    return Child(name=name, subnet=subnet(owner, family))


def pair_names(key: str) -> tuple[str, str]:
    """The `-src` and `-dst` child names of a connection key, in allocation order."""
    if not key:
        raise ValueError("the IPAM key of a connection must not be empty")
    return f"{key}-src", f"{key}-dst"


def pair_children(key: str, families: Iterable[Family]) -> tuple[tuple[Family, str], ...]:
    """Every child of a key, in allocation order: per family (IPv4 first) -src then -dst."""
    names = pair_names(key)
    return tuple((family, name) for family in sorted(families) for name in names)


def parse_prefix(prefix: Prefix, family: Family) -> IPInterface:
    """The address IPAM gave, with the node subnet's length."""
    try:
        interface = ipaddress.ip_interface(f"{prefix.address}/{prefix.prefixLength}")
    except ValueError:
        raise MalformedAnswer(
            f"not an address with prefix length: {prefix.address!r}/{prefix.prefixLength}"
        ) from None
    if Family.of(interface) is not family:
        raise MalformedAnswer(f"asked for IPv{4 if family is Family.V4 else 6}, got {interface}")
    return interface


@attrs.frozen
class AddressPair:
    """A connection's addresses, one per family, IPv4 first: `src` for the remote peer (the
    `-src` children), `dst` for the proxy's own port (the `-dst` children)."""

    src: tuple[IPInterface, ...]
    dst: tuple[IPInterface, ...]


def address_pair(key: str, allocated: dict[tuple[Family, str], IPInterface]) -> AddressPair:
    """The pair out of every child of `key` allocated, by (family, name)."""
    src_name, dst_name = pair_names(key)
    families = sorted({family for family, _ in allocated})
    return AddressPair(
        src=tuple(allocated[(family, src_name)] for family in families),
        dst=tuple(allocated[(family, dst_name)] for family in families),
    )


def describe(addresses: Iterable[IPInterface]) -> str:
    """`198.18.0.1/24,2001:db8:100::1/64` (IPv4 first) for log lines."""
    return ",".join(str(a) for a in sorted(addresses, key=lambda a: (a.version, a)))
