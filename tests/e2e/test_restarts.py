"""The proxy and each of its peers restarted under traffic (scenarios 5 and 6).

* The proxy is SIGKILLed and started again: the kernel keeps forwarding what it left, the new
  proxy adopts it, so egress loses nothing; it owns the same bridge MAC and addresses, keeps
  the same ports, and leaves no IPAM record that no interface holds.
* IPAM, NSP and the NSM manager are restarted in turn: traffic keeps flowing; the sub-service
  that follows the peer (IPAMCli, NSPCli) goes NOT_SERVING and back, Readiness with it. The NSM
  manager has no sub-service of its own (upstream neither): NSMEndpoint is the proxy's own
  endpoint, which keeps serving, so Readiness stays SERVING.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import trio

from proxy.lab.scenarios import ipam_records, leaked_records, peer_restart, proxy_restart
from proxy.lab.state import leftovers
from proxy.lab.topology import Topology
from tests.e2e.conftest import spec
from tests.e2e.inventory import key_records, target_key

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

TOKEN_LIFETIME = 12.0  # the proxy refreshes its LB connections every third of this
ESTABLISHED = "connection established"  # what the lab manager logs for a connection it is new to


async def test_proxy_sigkill_and_restart(topology: Topology) -> None:
    figures = await proxy_restart(topology)
    before, after, streams = figures.before, figures.after, figures.streams
    print(
        f"proxy SIGKILLed: ready again after {figures.ready_s:.2f}s; {streams.count} streams"
        f" lost {streams.lost} packets (worst {streams.worst_ms:.0f} ms), moved {streams.moved};"
        f" IPAM records {len(before.records)} before, {len(after.records)} after,"
        f" {len(figures.leaked)} held by no interface"
    )
    assert streams.lost == 0 and streams.moved == 0, figures
    assert after.bridge_mac == before.bridge_mac
    assert after.bridge_addresses == before.bridge_addresses
    assert after.ports == before.ports  # the same interfaces, not new ones with the same name
    assert after.target_addresses == before.target_addresses
    assert after.records == before.records
    assert figures.leaked == {}


async def test_a_load_balancer_gone_while_the_proxy_was_down_leaves_at_restart(
    state_dir: Path,
) -> None:
    """lb1 unregisters while the proxy is down (SIGKILLed): its interface and the nexthop the
    previous instance installed are still there. The new proxy drops that nexthop as soon as
    lb0, the only LB registered, is connected again, not one request timeout later (30 s here,
    upstream's 15 s default)."""
    lab = spec(state_dir, proxy_env={"NSM_REQUEST_TIMEOUT": "30s"})
    async with Topology.running(lab) as topology:
        lb1 = topology.lbs[1].name
        ready = await topology.restart_proxy(signal.SIGKILL, while_down=lambda: topology.stop_lb(1))
        members = await topology.group_members()
        assert all(lb1 not in names for names in members.values()), members
        [settled] = [line for line in topology.log("proxy").splitlines()[-400:]
                     if "connections settled" in line][-1:]  # fmt: skip
        print(f"lb1 gone while the proxy was down: out of its groups, ready again {ready:.2f}s"
              f" after the SIGKILL; the proxy: {settled.split(' - ')[-1]}")  # fmt: skip
        assert "by=listing" in settled, settled
    assert leftovers(topology.state) == []


async def test_a_release_owed_when_the_proxy_is_killed_is_done_after_its_restart(
    state_dir: Path,
) -> None:
    """tg1 leaves; the proxy is SIGKILLed within its release delay (5 s here): the restarted
    proxy releases tg1's addresses when they were due (upstream's stayed with IPAM until its
    garbage collector, up to 2 h 40 m)."""
    lab = spec(state_dir, proxy_env={"NSM_IP_RELEASE_DELAY": "5s"})
    async with Topology.running(lab) as topology:
        key = target_key(topology.targets[1].name)
        owned = key_records(key, topology.families)
        journal = topology.directory / f"{topology.proxy_name}.ipam-releases.json"
        assert owned <= set(ipam_records(topology))
        left = trio.current_time()
        await topology.remove_target(1)  # it closes its connection: the release is owed
        await topology.wait_until(
            "the proxy owes tg1's release", lambda: _owes(journal, key), within=10.0
        )
        await topology.restart_proxy(signal.SIGKILL)

        async def released() -> bool:
            return not owned & set(ipam_records(topology))

        await topology.wait_until("tg1's IPAM records released", released, within=20.0)
        print(f"tg1 left, the proxy was SIGKILLed within its 5 s release delay: its IPAM records"
              f" went {trio.current_time() - left:.1f}s after it left")  # fmt: skip
        assert not journal.exists()
        assert await leaked_records(topology) == {}
    assert leftovers(topology.state) == []


async def _owes(journal: Path, key: str) -> bool:
    file = trio.Path(journal)
    return await file.exists() and key in await file.read_text()


@pytest.mark.parametrize(("peer", "service"), [("ipam", "IPAMCli"), ("nsp", "NSPCli")])
async def test_peer_restart(topology: Topology, peer: str, service: str) -> None:
    figures = await peer_restart(topology, peer)
    print(figures)
    streams = figures.streams
    print(
        f"{peer} away {figures.down_s:.2f}s: {service} {' -> '.join(figures.statuses[service])}"
        f" ({figures.not_serving_s[service]:.2f}s not serving), Readiness"
        f" {' -> '.join(figures.statuses['Readiness'])}; ready again after"
        f" {figures.ready_again_s:.2f}s; {streams.count} streams lost {streams.lost} packets"
    )
    assert streams.lost == 0 and streams.moved == 0, figures
    assert figures.statuses[service] == ["SERVING", "NOT_SERVING", "SERVING"], figures
    assert figures.statuses["Readiness"] == ["SERVING", "NOT_SERVING", "SERVING"], figures
    for other in ("Liveness", "Egress", "NSMEndpoint"):
        assert figures.statuses[other] == ["SERVING"], figures


async def test_nsm_manager_restart(state_dir: Path) -> None:
    """The manager forgets everything (the lab's registry and connections are in memory); the
    LBs and the proxy register again, and the proxy's next refresh of each LB connection goes
    through the new manager (a short token lifetime makes that come within seconds) and rewires
    nothing: traffic flows on, the same ports stay."""
    lab = spec(state_dir, proxy_env={"NSM_MAX_TOKEN_LIFETIME": f"{TOKEN_LIFETIME:g}s"})
    async with Topology.running(lab) as topology:
        members = await topology.group_members()
        ports = {(p["ifname"], p["ifindex"]) for p in await topology.bridge_ports()}
        established = topology.log("nsm").count(ESTABLISHED)
        figures = await peer_restart(topology, "nsm", after=TOKEN_LIFETIME * 2 / 3)
        print(figures)
        refreshed = topology.log("nsm").count(ESTABLISHED) - established
        streams = figures.streams
        print(
            f"nsm away {figures.down_s:.2f}s; Readiness"
            f" {' -> '.join(figures.statuses['Readiness'])}; {refreshed} connections refreshed"
            f" through the new manager; {streams.count} streams lost {streams.lost} packets,"
            f" moved {streams.moved}"
        )
        assert refreshed >= len(topology.lbs), topology.log("nsm")[-3000:]
        assert streams.lost == 0 and streams.moved == 0, figures
        for service, statuses in figures.statuses.items():
            assert statuses == ["SERVING"], (service, figures)
        assert await topology.group_members() == members
        assert {(p["ifname"], p["ifindex"]) for p in await topology.bridge_ports()} == ports
    assert leftovers(topology.state) == []
