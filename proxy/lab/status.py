"""`meridio-proxy lab status`: what a lab is made of and how the proxy sees it, as one document
(`--json`, for programs) or as tables a person reads at a glance.

Everything is read live: processes from /proc (by the pids the state file records), kernel
state with `ip -j` in each namespace, the proxy's health over its health socket. A namespace
or process that is gone shows as such; nothing here fails because part of the lab is broken.
"""

from __future__ import annotations

import time
from typing import Any

from proxy.lab.state import ProcessRecord, process_alive, process_state
from proxy.lab.topology import (
    OUTSIDE_HOST,
    OUTSIDE_IFNAME,
    PEERS,
    PROXY_TABLE,
    TRUST_DOMAIN,
    Topology,
    TopologyError,
    describe_age,
    ip_json,
)

__all__ = ["collect", "render"]

BAR = 24


def _process(topology: Topology, role: str) -> dict[str, Any]:
    record = topology.state.processes.get(role)
    if record is None:
        return {"pid": None, "running": False, "frozen": False, "log": None}
    running = topology.is_running(role)
    return {
        "pid": record.pid,
        "running": running,
        "frozen": running and _stopped(record),
        "log": record.log,
    }


def _stopped(record: ProcessRecord) -> bool:
    return process_alive(record) and process_state(record.pid) in ("T", "t")


async def _safe(coroutine: Any, default: Any) -> Any:
    try:
        return await coroutine
    except (TopologyError, ValueError, KeyError, OSError):
        return default


async def _links(netns: str | None) -> list[dict[str, Any]]:
    if netns is None:
        return []
    found: list[dict[str, Any]] = await _safe(ip_json("address", "show", netns=netns), [])
    return found


def _global(link: dict[str, Any]) -> list[str]:
    return [
        f"{a['local']}/{a['prefixlen']}"
        for a in link.get("addr_info", [])
        if a.get("scope") == "global"
    ]


def _peer_sockets(topology: Topology) -> list[tuple[str, str]]:
    """(peer, the socket shown for it): the lab's Workload API first (its proxy socket stands
    for its sockets, one per kind of workload) when the lab is secured."""
    spire = [("spire", "spire-proxy")] if "spire" in topology.state.processes else []
    return [*spire, *((peer, peer) for peer in PEERS)]


async def collect(topology: Topology) -> dict[str, Any]:
    """The status document (plain JSON types)."""
    state = topology.state
    proxy_ns = state.namespaces.get("proxy")
    lb_links = {i: await _links(lb.netns) for i, lb in state.lbs.items()}
    target_links = {i: await _links(t.netns) for i, t in state.targets.items()}
    names = await _safe(topology.lb_addresses(), {})
    proxy_running = topology.is_running("proxy")
    health: dict[str, str] = {}
    if proxy_running:
        health = await _safe(topology.health(), {})
    groups = await nexthop_groups(topology, names)
    if proxy_ns:
        for version, gateways in (await _safe(topology.multipath_gateways(), {})).items():
            groups[str(version)] = {
                "id": None,
                "type": "multipath",
                "buckets": None,
                "members": sorted(
                    ({"lb": names.get(g, g), "gateway": g, "id": None, "buckets": None}
                     for g in gateways),
                    key=lambda m: str(m["lb"]),
                ),
            }  # fmt: skip
    rules = await _safe(topology.vip_rules(), []) if proxy_ns else []
    bridge = await _bridge(proxy_ns, lb_links, topology, target_links)
    document: dict[str, Any] = {
        "name": state.name,
        "phase": state.phase,
        "created": state.created,
        "state_file": str(state.file),
        "directory": str(state.directory),
        "lab_pid": state.lab_pid,
        "families": list(topology.families),
        "security": (
            f"mutual TLS, SPIFFE trust domain {TRUST_DOMAIN}"
            if topology.spec.secure
            else "plain text (--insecure)"
        ),
        "namespaces": dict(state.namespaces),
        "peers": {
            peer: {**_process(topology, peer), "socket": str(topology.socket_path(socket))}
            for peer, socket in _peer_sockets(topology)
        },
        "proxy": {
            "namespace": proxy_ns,
            **_process(topology, "proxy"),
            "health_socket": str(topology.socket_path("health")),
            "health": health,
            "environment": topology.proxy_environment(),
            "bridge": bridge,
            "groups": groups,
            "vip_rules": [
                {"priority": r.get("priority"), "from": r.get("src"), "table": r.get("table")}
                for r in rules
            ],
        },
        "lbs": [],
        "targets": [],
        "outside": {
            "namespace": state.namespaces.get("out"),
            "addresses": [OUTSIDE_HOST[v] for v in topology.families],
        },
    }
    for index, lb in sorted(state.lbs.items()):
        conduit = [
            address
            for link in lb_links[index]
            if link["ifname"] not in ("lo", OUTSIDE_IFNAME)
            for address in _global(link)
        ]
        document["lbs"].append(
            {
                "name": lb.name,
                "index": index,
                "namespace": lb.netns,
                **_process(topology, lb.name),
                "socket": str(topology.socket_path(lb.name)),
                "advertised": lb.advertised,
                "conduit_addresses": conduit,
                "outside_addresses": [lb.outside[v] for v in sorted(lb.outside)],
                "in_groups": {
                    str(v): any(
                        m["lb"] == lb.name for m in groups.get(str(v), {}).get("members", [])
                    )
                    for v in topology.families
                },
            }
        )
    for index, target in sorted(state.targets.items()):
        document["targets"].append(
            {
                "name": target.name,
                "index": index,
                "namespace": target.netns,
                **_process(topology, target.name),
                "addresses": {str(v): a for v, a in sorted(target.addresses.items())},
                "vips": target.vips,
                "vips_present": [
                    vip
                    for vip in target.vips
                    if any(vip in _global(link) for link in target_links[index])
                ],
            }
        )
    return document


async def nexthop_groups(topology: Topology, names: dict[str, str]) -> dict[str, Any]:
    """The proxy's nexthop groups by family, each member named by its LB (`names`: gateway
    address -> LB name)."""
    proxy_ns = topology.state.namespaces.get("proxy")
    nexthops = await _safe(topology.nexthops(), []) if proxy_ns else []
    return await _groups(proxy_ns, nexthops, names)


async def _groups(
    proxy_ns: str | None, nexthops: list[dict[str, Any]], names: dict[str, str]
) -> dict[str, Any]:
    by_id = {nh["id"]: nh for nh in nexthops}
    found: dict[str, Any] = {}
    for nh in nexthops:
        if "group" not in nh:
            continue
        buckets: dict[int, int] = {}
        if nh.get("type") == "resilient" and proxy_ns is not None:
            for entry in await _safe(
                ip_json("nexthop", "bucket", "show", "id", str(nh["id"]), netns=proxy_ns), []
            ):
                member = entry["bucket"]["nhid"]
                buckets[member] = buckets.get(member, 0) + 1
        members = []
        version = None
        for member in nh["group"]:
            gateway = by_id.get(member["id"], {}).get("gateway", "")
            version = "6" if ":" in gateway else "4"
            members.append(
                {
                    "lb": names.get(gateway, gateway),
                    "gateway": gateway,
                    "id": member["id"],
                    "buckets": buckets.get(member["id"]),
                }
            )
        if version is not None:
            found[version] = {
                "id": nh["id"],
                "type": nh.get("type", "mpath"),
                "buckets": nh.get("resilient_args", {}).get("buckets") or len(buckets) or None,
                "members": sorted(members, key=lambda m: str(m["lb"])),
            }
    return found


async def _bridge(
    proxy_ns: str | None,
    lb_links: dict[int, list[dict[str, Any]]],
    topology: Topology,
    target_links: dict[int, list[dict[str, Any]]],
) -> dict[str, Any]:
    if proxy_ns is None:
        return {}
    links = await _safe(ip_json("address", "show", netns=proxy_ns), [])
    bridge = next((link for link in links if link["ifname"] == "bridge0"), None)
    if bridge is None:
        return {"name": "bridge0", "exists": False, "ports": []}
    peers: list[tuple[str, dict[str, Any]]] = []
    for index, found in lb_links.items():
        peers += [(topology.state.lbs[index].name, link) for link in found]
    for index, found in target_links.items():
        peers += [(topology.state.targets[index].name, link) for link in found]
    ports = []
    for link in links:
        if link.get("master") != "bridge0":
            continue
        peer = next(
            (
                name
                for name, other in peers
                if other["ifname"] not in ("lo", OUTSIDE_IFNAME)
                and other.get("link_index") == link["ifindex"]
                and link.get("link_index") == other["ifindex"]
            ),
            None,
        )
        ports.append({"name": link["ifname"], "peer": peer, "state": link.get("operstate")})
    return {
        "name": "bridge0",
        "exists": True,
        "mac": bridge.get("address"),
        "addresses": _global(bridge),
        "ports": ports,
    }


# -- rendering -----------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(
            indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        )
    return lines


def _state_word(item: dict[str, Any]) -> str:
    if item.get("frozen"):
        return "frozen"
    if item.get("running"):
        return "running"
    return "stopped" if item.get("pid") is None else "dead"


def _mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def render(document: dict[str, Any]) -> str:
    """The tables of `collect`'s document."""
    proxy = document["proxy"]
    age = describe_age(time.time() - document["created"])
    out = [
        f"lab {document['name']!r}: {document['phase']}, made {age} ago"
        f"  (state {document['state_file']}, files in {document['directory']})",
        f"security: {document['security']}",
        "",
        "PROCESSES",
    ]
    rows = [
        [name, "-", str(p["pid"] or "-"), _state_word(p), p["socket"]]
        for name, p in document["peers"].items()
    ]
    rows.append(
        ["proxy", proxy["namespace"] or "-", str(proxy["pid"] or "-"), _state_word(proxy),
         proxy["health_socket"]]
    )  # fmt: skip
    out += _table(["role", "namespace", "pid", "state", "socket"], rows)
    health = proxy["health"]
    out += ["", "PROXY HEALTH"]
    if health:
        out.append("  " + "   ".join(f"{_mark(v == 'SERVING')} {k} {v}" for k, v in health.items()))
    else:
        out.append("  (the proxy does not run)")
    out += ["", "LOAD-BALANCERS"]
    rows = []
    for lb in document["lbs"]:
        groups = " ".join(f"IPv{v}" for v, inside in lb["in_groups"].items() if inside)
        rows.append(
            [lb["name"], lb["namespace"] or "(deleted)", str(lb["pid"] or "-"), _state_word(lb),
             ", ".join(lb["conduit_addresses"]) or "-", ", ".join(lb["outside_addresses"]),
             "yes" if lb["advertised"] else "no", groups or "-"]
        )  # fmt: skip
    out += _table(
        ["name", "namespace", "pid", "state", "conduit address", "outside address",
         "advertised", "in proxy's groups"],
        rows,
    )  # fmt: skip
    out += ["", "TARGETS"]
    rows = []
    for target in document["targets"]:
        missing = sorted(set(target["vips"]) - set(target["vips_present"]))
        vips = ", ".join(target["vips"]) + (f" (missing {', '.join(missing)})" if missing else "")
        rows.append(
            [target["name"], target["namespace"] or "-", str(target["pid"] or "-"),
             _state_word(target), ", ".join(target["addresses"].values()) or "-", vips]
        )  # fmt: skip
    out += _table(["name", "namespace", "pid", "state", "address (node subnet)", "VIPs"], rows)
    bridge = proxy["bridge"]
    out += [""]
    if not bridge or not bridge.get("exists"):
        out.append("PROXY BRIDGE: no bridge0")
    else:
        out.append(f"PROXY BRIDGE bridge0  {', '.join(bridge['addresses'])}  mac {bridge['mac']}")
        out += _table(
            ["port", "peer", "state"],
            [[p["name"], p["peer"] or "?", p["state"] or "?"] for p in bridge["ports"]],
        )
    out += ["", "PROXY EGRESS (nexthop groups)"]
    groups = proxy["groups"]
    rows = []
    for version in document["families"]:
        group = groups.get(str(version))
        if group is None:
            rows.append([f"IPv{version}", "-", "-", "(no group)"])
            continue
        members = ", ".join(
            f"{m['lb']} {m['gateway']}" + (f" ({m['buckets']} buckets)" if m["buckets"] else "")
            for m in group["members"]
        )
        rows.append([f"IPv{version}", str(group["id"] or "-"), group["type"], members])
    out += _table(["family", "group", "type", "members"], rows)
    out += ["", f"PROXY VIP RULES (table {PROXY_TABLE})"]
    rules = proxy["vip_rules"]
    if rules:
        out += _table(
            ["priority", "from", "table"],
            [[str(r["priority"]), str(r["from"]), str(r["table"])] for r in rules],
        )
    else:
        out.append("  (none)")
    outside = document["outside"]
    out += [
        "",
        f"OUTSIDE HOST {outside['namespace']}  {', '.join(outside['addresses'])}"
        "  (VIPs routed back over the advertised LBs)",
    ]
    return "\n".join(out)
