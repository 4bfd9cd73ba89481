"""What the manager asks of a forwarder, and the forwarder that does nothing (control-plane tests).

The manager decides (which endpoint, which names, which IP context); a forwarder only wires:
for each connection one veth pair, one end in the client's network namespace and one in the
endpoint's, named, sized and addressed as the connection says.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from proxy.api.networkservice.connectioncontext_pb2 import IPContext


@attrs.frozen
class Wiring:
    """One connection's interfaces, as the manager resolved them."""

    connection_id: str  # the id at the manager's hop: the key of the pair
    # A path the forwarder opens: /proc/<manager pid>/fd/<n>, a namespace the client passed as
    # a descriptor (held by the manager while the pair exists); without one, a file:// inodeURL's
    # path or the client's /proc/<pid>/ns/net.
    client_netns: str
    client_ifname: str  # <= 15 characters
    endpoint_netns: str  # likewise
    endpoint_ifname: str
    mtu: int
    # Applied as NSM's kernel forwarder does: src_ip_addrs and src_routes on the client side,
    # dst_ip_addrs and dst_routes on the endpoint side, policies on the client side.
    ip_context: IPContext = attrs.field(factory=IPContext)


class Forwarder(Protocol):
    async def connect(self, wiring: Wiring) -> None:
        """Create the pair, or bring an existing one in line (a refresh): idempotent."""

    async def disconnect(self, connection_id: str) -> None:
        """Delete the pair if there is one: idempotent."""


class NoKernel:
    """A forwarder that records what it was asked and touches nothing (runs without root)."""

    def __init__(self) -> None:
        self.wired: dict[str, Wiring] = {}

    async def connect(self, wiring: Wiring) -> None:
        self.wired[wiring.connection_id] = wiring

    async def disconnect(self, connection_id: str) -> None:
        self.wired.pop(connection_id, None)
