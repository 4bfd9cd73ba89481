"""The one address grammar (config, CLI and RPC layer share it)."""

from __future__ import annotations

import pytest

from proxy.rpc.address import AddressError, TcpAddress, UnixAddress, parse_address


@pytest.mark.parametrize(
    ("text", "rules", "expected"),
    [
        ("ipam-service:7777", {}, TcpAddress("ipam-service", 7777)),
        ("ipam-service-red.ns.svc.cluster.local.:7777", {}, None),
        ("198.18.0.1:1", {}, TcpAddress("198.18.0.1", 1)),
        ("[2001:db8::1]:65535", {}, TcpAddress("2001:db8::1", 65535)),
        ("tcp://nsmgr:5001", {}, TcpAddress("nsmgr", 5001)),
        ("[::]:5005", {"listen": True}, TcpAddress("::", 5005)),
        (":5005", {"listen": True}, TcpAddress("", 5005)),
        ("unix:///tmp/health.sock", {}, UnixAddress("/tmp/health.sock")),
        ("unix:/tmp/health.sock", {}, UnixAddress("/tmp/health.sock")),
        ("unix:///tmp/a%20b.sock", {}, UnixAddress("/tmp/a b.sock")),
    ],
)
def test_valid_addresses(text: str, rules: dict[str, bool], expected: object) -> None:
    address = parse_address(text, **rules)
    if expected is not None:
        assert address == expected


@pytest.mark.parametrize(
    ("text", "rules", "reason"),
    [
        (":5005", {}, "missing host"),
        ("2001:db8::1:7777", {}, "IPv6 without brackets"),
        ("ipam_service:7777", {}, "not a host name or IPv4 address"),
        ("198.18.0.300:1", {}, "not a valid IPv4 address"),
        ("ipam:0", {}, "port not from 1 to 65535"),
        ("ipam", {}, "missing :port"),
        ("[2001:db8::zz]:1", {}, "not a valid IPv6 address in brackets"),
        ("http://x:1", {}, "unexpected scheme"),
        ("tcp://x:1", {"tcp_scheme": False}, "unexpected scheme"),
        ("unix:///x", {"unix": False}, "unix addresses are not accepted here"),
        ("unix://relative.sock", {}, "socket path not absolute"),
        ("unix:///" + "x" * 200, {}, "socket path too long or not valid"),
    ],
)
def test_invalid_addresses_say_why(text: str, rules: dict[str, bool], reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        parse_address(text, **rules)


def test_authority_brackets_ipv6() -> None:
    assert parse_address("[2001:db8::1]:80").authority == "[2001:db8::1]:80"
    assert parse_address("unix:///x.sock").authority == "localhost"
