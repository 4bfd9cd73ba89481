"""The proxy's configuration: `NSM_*` environment variables, read once at start.

Every variable of the Meridio proxy keeps its upstream name, type and default (behaviour
reference §7.1); a few are new (`NSM_HEALTH_ADDRESS`, `NSM_HEALTH_TCP_ADDRESS`, `NSM_LOG_FORMAT`,
`NSM_SHUTDOWN_TIMEOUT`, `NSM_CONFIG_FILE`). Each field of `Config` carries a `Var` in its
metadata, the one source of truth for the variable's name, type, default, description and the
`--help` text.

Lookup: `NSM_<KEY>` wins; a variable with an upstream unprefixed name (`IP_FAMILY`, ...) falls
back to that name only when the `NSM_` one is absent. Unknown `NSM_*` variables are not errors
(deployments set others); `unknown_variables()` lists them so the app can warn about typos.

Validation is upstream's (`NSM_CONNECT_TO` set; MTU at least 576 for ipv4, else 1280) and stricter
where upstream silently misbehaves or panics:

* a set-but-empty variable is an error ("unset it to use the default"); upstream panics on empty
  durations and integers and silently uses "" for strings. Exception: `NSM_HEALTH_TCP_ADDRESS`,
  whose empty value means "off" (its default).
* `NSM_HOST` is required: upstream's default "" makes every node share IPAM node "" (§11.23).
* `NSM_IP_FAMILY` is ipv4/ipv6/dualstack, any case; upstream treats anything else as dualstack.
  When it is invalid, the MTU minimum is checked as for dualstack (upstream's reading).
* `NSM_LOG_LEVEL` is TRACE/DEBUG/INFO/WARNING(WARN)/ERROR, any case, plus upstream's spellings
  fatal/panic/critical for ERROR; upstream silently turns anything else into INFO.
* timeouts, intervals and lifetimes must be > 0 (upstream panics on a renew interval <= 0);
  `NSM_IP_RELEASE_DELAY` may be 0 (release at once); `NSM_SHUTDOWN_TIMEOUT` must stay below
  Kubernetes' default 30 s grace period.
* integers are plain decimal (upstream also accepts 0x.. and 0o..); MTU <= 65535, port 1..65535.
* names contain no whitespace; addresses have the forms listed in each variable's description,
  unix socket paths are absolute and fit in sun_path (107 bytes).

`load()` reports every problem at once, one line each, naming the variable and the value given.
Durations are float seconds everywhere (what trio takes), written in Go syntax (`1m30s`).
"""

# The field helpers below return attrs.field(...) specs; their defaults are immutable values.
# ruff: noqa: RUF009

import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from fractions import Fraction
from typing import Any, NewType

import attrs
import cattrs

from proxy.rpc.address import AddressError, parse_address

__all__ = [
    "METADATA_KEY",
    "Config",
    "ConfigError",
    "Duration",
    "EgressMode",
    "IpFamily",
    "LogFormat",
    "LogLevel",
    "Var",
    "describe",
    "format_duration",
    "format_duration_ns",
    "load",
    "load_environment",
    "mtu_minimum",
    "parse_duration",
    "parse_duration_ns",
    "read_env_file",
    "unknown_variables",
    "variables",
]

# ---------------------------------------------------------------------------------------------
# Durations (Go's time.ParseDuration / Duration.String, on integer nanoseconds)

Duration = NewType("Duration", float)
"""Seconds, parsed from and printed as a Go duration."""

_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # micro sign, what Go prints
    "\u03bcs": 1_000,  # Greek small mu, also accepted by Go
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_INT64_MAX = 2**63 - 1


def _leading_int(text: str) -> tuple[int, str]:
    """Go's leadingInt: the digits at the start of `text`, at most 1<<63."""
    digits = len(text) - len(text.lstrip("0123456789"))
    significant = text[:digits].lstrip("0")
    if len(significant) > 19 or int(significant or "0") > 1 << 63:
        raise ValueError("duration out of range")
    return int(significant or "0"), text[digits:]


def _leading_fraction(text: str) -> tuple[int, float, str]:
    """Go's leadingFraction: digits after the dot, as an integer and its scale, both capped."""
    digits = len(text) - len(text.lstrip("0123456789"))
    value, scale = 0, 1.0
    for char in text[:digits]:
        if value > _INT64_MAX // 10 or value * 10 + int(char) > 1 << 63:
            break  # Go ignores the digits past int64 precision
        value = value * 10 + int(char)
        scale *= 10
    return value, scale, text[digits:]


def parse_duration_ns(text: str) -> int:
    """Parse a Go duration (`300ms`, `1m30s`, `-1.5h`, `0`) into integer nanoseconds.

    Go's time.ParseDuration step by step, float fractions included, so every text gives the
    nanoseconds Go gives: an optional sign, then number+unit pairs (a lone `0` needs no unit).
    """
    negative = text.startswith("-")
    rest = text[1:] if text[:1] in ("-", "+") else text
    if rest == "0":
        return 0
    if not rest:
        raise ValueError("not a duration")
    total = 0
    while rest:
        if not (rest[0] == "." or (rest[0].isascii() and rest[0].isdigit())):
            raise ValueError("not a duration")
        length = len(rest)
        whole, rest = _leading_int(rest)
        has_whole = len(rest) != length
        frac, scale, has_frac = 0, 1.0, False
        if rest.startswith("."):
            length = len(rest) - 1
            frac, scale, rest = _leading_fraction(rest[1:])
            has_frac = len(rest) != length
        if not has_whole and not has_frac:
            raise ValueError("not a duration")
        unit_end = next((i for i, c in enumerate(rest) if c == "." or "0" <= c <= "9"), len(rest))
        unit = _NS_PER_UNIT.get(rest[:unit_end])
        if unit is None:
            raise ValueError("not a duration")
        rest = rest[unit_end:]
        if whole > (1 << 63) // unit:
            raise ValueError("duration out of range")
        value = whole * unit
        if frac:
            value += int(float(frac) * (float(unit) / scale))
        total += value
        if value > 1 << 63 or total > 1 << 63:
            raise ValueError("duration out of range")
    if negative:
        return -total
    if total > _INT64_MAX:
        raise ValueError("duration out of range")
    return total


def parse_duration(text: str) -> Duration:
    """Parse a Go duration into float seconds."""
    return Duration(float(Fraction(parse_duration_ns(text), 1_000_000_000)))


def _frac(value: int, digits: int) -> str:
    """`value / 10**digits` printed without trailing zeros (Go's fmtFrac + fmtInt)."""
    whole, rest = divmod(value, 10**digits)
    text = str(whole)
    if rest:
        text += "." + str(rest).rjust(digits, "0").rstrip("0")
    return text


def format_duration_ns(ns: int) -> str:
    """Print integer nanoseconds as Go's Duration.String does (`1h0m0s`, `1.5ms`, `0s`)."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < 1_000:
        return f"{sign}{u}ns"
    if u < 1_000_000:
        return f"{sign}{_frac(u, 3)}\u00b5s"
    if u < 1_000_000_000:
        return f"{sign}{_frac(u, 6)}ms"
    minutes, sec_ns = divmod(u, 60 * 1_000_000_000)
    text = _frac(sec_ns, 9) + "s"
    if minutes:
        hours, minutes = divmod(minutes, 60)
        text = f"{minutes}m{text}"
        if hours:
            text = f"{hours}h{text}"
    return sign + text


def format_duration(seconds: float) -> str:
    """Print float seconds as a Go duration (rounded to whole nanoseconds)."""
    return format_duration_ns(round(Fraction(seconds) * 1_000_000_000))


# ---------------------------------------------------------------------------------------------
# Value types


class IpFamily(StrEnum):
    IPV4 = "ipv4"
    IPV6 = "ipv6"
    DUALSTACK = "dualstack"


class LogLevel(StrEnum):
    TRACE = "TRACE"
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class EgressMode(StrEnum):
    AUTO = "auto"
    RESILIENT = "resilient"
    MULTIPATH = "multipath"


class IdentitySource(StrEnum):
    SPIFFE = "spiffe"  # the SPIFFE Workload API (SPIRE), as upstream
    FILES = "files"  # PEM files, reloaded when they change
    INSECURE = "insecure"  # plain text: labs and tests only


_LEVEL_SPELLINGS = {
    **{level.value: level for level in LogLevel},
    "WARN": LogLevel.WARNING,
    "FATAL": LogLevel.ERROR,
    "PANIC": LogLevel.ERROR,
    "CRITICAL": LogLevel.ERROR,
}


def mtu_minimum(family: IpFamily) -> int:
    """The smallest MTU upstream accepts: 576 for ipv4 alone, else IPv6's 1280."""
    return 576 if family is IpFamily.IPV4 else 1280


# ---------------------------------------------------------------------------------------------
# Structuring raw strings (cattrs): hooks raise ValueError(reason)


def _structure_duration(value: str, _: type) -> Duration:
    return parse_duration(value)


def _structure_int(value: str, _: type) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", value):
        raise ValueError("not an integer")
    if len(value.lstrip("+-0")) > 18:  # also keeps int() below its digit limit
        raise ValueError("out of range")
    return int(value)


def _structure_family(value: str, _: type) -> IpFamily:
    try:
        return IpFamily(value.lower())
    except ValueError:
        raise ValueError("unknown IP family") from None


def _structure_level(value: str, _: type) -> LogLevel:
    try:
        return _LEVEL_SPELLINGS[value.upper()]
    except KeyError:
        raise ValueError("unknown log level") from None


def _structure_egress_mode(value: str, _: type) -> EgressMode:
    try:
        return EgressMode(value.lower())
    except ValueError:
        raise ValueError("unknown egress mode") from None


def _structure_identity(value: str, _: type) -> IdentitySource:
    try:
        return IdentitySource(value.lower())
    except ValueError:
        raise ValueError("unknown identity source") from None


def _structure_format(value: str, _: type) -> LogFormat:
    try:
        return LogFormat(value.lower())
    except ValueError:
        raise ValueError("unknown log format") from None


_converter = cattrs.Converter()
_converter.register_structure_hook(Duration, _structure_duration)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(IpFamily, _structure_family)
_converter.register_structure_hook(LogLevel, _structure_level)
_converter.register_structure_hook(LogFormat, _structure_format)
_converter.register_structure_hook(EgressMode, _structure_egress_mode)
_converter.register_structure_hook(IdentitySource, _structure_identity)


# ---------------------------------------------------------------------------------------------
# Checks of structured values: return a reason, or None when the value is fine

Check = Callable[[Any], str | None]


def _check_name(value: str) -> str | None:
    return "contains whitespace" if re.search(r"\s", value) else None


def _check_positive(value: float) -> str | None:
    return None if value > 0 else "not greater than 0"


def _check_non_negative(value: float) -> str | None:
    return None if value >= 0 else "negative"


def _check_shutdown(value: float) -> str | None:
    if value <= 0:
        return "not greater than 0"
    return None if value < 30 else "too long"


def _check_table(value: int) -> str | None:
    if value in (0, 253, 254, 255):
        return "a reserved table"
    return None if 0 < value < 2**32 else "out of range"


def _check_rule_priority(value: int) -> str | None:
    return None if 1 <= value <= 32765 else "out of range"


def _check_buckets(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "out of range"


def _check_port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "out of range"


def _address_check(**rules: bool) -> Check:
    """A check that parses with the RPC layer's address grammar (one grammar everywhere)."""

    def check(value: str) -> str | None:
        if not value:  # only reached for NSM_HEALTH_TCP_ADDRESS, where empty means off
            return None
        try:
            parse_address(value, **rules)
        except AddressError as exc:
            return str(exc)
        return None

    return check


_check_nsm_address = _address_check()
_check_service_address = _address_check(tcp_scheme=False)
_check_listen_address = _address_check(unix=False, tcp_scheme=False, listen=True)


def _check_unix_address(value: str) -> str | None:
    if not value.startswith("unix:"):
        return "not unix://"
    return _address_check()(value)


def _check_config_file(value: str) -> str | None:
    return None if not value or value.startswith("/") else "not an absolute path"


def _check_absolute_path(value: str) -> str | None:
    return None if value.startswith("/") else "not an absolute path"


def _check_authorized_ids(value: str) -> str | None:
    if not value:
        return None
    # Imported here, not at the top: `meridio-proxy probe` (kubelet runs it every few seconds)
    # reads this module, and only a set NSM_AUTHORIZED_IDS needs the X.509 and TLS modules.
    from proxy.security.spiffe import IdentityError
    from proxy.security.tls import Authorizer

    try:
        Authorizer.parse(value.split(","))
    except IdentityError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# Field metadata


@attrs.frozen
class Var:
    """What the user sees of one field: its variable, type, default, description."""

    env: str
    kind: str  # a human type name for --help: duration, int, name, address, ipv4|ipv6|dualstack
    default: str  # as the user would write it; "" for none
    help: str  # one sentence
    expected: str  # what is accepted, for error messages; may use {mtu_min} and {family}
    alt: str | None = None  # upstream's unprefixed fallback name
    reloadable: bool = False  # SIGHUP applies a new value without a restart
    check: Check | None = None
    allow_empty: bool = False
    required: bool = False


METADATA_KEY = "proxy.config"
"""The key of each `Config` field's `Var` in its attrs metadata."""
_META = METADATA_KEY
_NAME = "a non-empty name without whitespace"
_POSITIVE = "a duration greater than 0 such as 300ms, 5s, 1m30s or 24h"


def _field(type_: Any, var: Var) -> Any:
    """An attrs field whose default is `var.default` structured like the environment's text."""
    if var.required:
        return attrs.field(metadata={_META: var})
    return attrs.field(default=_converter.structure(var.default, type_), metadata={_META: var})


def _name(env: str, default: str, help: str) -> Any:
    return _field(str, Var(env, "name", default, help, _NAME, check=_check_name))


def _duration(env: str, default: str, help: str, alt: str | None = None) -> Any:
    var = Var(env, "duration", default, help, _POSITIVE, alt=alt, check=_check_positive)
    return _field(Duration, var)


@attrs.frozen(kw_only=True)
class Config:
    """The validated configuration. Build it with `load()`; `Config(host=...)` gives defaults."""

    name: str = _name("NSM_NAME", "proxy", "Name of this proxy (the pod name): NSE name and ids.")
    service_name: str = _name(
        "NSM_SERVICE_NAME",
        "proxy",
        "Network service the proxy offers to the targets of its node; deployments set "
        "proxy.<conduit>.<trench>.<namespace>.",
    )
    connect_to: str = _field(
        str,
        Var(
            "NSM_CONNECT_TO",
            "address",
            "unix:///var/lib/networkservicemesh/nsm.io.sock",
            "The NSM manager: unix:///absolute/path, tcp://host:port or host:port.",
            "unix:///absolute/path, tcp://host:port or host:port",
            check=_check_nsm_address,
        ),
    )
    dial_timeout: Duration = _duration("NSM_DIAL_TIMEOUT", "5s", "Timeout to connect to NSM.")
    request_timeout: Duration = _duration(
        "NSM_REQUEST_TIMEOUT", "15s", "Timeout of one NSM Request or Close to a load-balancer."
    )
    max_token_lifetime: Duration = _duration(
        "NSM_MAX_TOKEN_LIFETIME", "24h", "Lifetime of the tokens the proxy issues to NSM."
    )
    ipam_service: str = _field(
        str,
        Var(
            "NSM_IPAM_SERVICE",
            "address",
            "ipam-service:7777",
            "The IPAM service: host:port, [ipv6]:port or unix:///absolute/path.",
            "host:port, [ipv6]:port or unix:///absolute/path",
            check=_check_service_address,
        ),
    )
    host: str = _field(
        str,
        Var(
            "NSM_HOST",
            "name",
            "",
            "Name of the node (spec.nodeName through the downward API).",
            "the node name (spec.nodeName through the downward API) without whitespace",
            check=_check_name,
            required=True,
        ),
    )
    network_service_name: str = _name(
        "NSM_NETWORK_SERVICE_NAME",
        "load-balancer",
        "Network service of the conduit's load-balancers; deployments set "
        "<conduit>.<trench>.<namespace>.",
    )
    namespace: str = _name(
        "NSM_NAMESPACE", "default", "Kubernetes namespace of the trench (part of the NSP address)."
    )
    trench: str = _name("NSM_TRENCH", "default", "Name of the trench.")
    conduit: str = _name("NSM_CONDUIT", "load-balancer", "Name of the conduit this proxy serves.")
    nsp_service_name: str = _name(
        "NSM_NSP_SERVICE_NAME",
        "nsp-service",
        "NSP service name; NSP is at <this>-<trench>.<namespace>:<port>.",
    )
    nsp_service_port: int = _field(
        int,
        Var(
            "NSM_NSP_SERVICE_PORT",
            "int",
            "7778",
            "NSP service port.",
            "a whole number from 1 to 65535",
            check=_check_port,
        ),
    )
    nsp_service: str = _field(
        str,
        Var(
            "NSM_NSP_SERVICE",
            "address",
            "",
            "NSP's address, when it is not <NSM_NSP_SERVICE_NAME>-<trench>.<namespace>:<port> "
            "(host:port, [ipv6]:port or unix:///path); empty or unset builds it as upstream.",
            "host:port, [ipv6]:port or unix:///absolute/path, or unset",
            check=_check_service_address,
            allow_empty=True,
        ),
    )
    ip_family: IpFamily = _field(
        IpFamily,
        Var(
            "NSM_IP_FAMILY",
            "ipv4|ipv6|dualstack",
            "dualstack",
            "IP families of the conduit (any case).",
            "ipv4, ipv6 or dualstack (any case)",
            alt="IP_FAMILY",
        ),
    )
    log_level: LogLevel = _field(
        LogLevel,
        Var(
            "NSM_LOG_LEVEL",
            "TRACE|DEBUG|INFO|WARNING|ERROR",
            "DEBUG",
            "Log level (any case; WARN, and FATAL, PANIC, CRITICAL for ERROR, also work).",
            "TRACE, DEBUG, INFO, WARNING (WARN) or ERROR (FATAL, PANIC, CRITICAL), any case",
            reloadable=True,
        ),
    )
    mtu: int = _field(
        int,
        Var(
            "NSM_MTU",
            "int",
            "1500",
            "MTU proposed for the conduit: at least 576 for ipv4, 1280 otherwise; at most 65535.",
            "a whole number from {mtu_min} to 65535 ({family})",
        ),
    )
    grpc_keepalive_time: Duration = _duration(
        "NSM_GRPC_KEEPALIVE_TIME",
        "30s",
        "Keepalive ping interval of the IPAM and NSP connections.",
        alt="GRPC_KEEPALIVE_TIME",
    )
    grpc_probe_rpc_timeout: Duration = _duration(
        "NSM_GRPC_PROBE_RPC_TIMEOUT",
        "1s",
        "Timeout of the RPC of the proxy's own NSE probe.",
        alt="GRPC_PROBE_RPC_TIMEOUT",
    )
    grpc_max_backoff: Duration = _duration(
        "NSM_GRPC_MAX_BACKOFF",
        "5s",
        "Longest wait between reconnection attempts (IPAM, NSP, NSM).",
        alt="GRPC_MAX_BACKOFF",
    )
    ip_release_delay: Duration = _field(
        Duration,
        Var(
            "NSM_IP_RELEASE_DELAY",
            "duration",
            "20s",
            "Delay before a closed connection's IP addresses return to IPAM; 0 releases at once.",
            "a duration of 0 or more such as 0, 500ms or 20s",
            alt="IP_RELEASE_DELAY",
            check=_check_non_negative,
        ),
    )
    bridge_ip_renew_interval: Duration = _duration(
        "NSM_BRIDGE_IP_RENEW_INTERVAL",
        "5m",
        "Interval between renewals of the bridge's IPAM allocation.",
        alt="BRIDGE_IP_RENEW_INTERVAL",
    )
    health_address: str = _field(
        str,
        Var(
            "NSM_HEALTH_ADDRESS",
            "address",
            "unix:///tmp/health.sock",
            "Plaintext gRPC health server for `meridio-proxy probe`: unix:///absolute/path.",
            "unix:///absolute/path",
            check=_check_unix_address,
        ),
    )
    state_dir: str = _field(
        str,
        Var(
            "NSM_STATE_DIR",
            "path",
            "/tmp",
            "Directory for what the proxy keeps across its restarts in the pod (the IPAM "
            "releases it still owes); an emptyDir volume, as /tmp in the manifests.",
            "an absolute path",
            check=_check_absolute_path,
        ),
    )
    health_tcp_address: str = _field(
        str,
        Var(
            "NSM_HEALTH_TCP_ADDRESS",
            "address",
            "",
            "Optional TCP gRPC health server for Kubernetes' grpc probes: host:port or "
            "[ipv6]:port (:port for every address); empty or unset is off.",
            "host:port, [ipv6]:port or :port, or unset for off",
            check=_check_listen_address,
            allow_empty=True,
        ),
    )
    log_format: LogFormat = _field(
        LogFormat,
        Var(
            "NSM_LOG_FORMAT",
            "json|text",
            "json",
            "Log format: json (one object per line, as upstream) or text (for humans).",
            "json or text (any case)",
            reloadable=True,
        ),
    )
    shutdown_timeout: Duration = _field(
        Duration,
        Var(
            "NSM_SHUTDOWN_TIMEOUT",
            "duration",
            "20s",
            "Total time for a graceful stop; keep it below the pod's 30s grace period.",
            "a duration greater than 0 and below 30s (Kubernetes' grace period) such as 20s",
            check=_check_shutdown,
        ),
    )

    routing_table: int = _field(
        int,
        Var(
            "NSM_ROUTING_TABLE",
            "int",
            "4096",
            "Routing table of the VIP egress routes (upstream uses 1); each conduit needs its own.",
            "a whole number from 1 to 4294967295 other than the reserved 253, 254 and 255",
            check=_check_table,
        ),
    )
    rule_priority: int = _field(
        int,
        Var(
            "NSM_RULE_PRIORITY",
            "int",
            "30000",
            "Priority of the `from <VIP> lookup <table>` rules (before the main table's 32766).",
            "a whole number from 1 to 32765",
            check=_check_rule_priority,
        ),
    )
    reconcile_interval: Duration = _duration(
        "NSM_RECONCILE_INTERVAL",
        "30s",
        "Interval of the full kernel reconcile that repairs drift (changes by hand, lost events).",
    )
    egress_mode: EgressMode = _field(
        EgressMode,
        Var(
            "NSM_EGRESS_MODE",
            "auto|resilient|multipath",
            "auto",
            "ECMP over the load-balancers: resilient nexthop group (removing an LB moves no other "
            "flow; kernel 5.13+), legacy multipath route, or auto (resilient when supported).",
            "auto, resilient or multipath (any case)",
        ),
    )
    ecmp_buckets: int = _field(
        int,
        Var(
            "NSM_ECMP_BUCKETS",
            "int",
            "128",
            "Buckets of the resilient group: the granularity of the flow spread over the LBs.",
            "a whole number from 1 to 65535",
            check=_check_buckets,
        ),
    )
    ecmp_idle_timer: Duration = _duration(
        "NSM_ECMP_IDLE_TIMER",
        "5s",
        "A bucket idle this long may move to another (e.g. a new) load-balancer.",
    )
    ecmp_unbalanced_timer: Duration = _field(
        Duration,
        Var(
            "NSM_ECMP_UNBALANCED_TIMER",
            "duration",
            "60s",
            "After this long unbalanced, busy buckets move too (their flows change LB); 0 never.",
            "a duration of 0 or more such as 0 or 60s",
            check=_check_non_negative,
        ),
    )
    identity: IdentitySource = _field(
        IdentitySource,
        Var(
            "NSM_IDENTITY",
            "spiffe|files|insecure",
            "spiffe",
            "Where the X.509 identity for mutual TLS with NSM, IPAM and NSP (and the targets)"
            " comes from: the SPIFFE Workload API (SPIFFE_ENDPOINT_SOCKET), PEM files"
            " (NSM_TLS_*_FILE), or insecure: plain text, for labs and tests only.",
            "spiffe, files or insecure (any case)",
        ),
    )
    spiffe_endpoint_socket: str = _field(
        str,
        Var(
            "SPIFFE_ENDPOINT_SOCKET",
            "address",
            "unix:///run/spire/sockets/agent.sock",
            "The SPIFFE Workload API (the SPIRE agent's socket), with NSM_IDENTITY=spiffe.",
            "unix:///absolute/path",
            check=_check_unix_address,
        ),
    )
    tls_cert_file: str = _field(
        str,
        Var(
            "NSM_TLS_CERT_FILE",
            "path",
            "",
            "With NSM_IDENTITY=files: the X.509-SVID certificate chain, PEM, the leaf first.",
            "an absolute path",
            check=_check_config_file,
            allow_empty=True,
        ),
    )
    tls_key_file: str = _field(
        str,
        Var(
            "NSM_TLS_KEY_FILE",
            "path",
            "",
            "With NSM_IDENTITY=files: the SVID's private key, PEM (EC P-256 for NSM's tokens).",
            "an absolute path",
            check=_check_config_file,
            allow_empty=True,
        ),
    )
    tls_bundle_file: str = _field(
        str,
        Var(
            "NSM_TLS_BUNDLE_FILE",
            "path",
            "",
            "With NSM_IDENTITY=files: the trust bundle, PEM CA certificates.",
            "an absolute path",
            check=_check_config_file,
            allow_empty=True,
        ),
    )
    authorized_ids: str = _field(
        str,
        Var(
            "NSM_AUTHORIZED_IDS",
            "list",
            "",
            "Peers accepted over mutual TLS, comma-separated: SPIFFE IDs (spiffe://domain/path)"
            " and trust domains (any ID in it); empty: any ID of the proxy's own trust domain.",
            "comma-separated SPIFFE IDs or trust domains, or empty",
            check=_check_authorized_ids,
            allow_empty=True,
        ),
    )
    config_file: str = _field(
        str,
        Var(
            "NSM_CONFIG_FILE",
            "path",
            "",
            "Optional file of NAME=value lines (e.g. a mounted ConfigMap) read over the "
            "environment at start and again on SIGHUP; empty or unset is none.",
            "an absolute path to a readable file, or unset for none",
            check=_check_config_file,
            allow_empty=True,
        ),
    )

    @property
    def ip_families(self) -> tuple[IpFamily, ...]:
        """The families in use, IPv4 first: (IPV4,), (IPV6,) or (IPV4, IPV6)."""
        if self.ip_family is IpFamily.DUALSTACK:
            return (IpFamily.IPV4, IpFamily.IPV6)
        return (self.ip_family,)

    @property
    def nsp_address(self) -> str:
        """Where NSP is: NSM_NSP_SERVICE, else as upstream builds it:
        `<service>-<trench>.<namespace>:<port>`."""
        if self.nsp_service:
            return self.nsp_service
        return f"{self.nsp_service_name}-{self.trench}.{self.namespace}:{self.nsp_service_port}"


class ConfigError(Exception):
    """The environment holds invalid values; `problems` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def variables() -> tuple[Var, ...]:
    """Every variable, in `Config` field order."""
    return tuple(field.metadata[_META] for field in attrs.fields(Config))


def _lookup(env: Mapping[str, str], var: Var) -> tuple[str, str] | None:
    """(name read, value) of the variable, or None when neither its name nor its alt is set."""
    for name in (var.env, var.alt):
        if name is not None and name in env:
            return name, env[name]
    return None


def load(env: Mapping[str, str]) -> Config:
    """Build the configuration from an environment; raise ConfigError with every problem."""
    values: dict[str, Any] = {}
    bad: list[tuple[int, Var, str, str | None, str]] = []  # index, var, name, value, reason
    fields: tuple[attrs.Attribute[Any], ...] = attrs.fields(Config)
    for index, field in enumerate(fields):
        var: Var = field.metadata[_META]
        found = _lookup(env, var)
        if found is None:
            if var.required:
                bad.append((index, var, var.env, None, "not set"))
            continue
        name, raw = found
        if raw == "" and not var.allow_empty:
            bad.append((index, var, name, raw, "set but empty"))
            continue
        try:
            type_: Any = field.type  # always set: the annotations are real types
            value = _converter.structure(raw, type_)
            reason = var.check(value) if var.check else None
        except ValueError as exc:
            reason = str(exc)
        if reason is None:
            values[field.name] = value
        else:
            bad.append((index, var, name, raw, reason))

    # The one rule across fields (upstream's): the MTU minimum depends on the family.
    family = values.get("ip_family", IpFamily.DUALSTACK)
    mtu = values.get("mtu")
    if mtu is not None and not mtu_minimum(family) <= mtu <= 65535:
        index = next(i for i, field in enumerate(fields) if field.name == "mtu")
        mtu_var: Var = fields[index].metadata[_META]
        name, raw = _lookup(env, mtu_var) or (mtu_var.env, "")
        bad.append((index, mtu_var, name, raw, "out of range"))

    # Files as the identity source need all three files.
    if values.get("identity") is IdentitySource.FILES:
        for index, field in enumerate(fields):
            file_var: Var = field.metadata[_META]
            if file_var.env.startswith("NSM_TLS_") and not values.get(field.name):
                bad.append((index, file_var, file_var.env, None, "not set (NSM_IDENTITY=files)"))

    if bad:
        context = {"mtu_min": mtu_minimum(family), "family": family.value}
        raise ConfigError([_problem(*b[1:], context) for b in sorted(bad, key=lambda b: b[0])])
    return Config(**values)


def _problem(var: Var, name: str, value: str | None, reason: str, context: dict[str, Any]) -> str:
    """One line: the variable, the value given, what is wrong and what is accepted."""
    if reason == "set but empty" and not var.required:
        return f"{name}='': set but empty; unset it to use the default {var.default}"
    expected = var.expected.format_map(context)
    if value is None:
        return f"{name} is {reason}; expected {expected}"
    return f"{name}={value!r}: {reason}; expected {expected}"


def read_env_file(path: str) -> dict[str, str]:
    """`NAME=value` lines (blank lines and `#` comments ignored; the value is taken verbatim).

    Raises ConfigError naming the file and line of each problem.
    """
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"NSM_CONFIG_FILE={path!r}: cannot read it ({exc})"]) from None
    values: dict[str, str] = {}
    problems = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, equals, value = line.partition("=")
        name = name.strip()
        if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problems.append(f"NSM_CONFIG_FILE={path!r}: line {number}: expected NAME=value")
        elif name == "NSM_CONFIG_FILE":
            problems.append(f"NSM_CONFIG_FILE={path!r}: line {number}: cannot name itself")
        else:
            values[name] = value
    if problems:
        raise ConfigError(problems)
    return values


def load_environment(environ: Mapping[str, str]) -> Config:
    """The configuration from the environment overlaid with NSM_CONFIG_FILE (the file wins)."""
    path = environ.get("NSM_CONFIG_FILE", "")
    if _check_config_file(path) is not None or not path:
        return load(environ)  # reports a bad path like any other bad value
    return load({**environ, **read_env_file(path)})


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """`NSM_*` names in `env` that no field reads: likely typos worth a warning."""
    known = {var.env for var in variables()}
    return sorted(name for name in env if name.startswith("NSM_") and name not in known)


def describe(config: Config) -> dict[str, str]:
    """Every variable's effective value, written as the user would write it."""
    out: dict[str, str] = {}
    for field in attrs.fields(Config):
        var: Var = field.metadata[_META]
        value = getattr(config, field.name)
        out[var.env] = format_duration(value) if var.kind == "duration" else str(value)
    return out
