"""`meridio-proxy debug --netns NS` against a real namespace: every object it holds is listed.

The namespace holds what a proxy's namespace holds: bridge0 with an address of each family and
a veth port, VIP rules towards table 4096, routes there (one through a nexthop group), and
neighbour entries. The command runs as its own process, as a person would run it.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(60),
]

ROOT = Path(__file__).resolve().parents[2]

SETUP = [
    "link add bridge0 type bridge",
    "link add mp-va type veth peer name mp-vb",
    "link set mp-va master bridge0",
    "link set bridge0 up",
    "link set mp-va up",
    "link set mp-vb up",
    "addr add 198.18.0.1/24 dev bridge0",
    "addr add 2001:db8::1/64 dev bridge0 nodad",
    "rule add from 198.18.100.1 lookup 4096 prio 30000",
    "-6 rule add from 2001:db8:100::1 iif bridge0 lookup 4096 prio 30001",
    "route add default via 198.18.0.2 dev bridge0 table 4096 metric 100",
    "route add unreachable default table 4096 metric 4294967295",
    "nexthop add id 7001 via 198.18.0.3 dev bridge0",
    "nexthop add id 7002 via 198.18.0.4 dev bridge0",
    "nexthop add id 7003 group 7001/7002,3",
    "route add 198.18.50.0/24 nhid 7003 table 4096",
    "neigh add 198.18.0.2 lladdr 02:00:00:00:00:02 dev bridge0 nud permanent",
    "neigh add 2001:db8::2 lladdr 02:00:00:00:00:03 dev bridge0 nud stale",
]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    name = f"mp-dbg-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for line in SETUP:
            subprocess.run(["ip", "-n", name, *line.split()], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def clean_environment() -> dict[str, str]:
    from proxy import config

    fallbacks = {var.alt for var in config.variables() if var.alt}
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("NSM_", "SPIFFE_")) and name not in fallbacks
    }


def run_debug(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=ROOT,
        env=clean_environment() if env is None else env,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def document(netns: str) -> dict[str, Any]:
    env = {
        **clean_environment(),
        "NSM_TRENCH": "red",
        "NSM_HOST": "node-1",
        "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/sockets/agent.sock",
        "IP_FAMILY": "dualstack",
    }
    started = time.monotonic()
    result = run_debug("debug", "--netns", netns, env=env)
    print(f"debug took {time.monotonic() - started:.3f} s (process start included)")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def one(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [item for item in items if all(item.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


def test_no_section_failed(document):
    for name, section in document.items():
        assert not (isinstance(section, dict) and "error" in section), (name, section)
    assert "error" not in document["managed"]


def test_header(document):
    import proxy

    assert document["version"] == proxy.__version__
    assert abs(document["unix-time"] - time.time()) < 60


def test_interfaces(document):
    interfaces = document["interfaces"]
    bridge = one(interfaces, name="bridge0")
    port = one(interfaces, name="mp-va")
    peer = one(interfaces, name="mp-vb")
    assert bridge["kind"] == "bridge" and bridge["up"] is True and bridge["mtu"] == 1500
    assert port["kind"] == "veth"
    assert port["master"] == {"index": bridge["index"], "name": "bridge0"}
    assert peer["master"] is None
    addresses = {a["address"]: a for a in bridge["addresses"]}
    assert addresses["198.18.0.1/24"]["family"] == "ipv4"
    assert addresses["2001:db8::1/64"]["family"] == "ipv6"
    assert "nodad" in addresses["2001:db8::1/64"]["flags"]
    assert set(port["stats"]) == {"rx", "tx"}
    assert set(port["stats"]["tx"]) == {"packets", "bytes", "errors", "dropped"}
    assert all(isinstance(v, int) for v in port["stats"]["tx"].values())


def test_rules(document):
    rules = document["rules"]
    v4 = one(rules, priority=30000)
    assert v4 == {
        **v4,
        "family": "ipv4",
        "source": "198.18.100.1/32",
        "destination": None,
        "table": 4096,
        "action": "lookup",
    }
    v6 = one(rules, priority=30001)
    assert v6["family"] == "ipv6"
    assert v6["source"] == "2001:db8:100::1/128" and v6["iif"] == "bridge0"
    main = one(rules, family="ipv4", priority=32766)
    assert main["table"] == 254 and main["table_name"] == "main" and main["source"] == "all"


def test_routes_of_every_table(document):
    table = [r for r in document["routes"] if r["table"] == 4096]
    ecmp = one(table, destination="default", metric=100)
    assert ecmp["gateway"] == "198.18.0.2" and ecmp["interface"] == "bridge0"
    assert ecmp["family"] == "ipv4" and ecmp["type"] == "unicast"
    guard = one(table, destination="default", metric=4294967295)
    assert guard["type"] == "unreachable"
    grouped = one(table, destination="198.18.50.0/24")
    assert grouped["nexthop_id"] == 7003
    assert {hop["gateway"] for hop in grouped["multipath"]} == {"198.18.0.3", "198.18.0.4"}
    connected = one(document["routes"], table=254, destination="198.18.0.0/24")
    assert connected["protocol"] == "kernel" and connected["scope"] == "link"
    local = one(document["routes"], table=255, destination="198.18.0.1/32")
    assert local["type"] == "local"


def test_nexthops(document):
    nexthops = document["nexthops"]
    member = one(nexthops, id=7001)
    assert member["gateway"] == "198.18.0.3" and member["interface"] == "bridge0"
    assert member["family"] == "ipv4"
    group = one(nexthops, id=7003)
    assert group["group"] == [{"id": 7001, "weight": 1}, {"id": 7002, "weight": 3}]
    assert group["group_type"] == "mpath"


def test_neighbours(document):
    neighbours = document["neighbours"]
    v4 = one(neighbours, ip="198.18.0.2")
    assert v4 == {**v4, "mac": "02:00:00:00:00:02", "state": "PERMANENT", "interface": "bridge0"}
    v6 = one(neighbours, ip="2001:db8::2")
    assert v6["state"] == "STALE" and v6["family"] == "ipv6"


def test_sysctls_are_the_namespaces(document):
    sysctls = document["sysctls"]
    # A fresh namespace has IPv6 default.accept_dad=1 whatever the host says.
    assert sysctls["net.ipv6.conf.default.accept_dad"] == {
        "value": "1",
        "needed": "0",
        "ok": False,
    }
    assert set(sysctls) >= {"net.ipv4.conf.all.forwarding", "net.ipv4.fib_multipath_hash_policy"}


def test_system(document):
    system = document["system"]
    assert system["kernel"] == os.uname().release
    assert system["memory_total_bytes"] > system["memory_available_bytes"] > 0
    assert set(system["packages"]) == {"pyroute2", "trio", "purerpc"}
    assert system["python"].startswith("3.")


def test_environment(document):
    assert document["environment"] == {
        "NSM_TRENCH": "red",
        "NSM_HOST": "node-1",
        "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/sockets/agent.sock",
        "IP_FAMILY": "dualstack",
    }


def test_managed_view(document):
    managed = document["managed"]
    assert managed["scope"]["bridge"] == "bridge0" and managed["scope"]["table"] == 4096
    observed = managed["observed"]
    assert observed["bridge_addresses"] == ["198.18.0.1/24", "2001:db8::1/64"]
    assert {"family": "ipv4", "source": "198.18.100.1/32", "table": 4096, "priority": 30000} in (
        observed["rules"]
    )
    assert observed["links"]["mp-va"]["master"] == observed["links"]["bridge0"]["index"]


def test_without_nsm_variables_and_with_the_upstream_flag(netns):
    result = run_debug("--debug", "--netns", netns)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["environment"] == {}
    assert any(r["table"] == 4096 for r in document["routes"])


def test_missing_namespace_exits_1():
    result = run_debug("debug", "--netns", f"mp-missing-{secrets.token_hex(4)}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
