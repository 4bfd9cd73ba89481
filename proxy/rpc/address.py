"""gRPC addresses, the one grammar used by the configuration, the CLI and the RPC layer.

Accepted: `unix:///abs/path` (also `unix:/abs/path`), `host:port`, `[v6]:port`, and, where the
caller allows it, `tcp://host:port` (NSM writes its URLs that way) or `:port` (listen on every
address). Hosts are DNS names or IPv4 addresses; IPv6 needs brackets. Parsing is pure and strict:
a bad address is a configuration error, reported with the reason.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

import attrs

_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(\.{_LABEL})*\.?")


class AddressError(ValueError):
    """The text is not an address this layer can dial or serve; the message is the reason."""


@attrs.frozen
class UnixAddress:
    path: str

    @property
    def authority(self) -> str:
        # What grpc-go sends for unix targets (grpcio sends the percent-encoded path); servers
        # route nothing on it.
        return "localhost"

    def __str__(self) -> str:
        return f"unix://{self.path}"


@attrs.frozen
class TcpAddress:
    host: str  # "" only in listen addresses: every local address
    port: int

    @property
    def authority(self) -> str:
        return f"{self.host_literal}:{self.port}"

    @property
    def host_literal(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return self.authority


Address = UnixAddress | TcpAddress


def parse_address(
    text: str, *, unix: bool = True, tcp_scheme: bool = True, listen: bool = False
) -> Address:
    """Parse an address; raises AddressError with the reason.

    `unix=False` refuses unix addresses, `tcp_scheme=False` refuses `tcp://`, and `listen=True`
    accepts an empty host (`:port`).
    """
    if text.startswith("unix:"):
        if not unix:
            raise AddressError("unix addresses are not accepted here")
        return UnixAddress(_unix_path(text))
    rest = text
    if text.startswith("tcp://"):
        if not tcp_scheme:
            raise AddressError("unexpected scheme")
        rest = text[len("tcp://") :]
    if "://" in rest:
        raise AddressError("unexpected scheme")
    return _host_port(rest, listen=listen)


def _unix_path(text: str) -> str:
    path = text[len("unix:") :]
    if path.startswith("//"):
        path = path[2:]
    path = urllib.parse.unquote(path)
    if not path.startswith("/") or path == "/":
        raise AddressError("socket path not absolute")
    if "\0" in path or len(path.encode()) > _SUN_PATH_MAX:
        raise AddressError("socket path too long or not valid")
    return path


def _host_port(text: str, *, listen: bool) -> TcpAddress:
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise AddressError("not [ipv6]:port")
        host, port = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError("not a valid IPv6 address in brackets") from None
    else:
        host, colon, port = text.rpartition(":")
        if not colon:
            raise AddressError("missing :port")
        if host or not listen:
            _check_host(host)
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise AddressError("port not from 1 to 65535")
    return TcpAddress(host, int(port))


def _check_host(host: str) -> None:
    if not host:
        raise AddressError("missing host")
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        reason = "IPv6 without brackets" if ":" in host else "not a host name or IPv4 address"
        raise AddressError(reason)
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise AddressError("not a valid IPv4 address") from None
