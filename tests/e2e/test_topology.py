"""The lab topology end to end: `meridio-proxy lab up|status|down|demo` and the Python API.

Each test makes its own lab (unique name, its own state directory under /tmp) and checks what a
user relies on: `up` gives a proxy that is ready with every LB in its nexthop groups and every
VIP rule, `status --json` says so, traffic from a target's VIP reaches the outside host over the
LBs, `down` leaves nothing (also when whatever made the lab was killed), and the demo's checks
hold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from proxy.lab.state import LabState, leftovers, netns_exists, process_alive, process_state
from proxy.lab.topology import Topology, TopologySpec
from tests.e2e.conftest import lab_name

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

VIPS = {"198.19.0.1", "198.19.0.2", "2001:db8:ff::1", "2001:db8:ff::2"}


def lab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_status(document: dict[str, Any]) -> None:
    proxy = document["proxy"]
    assert proxy["running"], document
    assert set(proxy["health"].values()) == {"SERVING"}, proxy["health"]
    ports = {port["peer"] for port in proxy["bridge"]["ports"]}
    assert ports == {"lb0", "lb1", "tg0", "tg1"}, proxy["bridge"]
    for version in ("4", "6"):
        members = [m["lb"] for m in proxy["groups"][version]["members"]]
        assert sorted(members) == ["lb0", "lb1"], proxy["groups"]
    assert {rule["from"] for rule in proxy["vip_rules"]} == VIPS
    for lb in document["lbs"]:
        assert lb["running"] and lb["advertised"] and all(lb["in_groups"].values()), lb
        assert len(lb["conduit_addresses"]) == 2, lb
    for target in document["targets"]:
        assert target["running"], target
        assert set(target["addresses"]) == {"4", "6"}, target
        assert target["vips_present"] == target["vips"], target
    for peer in document["peers"].values():
        assert peer["running"] and Path(peer["socket"]).exists(), peer


def test_cli_up_status_down(state_dir: Path) -> None:
    name = lab_name()
    where = ["--name", name, "--state-dir", str(state_dir)]
    started = time.monotonic()
    up = lab("up", *where)
    assert up.returncode == 0, up.stderr + up.stdout
    print(f"lab up: {time.monotonic() - started:.1f}s")
    assert "✓ Readiness SERVING" in up.stdout, up.stdout

    status = lab("status", "--json", *where)
    assert status.returncode == 0, status.stderr
    document = json.loads(status.stdout)
    check_status(document)
    table = lab("status", *where)
    assert table.returncode == 0 and "PROXY EGRESS" in table.stdout, table.stderr

    state = LabState.load(name, state_dir)
    assert lab("up", *where).returncode == 1  # the name is taken: refused, nothing touched
    assert all(netns_exists(n) for n in state.namespaces.values())

    started = time.monotonic()
    down = lab("down", *where)
    assert down.returncode == 0, down.stderr
    print(f"lab down: {time.monotonic() - started:.1f}s")
    assert leftovers(state) == []
    again = lab("down", *where)
    assert again.returncode == 0 and "nothing to take down" in again.stdout
    assert lab("status", *where).returncode == 1


HOLDER = """
import sys, time, trio
from pathlib import Path
from proxy.lab.topology import Topology, TopologySpec
from tests.e2e.conftest import lab_name

async def main():
    await Topology.up(TopologySpec(name=sys.argv[1], state_dir=Path(sys.argv[2])))
    print("up", flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


def test_down_after_the_lab_crashed(state_dir: Path) -> None:
    """The process that made the lab is SIGKILLed (and so is the proxy, which leaves its socket
    directory behind); `lab down` still removes every namespace, process and file."""
    name = lab_name()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, name, str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.strip() == "up", holder.stderr.read() if holder.stderr else ""
        state = LabState.load(name, state_dir)
        assert state.phase == "up" and state.lab_pid == holder.pid
        os.kill(state.processes["proxy"].pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait()
    assert all(process_alive(p) for role, p in state.processes.items() if role != "proxy")
    assert state.paths and all(os.path.exists(p) for p in state.paths)  # the proxy's leftovers

    down = lab("down", "--name", name, "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert leftovers(state) == []


async def streams(topology: Topology, targets: list[int], seconds: float = 1.0) -> dict[Any, Any]:
    """A UDP stream from each target's VIP of each family at once; their reports."""
    reports: dict[Any, Any] = {}

    async def stream(target: int, version: int) -> None:
        port = 7100 + target * 10 + version
        async with topology.udp_stream(target, version, rate=200, port=port) as running:
            await trio.sleep(seconds)
        reports[target, version] = running.report()

    async with trio.open_nursery() as nursery:
        for target in targets:
            for version in topology.families:
                nursery.start_soon(stream, target, version)
    for key, report in sorted(reports.items()):
        print(key, report)
    return reports


def no_loss(reports: dict[Any, Any]) -> bool:
    return all(r.sent >= r.rate * 0.5 and r.lost == 0 for r in reports.values())


async def test_api(state_dir: Path) -> None:
    """`Topology.running` and what the failure scenarios build on: streams from every target's
    VIPs carried by the LBs without loss, health, members; then each operation, checked by its
    effect: add_lb, delete_lb_namespace, freeze/thaw, add_target/remove_target, restart_proxy,
    stop_lb/start_lb, restart_peer; and nothing left afterwards."""
    spec = TopologySpec(name=lab_name(), state_dir=state_dir)
    async with Topology.running(spec) as topology:
        state = topology.state
        assert netns_exists(topology.netns("proxy")) and netns_exists(topology.netns("out"))
        assert set((await topology.health()).values()) == {"SERVING"}
        assert await topology.group_members() == {4: ["lb0", "lb1"], 6: ["lb0", "lb1"]}
        reports = await streams(topology, [0, 1])
        assert no_loss(reports)
        for report in reports.values():  # one 5-tuple, one socket: one LB
            assert len(report.interfaces) == 1 and report.interfaces <= {"lb0", "lb1"}, report

        added = await topology.add_lb()
        assert await topology.group_members() == {v: ["lb0", "lb1", "lb2"] for v in (4, 6)}
        gone = topology.netns(f"lb{added}")
        await topology.delete_lb_namespace(added)
        assert not netns_exists(gone)
        await topology.wait_lb_member(f"lb{added}", present=False)
        ports = {p["ifname"] for p in await topology.bridge_ports()}
        assert len(ports) == 4, ports  # two LBs, two targets

        await topology.freeze_lb(1)
        assert process_state(state.processes["lb1"].pid) == "T"
        await topology.thaw_lb(1)
        assert process_state(state.processes["lb1"].pid) != "T"

        target = await topology.add_target()
        rules = {rule["src"] for rule in await topology.vip_rules()}
        assert rules == VIPS | {"198.19.0.3", "2001:db8:ff::3"}
        assert no_loss(await streams(topology, [target], 0.5))
        await topology.remove_target(target)

        async def original_rules() -> bool:
            return {rule["src"] for rule in await topology.vip_rules()} == VIPS

        await topology.wait_until("the removed target's VIP rules gone", original_rules, 20)
        assert f"tg{target}" not in state.namespaces

        [bridge] = json.loads(
            (await topology.run("proxy", "ip", "-j", "link", "show", "bridge0")).stdout
        )
        before = state.processes["proxy"].pid
        await topology.restart_proxy(signal.SIGKILL)
        assert state.processes["proxy"].pid != before
        [after] = json.loads(
            (await topology.run("proxy", "ip", "-j", "link", "show", "bridge0")).stdout
        )
        assert after["address"] == bridge["address"]
        assert no_loss(await streams(topology, [0, 1], 0.5))

        # (Traffic through an LB that came back is the demo's and the scenarios' business.)
        await topology.stop_lb(1)
        await topology.wait_lb_member("lb1", present=False)
        assert not topology.is_running("lb1")
        await topology.start_lb(1)
        assert await topology.group_members() == {4: ["lb0", "lb1"], 6: ["lb0", "lb1"]}

        for peer in ("nsp", "ipam", "nsm"):
            before = state.processes[peer].pid
            await topology.restart_peer(peer)
            assert state.processes[peer].pid != before and topology.socket_path(peer).exists()
            await topology.wait_ready()
    assert leftovers(state) == []


def test_demo(state_dir: Path) -> None:
    """`lab demo` brings a lab up, moves traffic, stops and restarts an LB, and takes the lab
    down; it exits 0 only when every check it prints held."""
    started = time.monotonic()
    demo = lab("demo", "--name", lab_name(), "--state-dir", str(state_dir), timeout=150)
    print(demo.stdout[-6000:])
    elapsed = time.monotonic() - started
    print(f"demo: {elapsed:.0f}s")
    assert demo.returncode == 0, demo.stdout[-4000:] + demo.stderr
    assert "✗" not in demo.stdout
    assert elapsed < 90
    assert list(state_dir.iterdir()) == []
