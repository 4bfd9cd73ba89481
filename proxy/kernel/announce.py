"""Gratuitous ARP and unsolicited Neighbour Advertisement: "this address is at this MAC now".

Sent when the bridge gets an address (or a new MAC), so targets and load-balancers update their
neighbour caches at once instead of black-holing traffic until their entries age out.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from proxy.kernel.model import IPInterface

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ALL_NODES = "ff02::1"
ICMPV6_NA = 136
NA_OVERRIDE = 0x20000000
OPTION_TARGET_LLADDR = 2


def announce(ifindex: int, ifname: str, address: IPInterface, mac: str) -> None:
    mac_bytes = bytes.fromhex(mac.replace(":", ""))
    if address.version == 4:
        _gratuitous_arp(ifname, address.ip, mac_bytes)
    else:
        _unsolicited_na(ifindex, address.ip, mac_bytes)


def arp_frame(ip: ipaddress.IPv4Address, mac: bytes) -> bytes:
    """A broadcast ARP request for our own address (what `arping -U` sends)."""
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + ip.packed + bytes(6) + ip.packed
    return BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp


def na_message(ip: ipaddress.IPv6Address, mac: bytes) -> bytes:
    """ICMPv6 NA with the Override flag and our link-layer address (checksum by the kernel)."""
    header = struct.pack("!BBHI", ICMPV6_NA, 0, 0, NA_OVERRIDE)
    option = struct.pack("!BB", OPTION_TARGET_LLADDR, 1) + mac
    return header + ip.packed + option


def _gratuitous_arp(ifname: str, ip: ipaddress.IPv4Address, mac: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP)) as sock:
        sock.bind((ifname, ETH_P_ARP))
        sock.send(arp_frame(ip, mac))


def _unsolicited_na(ifindex: int, ip: ipaddress.IPv6Address, mac: bytes) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
        sock.bind((str(ip), 0, 0, ifindex))
        sock.sendto(na_message(ip, mac), (ALL_NODES, 0, 0, ifindex))
