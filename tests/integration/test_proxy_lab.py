"""The real proxy process against the lab peers, all as processes, in network namespaces.

  lab ipam, lab nsp, lab nsm (kernel forwarder)   processes on UNIX sockets in a tmp dir
  proxy                                           `meridio-proxy` in its own namespace
  lb0, lb1                                        `lab lb`, each in its own namespace
  tg0                                             `lab target` in its own namespace

Checked the way a user would: Readiness turns SERVING, the kernel of the proxy's namespace holds
the bridge, the LB ports and a nexthop group over both LBs and the VIP rules, the target got
addresses and reaches an LB through the bridge; an LB that goes takes its nexthop with it; the
proxy killed and started again keeps its bridge address and MAC and does not duplicate
interfaces; SIGTERM stops it in time.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.integration.netns import ip_json
from tests.integration.waiting import wait_until

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

TRENCH, CONDUIT, NAMESPACE, NODE = "trench-a", "conduit-a", "red", "node-a"
LB_SERVICE = f"{CONDUIT}.{TRENCH}.{NAMESPACE}"
PROXY_SERVICE = f"proxy.{LB_SERVICE}"
VIPS = ("198.19.0.1/32", "2001:db8:ff::1/128")


@attrs.define
class Lab:
    directory: Path
    namespaces: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    args: dict[str, list[str]] = attrs.field(factory=dict)

    def socket(self, name: str) -> str:
        return f"unix://{self.directory}/{name}.sock"

    def start(self, name: str, args: list[str], netns: str | None = None, **env: str) -> None:
        self.args[name] = args
        inside = ["ip", "netns", "exec", netns] if netns else []
        log = open(self.directory / f"{name}.log", "ab")  # noqa: SIM115 (closed by the child's exit)
        self.processes[name] = subprocess.Popen(
            [*inside, sys.executable, "-m", "proxy", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ["PATH"], **env},
        )
        log.close()

    def stop(self, name: str, how: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(how)
        return process.wait(timeout=timeout)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def diagnostics(self) -> str:  # for `wait_until`
        return f"--- proxy log ---\n{self.log('proxy')[-4000:]}"


def nsp_config() -> dict[str, Any]:
    """The lab NSP's configuration: the trench, its conduit and the VIPs."""
    return {
        "trench": {"name": TRENCH},
        "conduits": [{"name": CONDUIT, "trench": TRENCH}],
        "vips": [
            {"name": f"vip{i}", "address": vip, "trench": TRENCH} for i, vip in enumerate(VIPS)
        ],
    }


def probe(lab: Lab, service: str) -> int:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "proxy",
            "probe",
            "-addr",
            lab.socket("health"),
            "-service",
            service,
        ],
        capture_output=True,
        timeout=20,
    ).returncode


def probe_serving(lab: Lab, service: str) -> bool:
    return probe(lab, service) == 0


def probe_fails(lab: Lab, service: str) -> bool:
    return probe(lab, service) != 0


def proxy_env(lab: Lab) -> dict[str, str]:
    return {
        "NSM_NAME": "proxy-a",
        "NSM_HOST": NODE,
        "NSM_IDENTITY": "insecure",  # (the lab peers here speak plain text)
        "NSM_TRENCH": TRENCH,
        "NSM_CONDUIT": CONDUIT,
        "NSM_NAMESPACE": NAMESPACE,
        "NSM_SERVICE_NAME": PROXY_SERVICE,
        "NSM_NETWORK_SERVICE_NAME": LB_SERVICE,
        "NSM_CONNECT_TO": lab.socket("nsm"),
        "NSM_IPAM_SERVICE": lab.socket("ipam"),
        "NSM_NSP_SERVICE": lab.socket("nsp"),
        "NSM_HEALTH_ADDRESS": lab.socket("health"),
        "NSM_STATE_DIR": str(lab.directory),
        "NSM_REQUEST_TIMEOUT": "5s",
        "NSM_IP_RELEASE_DELAY": "1s",
        "NSM_MAX_TOKEN_LIFETIME": "1m",
        "NSM_LOG_FORMAT": "json",
    }


@pytest.fixture
def lab() -> Iterator[Lab]:
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="mp-lab-"))
    token = secrets.token_hex(3)
    names = {role: f"mp-{role}-{token}" for role in ("proxy", "lb0", "lb1", "tg0")}
    running = Lab(directory, names)
    try:
        for name in names.values():
            subprocess.run(["ip", "netns", "add", name], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        (directory / "nsp.json").write_text(json.dumps(nsp_config()))
        running.start(
            "ipam",
            ["lab", "ipam", "--listen", running.socket("ipam"), "--db", str(directory / "ipam.db"),
             "--prefix", "198.18.0.0/16", "--prefix", "2001:db8:100::/48", "--trench", TRENCH],
        )  # fmt: skip
        running.start(
            "nsp",
            [
                "lab",
                "nsp",
                "--listen",
                running.socket("nsp"),
                "--config",
                str(directory / "nsp.json"),
            ],
        )
        running.start("nsm", ["lab", "nsm", "--listen", running.socket("nsm")])
        for peer in ("ipam", "nsp", "nsm"):
            socket_file = directory / f"{peer}.sock"
            wait_until(socket_file.exists, 20, f"{peer} up", running)
        for lb in ("lb0", "lb1"):
            running.start(
                lb,
                ["lab", "lb", "--nsm", running.socket("nsm"), "--listen", running.socket(lb),
                 "--name", lb, "--service", LB_SERVICE, "--netns", names[lb]],
            )  # fmt: skip
        running.start("proxy", [], netns=names["proxy"], **proxy_env(running))
        yield running
    finally:
        for name in list(running.processes):
            try:
                running.stop(
                    name, signal.SIGKILL if name == "proxy" else signal.SIGTERM, timeout=15
                )
            except subprocess.TimeoutExpired:
                running.processes.get(name, None)
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(directory, ignore_errors=True)


def group_members(netns: str) -> dict[str, list[str]]:
    """Gateway addresses of the proxy's group members, per family ("4", "6")."""
    nexthops = ip_json("nexthop", "show", netns=netns)
    by_id = {nh["id"]: nh for nh in nexthops}
    found: dict[str, list[str]] = {"4": [], "6": []}
    for nh in nexthops:
        for member in nh.get("group", []):
            gateway = by_id[member["id"]].get("gateway", "")
            found["6" if ":" in gateway else "4"].append(gateway)
    return found


def pair(proxy: str, lb: str) -> tuple[str, str]:
    """The IPAM children of the proxy's connection to an LB (upstream's connection id)."""
    conn_id = f"{proxy}-{LB_SERVICE}-{lb}"
    return f"{conn_id}-src", f"{conn_id}-dst"


def ipam_children(lab: Lab) -> set[str]:
    """The child names the lab IPAM holds (every family)."""
    with sqlite3.connect(lab.directory / "ipam.db") as db:
        return {name for (name,) in db.execute("SELECT name FROM child")}


def addresses_of_target(lab: Lab) -> list[str]:
    addresses = ip_json("addr", "show", "eth0", netns=lab.namespaces["tg0"])[0]["addr_info"]
    return sorted(a["local"] for a in addresses if a.get("scope") == "global")


def vip_rule_sources(netns: str) -> list[str]:
    """The sources of the policy rules to the VIP table (4096), IPv4 and IPv6, sorted."""
    rules = ip_json("rule", "show", "table", "4096", netns=netns) + ip_json(
        "-6", "rule", "show", "table", "4096", netns=netns
    )
    return sorted(r["src"] for r in rules)


def node_address(netns: str) -> str:
    """The first address in the node subnet (198.18.0.0/16) on any link of the namespace."""
    address: str = next(
        a["local"]
        for link in ip_json("addr", "show", netns=netns)
        for a in link.get("addr_info", [])
        if a["local"].startswith("198.18.")
    )
    return address


def ping_twice(netns: str, address: str) -> subprocess.CompletedProcess[str]:
    """`ping -c 2 -W 2 <address>` from the namespace; its output captured."""
    return subprocess.run(
        ["ip", "netns", "exec", netns, "ping", "-c", "2", "-W", "2", address],
        capture_output=True,
        text=True,
    )


def start_target(lab: Lab) -> None:
    lab.start(
        "tg0",
        ["lab", "target", "--nsm", lab.socket("nsm"), "--name", "tg0", "--node", NODE,
         "--service", PROXY_SERVICE, "--interface", "eth0",
         *[a for v in VIPS for a in ("--vip", v)], "--netns", lab.namespaces["tg0"]],
    )  # fmt: skip


def test_the_proxy_serves_a_target_over_two_load_balancers(lab: Lab) -> None:
    proxy_ns = lab.namespaces["proxy"]
    started = time.monotonic()
    wait_until(
        lambda: all(len(v) == 2 for v in group_members(proxy_ns).values()),
        60,
        "egress over 2 LBs",
        lab,
    )
    print(f"egress over both LBs after {time.monotonic() - started:.1f}s")
    start_target(lab)
    wait_until(lambda: probe(lab, "Readiness") == 0, 60, "Readiness SERVING", lab)
    print(f"Readiness SERVING after {time.monotonic() - started:.1f}s")
    assert probe(lab, "Liveness") == 0

    [bridge] = ip_json("link", "show", "bridge0", netns=proxy_ns)

    def target_connected() -> bool:
        """Three bridge ports (two LBs and the target's) and the target's VIP on its side."""
        links = ip_json("link", "show", netns=proxy_ns)
        ports = [link["ifname"] for link in links if link.get("master") == "bridge0"]
        target = ip_json("addr", "show", netns=lab.namespaces["tg0"])
        local = {a["local"] for link in target for a in link.get("addr_info", [])}
        return len(ports) == 3 and "198.19.0.1" in local

    # Readiness does not wait for targets: the target's port and VIPs come once it is connected.
    wait_until(target_connected, 30, "the target connected", lab)
    assert vip_rule_sources(proxy_ns) == sorted(v.split("/")[0] for v in VIPS)

    # The target got addresses in the node subnet and its VIPs, and reaches an LB across the bridge.
    target_addresses = ip_json("addr", "show", "eth0", netns=lab.namespaces["tg0"])[0]["addr_info"]
    local = [a["local"] for a in target_addresses if a.get("scope") == "global"]
    assert any(a.startswith("198.18.") for a in local) and "198.19.0.1" in local
    lb_address = node_address(lab.namespaces["lb0"])
    ping = ping_twice(lab.namespaces["tg0"], lb_address)
    assert ping.returncode == 0, ping.stdout + ping.stderr

    # An LB that goes takes its nexthop with it; its addresses go back to IPAM after the delay.
    lab.stop("lb1")
    wait_until(
        lambda: all(len(v) == 1 for v in group_members(proxy_ns).values()), 30, "LB removed", lab
    )
    expected = {"bridge", *pair("proxy-a", "lb0"), "tg0-red-0-src", "tg0-red-0-dst"}
    wait_until(lambda: ipam_children(lab) == expected, 10, "lb1's addresses released", lab)

    # The proxy killed and started again: same bridge address and MAC, no duplicated ports,
    # the target keeps its addresses.
    target_before = addresses_of_target(lab)
    addresses_before = sorted(
        a["local"]
        for a in ip_json("addr", "show", "bridge0", netns=proxy_ns)[0]["addr_info"]
        if a.get("scope") == "global"
    )
    lab.stop("proxy", signal.SIGKILL)
    lab.start("proxy", [], netns=proxy_ns, **proxy_env(lab))
    wait_until(lambda: probe(lab, "Readiness") == 0, 60, "Readiness after restart", lab)
    [bridge_after] = ip_json("link", "show", "bridge0", netns=proxy_ns)
    assert bridge_after["address"] == bridge["address"]
    assert (
        sorted(
            a["local"]
            for a in ip_json("addr", "show", "bridge0", netns=proxy_ns)[0]["addr_info"]
            if a.get("scope") == "global"
        )
        == addresses_before
    )
    links = ip_json("link", "show", netns=proxy_ns)
    ports_after = [link for link in links if link.get("master") == "bridge0"]
    assert len(ports_after) == 2, [p["ifname"] for p in ports_after]  # lb0 and the target
    assert "load-balancer connection recovered" in lab.log("proxy")  # a refresh, not a new one

    assert addresses_of_target(lab) == target_before

    # No leak: IPAM holds the live connections' addresses, no more (the restart reused them).
    time.sleep(1.5)  # the release delay
    assert ipam_children(lab) == expected

    # IPAM and NSP restarted mid-run: their health goes NOT_SERVING and comes back.
    for peer, subservice in (("ipam", "IPAMCli"), ("nsp", "NSPCli")):
        args = lab.args[peer]
        lab.stop(peer)
        wait_until(partial(probe_fails, lab, subservice), 20, f"{subservice} down", lab)
        lab.start(peer, args)
        wait_until(partial(probe_serving, lab, subservice), 30, f"{subservice} back", lab)
    assert probe(lab, "Readiness") == 0

    # The target leaves: its addresses stay for the release delay, then go back to IPAM.
    lab.stop("tg0")
    wait_until(
        lambda: ipam_children(lab) == {"bridge", *pair("proxy-a", "lb0")}, 15, "tg0 released", lab
    )

    # SIGTERM: out within the shutdown budget, status 0, health socket gone.
    started = time.monotonic()
    assert lab.stop("proxy") == 0
    print(f"SIGTERM to exit: {time.monotonic() - started:.2f}s")
    assert time.monotonic() - started < 20
    assert not (lab.directory / "health.sock").exists()
