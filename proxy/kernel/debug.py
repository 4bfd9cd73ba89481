"""`meridio-proxy debug`: the proxy namespace's network state as one JSON document.

Upstream's `--debug` (behaviour reference §7.5) prints one JSON object and exits 0. This one
keeps that contract and fixes its bugs: routes of *every* table (upstream lists only main, so
the proxy's own table never shows), a rule's source whatever else the rule has, and neighbour
states as names (upstream's mapping is inverted). It adds nexthop objects, the sysctls, and the
proxy's own view of what it manages.

It runs where the proxy runs (`kubectl exec ... meridio-proxy debug`), in the current network
namespace; `--netns NAME` enters an `ip netns` namespace first (the lab). Everything is read
from one thread inside that namespace (netlink, /proc/sys, `ip`), with one plain pyroute2
socket: nothing here runs inside the proxy's trio loop.

Each section is collected on its own: a section that fails is `{"error": "..."}` and the others
still print. Exit status: 0 with the document, 1 when the namespace or the netlink socket cannot
be opened at all, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import datetime
import enum
import ipaddress
import json
import os
import platform
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, Set
from importlib import metadata
from typing import Any

import attrs
import cattrs
from pyroute2 import IPRoute

import proxy
from proxy import config
from proxy.kernel.model import Family, Scope
from proxy.kernel.netlink import in_netns
from proxy.kernel.settings import scope_from_config

__all__ = [
    "SECTIONS",
    "Collector",
    "Sources",
    "collect",
    "dump",
    "environment",
    "interfaces",
    "main",
    "managed",
    "neighbours",
    "nexthops",
    "nud_state_name",
    "render",
    "routes",
    "rules",
    "sysctls",
    "system",
]

PROG = "meridio-proxy debug"


@attrs.frozen
class Sources:
    """What the collectors read from: a netlink socket opened in the right namespace (and
    called on the thread inside it), the environment, and the managed objects' scope."""

    ipr: Any  # pyroute2.IPRoute
    environ: Mapping[str, str] = attrs.field(factory=lambda: dict(os.environ))
    scope: Scope = attrs.field(factory=Scope)


Collector = Callable[[Sources], Any]


# -- names for kernel numbers ----------------------------------------------------------------

_FAMILY = {
    socket.AF_INET: "ipv4",
    socket.AF_INET6: "ipv6",
    socket.AF_UNSPEC: "unspec",
    socket.AF_BRIDGE: "bridge",
    128: "ipmr",
    129: "ip6mr",
}
_RULE_ACTION = {
    0: "unspec",
    1: "lookup",
    2: "goto",
    3: "nop",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
}
_ROUTE_TYPE = {
    0: "unspec",
    1: "unicast",
    2: "local",
    3: "broadcast",
    4: "anycast",
    5: "multicast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
    9: "throw",
    10: "nat",
    11: "xresolve",
}
_PROTOCOL = {
    0: "unspec",
    1: "redirect",
    2: "kernel",
    3: "boot",
    4: "static",
    16: "dhcp",
    42: "babel",
    186: "bgp",
    187: "isis",
    188: "ospf",
    189: "rip",
    192: "eigrp",
}
_SCOPE = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
_TABLE = {253: "default", 254: "main", 255: "local"}
# include/uapi/linux/neighbour.h
_NUD = (
    (0x01, "INCOMPLETE"),
    (0x02, "REACHABLE"),
    (0x04, "STALE"),
    (0x08, "DELAY"),
    (0x10, "PROBE"),
    (0x20, "FAILED"),
    (0x40, "NOARP"),
    (0x80, "PERMANENT"),
)
_NTF = ((0x08, "proxy"), (0x10, "extern_learn"), (0x80, "router"))
# include/uapi/linux/if_addr.h
_IFA_FLAGS = (
    (0x01, "secondary"),
    (0x02, "nodad"),
    (0x04, "optimistic"),
    (0x08, "dadfailed"),
    (0x10, "homeaddress"),
    (0x20, "deprecated"),
    (0x40, "tentative"),
    (0x80, "permanent"),
    (0x100, "mngtmpaddr"),
    (0x200, "noprefixroute"),
    (0x400, "autojoin"),
    (0x800, "stable-privacy"),
)
IFF_UP = 0x1
NUD_NOARP = 0x40
RTA_NH_ID = 30
_NLMSG_HEADER = 16
_RTMSG = 12


def _name(table: Mapping[int, str], number: int) -> str | int:
    return table.get(number, number)


def _flags(bits: tuple[tuple[int, str], ...], value: int) -> list[str]:
    return [name for bit, name in bits if value & bit]


def nud_state_name(state: int) -> str:
    """A neighbour's NUD state as `ip neigh` names it: REACHABLE, STALE, ... (NONE for 0)."""
    names = _flags(_NUD, state)
    unknown = state & ~sum(bit for bit, _ in _NUD)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names) or "NONE"


def _cidr(address: str | None, length: int, family: int) -> str:
    if address is None:
        address = "0.0.0.0" if family == socket.AF_INET else "::"
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False))


def _link_names(ipr: Any) -> dict[int, str]:
    return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.link("dump")}


# -- sections ------------------------------------------------------------------------------------


def interfaces(sources: Sources) -> list[dict[str, Any]]:
    ipr = sources.ipr
    links = list(ipr.link("dump"))
    names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
    addresses: dict[int, list[dict[str, Any]]] = {}
    for message in ipr.addr("dump"):
        family = message["family"]
        address = message.get_attr("IFA_ADDRESS") or message.get_attr("IFA_LOCAL")
        flags = message.get_attr("IFA_FLAGS")
        addresses.setdefault(message["index"], []).append(
            {
                "address": f"{address}/{message['prefixlen']}",
                "family": _name(_FAMILY, family),
                "scope": _name(_SCOPE, message["scope"]),
                "flags": _flags(_IFA_FLAGS, message["flags"] if flags is None else flags),
            }
        )
    found = []
    for link in links:
        info = link.get_attr("IFLA_LINKINFO")
        stats = link.get_attr("IFLA_STATS64") or {}
        master = link.get_attr("IFLA_MASTER")
        found.append(
            {
                "index": link["index"],
                "name": link.get_attr("IFLA_IFNAME"),
                "kind": (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or "",
                "mac": link.get_attr("IFLA_ADDRESS"),
                "mtu": link.get_attr("IFLA_MTU"),
                "up": bool(link["flags"] & IFF_UP),
                "operstate": link.get_attr("IFLA_OPERSTATE"),
                "master": None if not master else {"index": master, "name": names.get(master)},
                "addresses": addresses.get(link["index"], []),
                "stats": {
                    direction: {
                        what: stats.get(f"{direction}_{what}")
                        for what in ("packets", "bytes", "errors", "dropped")
                    }
                    for direction in ("rx", "tx")
                },
            }
        )
    return found


def rules(sources: Sources) -> list[dict[str, Any]]:
    found = []
    for message in sources.ipr.rule("dump"):
        family = message["family"]
        source = message.get_attr("FRA_SRC")
        destination = message.get_attr("FRA_DST")
        table = message.get_attr("FRA_TABLE") or message["table"]
        found.append(
            {
                "family": _name(_FAMILY, family),
                "priority": message.get_attr("FRA_PRIORITY") or 0,
                # Upstream fills the source only when the rule also has a destination.
                "source": _cidr(source, message["src_len"], family) if source else "all",
                "destination": _cidr(destination, message["dst_len"], family)
                if destination
                else None,
                "table": table,
                "table_name": _TABLE.get(table),
                "iif": message.get_attr("FRA_IIFNAME"),
                "oif": message.get_attr("FRA_OIFNAME"),
                "fwmark": message.get_attr("FRA_FWMARK"),
                "goto": message.get_attr("FRA_GOTO"),
                "action": _name(_RULE_ACTION, message["action"]),
            }
        )
    return found


def _raw_u32(message: Any, attr_type: int) -> int | None:
    """A u32 route attribute that pyroute2's `rtmsg` does not decode (RTA_NH_ID), read from the
    message's bytes: rtmsg header, then NLAs of (u16 length, u16 type, payload), 4-aligned."""
    data = getattr(message, "data", None)
    start = getattr(message, "offset", None)
    if data is None or start is None:
        return None
    end = start + message["header"]["length"]
    position = start + _NLMSG_HEADER + _RTMSG
    while position + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, position)
        if length < 4:
            return None
        if kind & 0x3FFF == attr_type and length >= 8:
            value: int = struct.unpack_from("=I", data, position + 4)[0]
            return value
        position += (length + 3) & ~3
    return None


def routes(sources: Sources) -> list[dict[str, Any]]:
    """Every route of every table (upstream's lists only the main table)."""
    ipr = sources.ipr
    names = _link_names(ipr)
    found = []
    for message in ipr.route("dump"):
        family = message["family"]
        table = message.get_attr("RTA_TABLE") or message["table"]
        destination = message.get_attr("RTA_DST")
        length = message["dst_len"]
        oif = message.get_attr("RTA_OIF")
        nexthop_id = message.get_attr("RTA_NH_ID")  # decoded once nexthop.py registered it
        if nexthop_id is None:
            nexthop_id = _raw_u32(message, RTA_NH_ID)
        multipath = [
            {
                "gateway": hop.get_attr("RTA_GATEWAY"),
                "interface": names.get(hop["oif"]),
                "weight": hop["hops"] + 1,
                "flags": hop["flags"],
            }
            for hop in message.get_attr("RTA_MULTIPATH") or []
        ]
        found.append(
            {
                "table": table,
                "table_name": _TABLE.get(table),
                "family": _name(_FAMILY, family),
                "type": _name(_ROUTE_TYPE, message["type"]),
                "destination": "default" if length == 0 else _cidr(destination, length, family),
                "source": _cidr(message.get_attr("RTA_SRC"), message["src_len"], family)
                if message["src_len"]
                else None,
                "gateway": message.get_attr("RTA_GATEWAY"),
                "interface": names.get(oif) if oif else None,
                "preferred_source": message.get_attr("RTA_PREFSRC"),
                "metric": message.get_attr("RTA_PRIORITY") or 0,
                "protocol": _name(_PROTOCOL, message["proto"]),
                "scope": _name(_SCOPE, message["scope"]),
                "nexthop_id": nexthop_id,
                # With a nexthop id these are the kernel's expansion of it (nexthop_compat_mode).
                "multipath": multipath,
            }
        )
    return found


def nexthops(sources: Sources) -> list[dict[str, Any]]:
    """Nexthop objects and groups; for a resilient group, how many buckets each member has."""
    from proxy.kernel import nexthop

    ipr = sources.ipr
    names = _link_names(ipr)
    found = []
    for record in nexthop.dump_nexthops(ipr):
        item: dict[str, Any] = {
            "id": record.id,
            "family": _name(_FAMILY, record.family),
            "protocol": _name(_PROTOCOL, record.protocol),
            "gateway": record.gateway,
            "interface": names.get(record.oif) if record.oif else None,
            "blackhole": record.blackhole,
            "group": [{"id": member.id, "weight": member.weight} for member in record.group],
            "group_type": None if record.group_type is None else record.group_type.name.lower(),
            "resilient": None,
        }
        if record.resilient is not None:
            item["resilient"] = {
                **attrs.asdict(record.resilient),
                "unbalanced_time": record.unbalanced_time,
            }
            try:
                counts: dict[int, int] = {}
                for bucket in nexthop.dump_buckets(ipr, record.id):
                    counts[bucket.nhid] = counts.get(bucket.nhid, 0) + 1
                item["resilient"]["buckets_per_member"] = counts
            except Exception as exc:
                item["resilient"]["buckets_per_member"] = {"error": _error_text(exc)}
        found.append(item)
    return found


def neighbours(sources: Sources) -> list[dict[str, Any]]:
    """ARP and NDP entries, with their state named as `ip neigh` does (REACHABLE, STALE, ...)."""
    ipr = sources.ipr
    names = _link_names(ipr)
    found = []
    for message in ipr.neigh("dump"):
        family = message["family"]
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue  # bridge fdb entries: not neighbours
        if message["state"] == NUD_NOARP:
            continue  # multicast mappings, as `ip neigh` hides them too
        found.append(
            {
                "ip": message.get_attr("NDA_DST"),
                "family": _name(_FAMILY, family),
                "mac": message.get_attr("NDA_LLADDR"),
                "state": nud_state_name(message["state"]),
                "flags": _flags(_NTF, message["flags"]),
                "interface": names.get(message["ifindex"]),
                "index": message["ifindex"],
            }
        )
    return found


def sysctls(sources: Sources) -> dict[str, Any]:
    """The values of the sysctls the proxy needs, read (never written) in this namespace."""
    from proxy.kernel import sysctl

    found: dict[str, Any] = {}
    for wanted in sysctl.REQUIRED:
        value = sysctl.read_proc(wanted.name)
        found[wanted.name] = {
            "value": value,
            "needed": wanted.value,
            "ok": value is not None and value.split() == wanted.value.split(),
        }
    return found


def _meminfo() -> dict[str, int]:
    values = {}
    with open("/proc/meminfo") as file:
        for line in file:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                values[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return values


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def system(sources: Sources) -> dict[str, Any]:
    uname = os.uname()
    memory = _meminfo()
    load = os.getloadavg()
    return {
        "kernel": uname.release,
        "machine": uname.machine,
        "hostname": uname.nodename,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_total_bytes": memory.get("MemTotal"),
        "memory_available_bytes": memory.get("MemAvailable"),
        "load_average": {"1m": load[0], "5m": load[1], "15m": load[2]},
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in ("pyroute2", "trio", "purerpc")},
    }


_SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "KEY")


def environment(sources: Sources) -> dict[str, str]:
    """Every NSM_* and SPIFFE_* variable, and the unprefixed names the config falls back to.
    Values of names that look secret are hidden (none of the proxy's own are)."""
    from proxy import config

    fallbacks = {var.alt for var in config.variables() if var.alt}
    found = {}
    for name, value in sources.environ.items():
        if name.startswith(("NSM_", "SPIFFE_")) or name in fallbacks:
            secret = any(word in name.upper() for word in _SECRET_WORDS)
            found[name] = "(hidden)" if secret else value
    return found


def _converter() -> cattrs.Converter:
    def key(item: Any) -> str:
        return json.dumps(item, sort_keys=True, default=str)

    converter = cattrs.Converter(unstruct_collection_overrides={Set: lambda i: sorted(i, key=key)})
    ip_types = (
        ipaddress.IPv4Address,
        ipaddress.IPv6Address,
        ipaddress.IPv4Network,
        ipaddress.IPv6Network,
    )  # the Interface types subclass the Address types
    converter.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, ip_types), str
    )
    converter.register_unstructure_hook_func(
        lambda t: isinstance(t, type) and issubclass(t, enum.Enum),
        lambda value: value.name.lower(),
    )
    converter.register_unstructure_hook(Family, lambda value: _FAMILY[value.value])
    return converter


def managed(sources: Sources) -> dict[str, Any]:
    """The proxy's view of the objects it manages (what its reconciler compares against)."""
    converter = _converter()
    result: dict[str, Any] = {"scope": converter.unstructure(sources.scope)}
    try:
        from proxy.kernel.observe import observe

        result["observed"] = converter.unstructure(observe(sources.scope))
    except Exception as exc:
        result["error"] = _error_text(exc)
    return result


SECTIONS: dict[str, Collector] = {
    "interfaces": interfaces,
    "rules": rules,
    "routes": routes,
    "nexthops": nexthops,
    "neighbours": neighbours,
    "sysctls": sysctls,
    "system": system,
    "environment": environment,
    "managed": managed,  # last: it registers nexthop.py's message classes on the socket
}


# -- the document ---------------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def collect(sources: Sources, sections: Mapping[str, Collector] = SECTIONS) -> dict[str, Any]:
    """The whole document; a section that raises becomes {"error": "..."}."""
    now = time.time()
    document: dict[str, Any] = {
        "version": proxy.__version__,
        "time": datetime.datetime.fromtimestamp(now, datetime.UTC).isoformat(
            timespec="milliseconds"
        ),
        "unix-time": int(now),
    }
    for name, collector in sections.items():
        try:
            document[name] = collector(sources)
        except Exception as exc:
            document[name] = {"error": _error_text(exc)}
    return document


def dump(
    netns: str | None = None,
    *,
    sections: Mapping[str, Collector] = SECTIONS,
    environ: Mapping[str, str] | None = None,
    scope: Scope | None = None,
) -> dict[str, Any]:
    """Collect the document on a thread inside `netns` (this thread when None).

    Raises (OSError, ...) only when the namespace cannot be entered or the netlink socket not
    be opened; the sections catch their own errors.
    """
    env = dict(os.environ if environ is None else environ)

    def job() -> dict[str, Any]:
        with IPRoute() as ipr:
            return collect(Sources(ipr, env, scope or Scope()), sections)

    return in_netns(netns, job)


def render(document: Mapping[str, Any]) -> str:
    # default=str: a collector's stray non-JSON value must not cost the whole document.
    return json.dumps(document, indent=2, sort_keys=True, default=str)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description=(
            "Print the network state of the proxy's namespace as one JSON document: "
            "interfaces, rules, routes of all tables, nexthop objects, neighbours, sysctls, "
            "system facts, the NSM_*/SPIFFE_* environment and the objects the proxy manages. "
            'A section that cannot be read holds {"error": ...}; the others still print. '
            "Run it inside the proxy's pod (kubectl exec) or give --netns."
        ),
        epilog="exit status: 0 printed, 1 the namespace or netlink socket cannot be opened, "
        "2 bad usage",
    )
    parser.add_argument(
        "--netns",
        metavar="NAME",
        help="enter this network namespace first (a name from `ip netns`, or a path)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """`meridio-proxy debug [--netns NAME]`; returns the exit status."""
    try:
        options = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    environ = dict(os.environ)
    try:
        scope = scope_from_config(config.load_environment(environ))
    except config.ConfigError:
        scope = Scope()  # the document still helps; `managed` then shows the default scope
    try:
        document = dump(options.netns, environ=environ, scope=scope)
    except Exception as exc:  # the sections catch their own: this is namespace or socket
        where = f" in network namespace {options.netns}" if options.netns else ""
        print(f"{PROG}: cannot read the network state{where}: {_error_text(exc)}", file=sys.stderr)
        return 1
    print(render(document))
    return 0
