"""The lab IPAM's decisions, pure: how a trench prefix is carved, which address comes next.

Meridio's IPAM nests three levels per IP family: the trench prefix is carved into conduit
prefixes, each conduit prefix into node prefixes, and each node prefix hands out single
addresses. Prefixes of a level all have the same length, so they are aligned: a free slot is an
index into the parent, and "first free" is the lowest index nobody holds. The first and last
address of a node prefix (network and broadcast for IPv4; kept free for IPv6 too, as upstream)
are never handed out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Literal, TypeAlias

import attrs

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Family: TypeAlias = Literal[4, 6]

DEFAULT_CONDUIT_PREFIX_LENGTH: dict[Family, int] = {4: 20, 6: 56}
DEFAULT_NODE_PREFIX_LENGTH: dict[Family, int] = {4: 24, 6: 64}


class LayoutError(ValueError):
    """A prefix layout that cannot work; the message says why."""


@attrs.frozen
class FamilyLayout:
    """How one family's trench prefix is carved."""

    prefix: Network
    conduit_length: int
    node_length: int

    @property
    def family(self) -> Family:
        return 4 if self.prefix.version == 4 else 6

    def describe(self) -> str:
        return f"{self.prefix} (conduits /{self.conduit_length}, nodes /{self.node_length})"


def make_layout(prefix: Network, conduit_length: int, node_length: int) -> FamilyLayout:
    """A checked layout: trench <= conduit <= node prefix length, and a node prefix that has at
    least one address besides its first and last."""
    bits = prefix.max_prefixlen
    if not prefix.prefixlen <= conduit_length <= bits:
        raise LayoutError(
            f"conduit prefix length /{conduit_length} does not fit in {prefix}"
            f" (from /{prefix.prefixlen} to /{bits})"
        )
    if not conduit_length <= node_length <= bits - 2:
        raise LayoutError(
            f"node prefix length /{node_length} must be from /{conduit_length} (the conduit"
            f" prefix) to /{bits - 2} (a usable address besides the first and last)"
        )
    return FamilyLayout(prefix, conduit_length, node_length)


def family_of(network: Network) -> Family:
    return 4 if network.version == 4 else 6


def _lowest_missing(taken: Iterable[int]) -> int:
    """The smallest non-negative integer not in `taken`."""
    expected = 0
    for index in sorted(set(taken)):
        if index > expected:
            break
        if index == expected:
            expected += 1
    return expected


def first_free_subnet(parent: Network, length: int, used: Iterable[Network]) -> Network | None:
    """The lowest /`length` subnet of `parent` not in `used`, or None when all are taken.

    `used` holds subnets of that length inside `parent`; anything else is ignored (it cannot
    overlap an aligned subnet of the same length without being one).
    """
    size = 1 << (parent.max_prefixlen - length)
    base = int(parent.network_address)
    taken = (
        (int(net.network_address) - base) // size
        for net in used
        if net.version == parent.version
        and net.prefixlen == length
        and 0 <= int(net.network_address) - base < parent.num_addresses
    )
    index = _lowest_missing(taken)
    if index >= 1 << (length - parent.prefixlen):
        return None
    return type(parent)((base + index * size, length))


def first_free_offset(node: Network, taken: Iterable[int]) -> int | None:
    """The lowest offset into `node` that is neither its first nor its last address nor in
    `taken` (offsets of the addresses in use), or None when the node prefix is full."""
    offset = _lowest_missing([0, *taken])
    if offset >= node.num_addresses - 1:
        return None
    return offset


def address_at(node: Network, offset: int) -> Address:
    """The address `offset` places into `node`."""
    if not 0 <= offset < node.num_addresses:
        raise ValueError(f"offset {offset} is outside {node}")
    return type(node.network_address)(int(node.network_address) + offset)


def usable_addresses(node: Network) -> int:
    """How many addresses a node prefix can hand out."""
    return max(node.num_addresses - 2, 0)
