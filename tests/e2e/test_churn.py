"""Scenario 7, target churn: targets come and go while the others send, and some die.

* Five cycles of a target connecting and disconnecting (the lab gives each new target the index
  after the highest, so the same name, key and interface name come back every cycle; the last
  cycle adds and removes two at once), while a stream from each remaining target's VIP of each
  family runs: those streams lose nothing.
* Two targets SIGKILLed, so that they never close their connection: one whose namespace stays
  (a crashed container) and one whose namespace goes with it (its pod deleted: its port leaves
  the bridge at once; the veth pair itself goes when NSM lets go of the namespace descriptor it
  holds, at the connection's expiry, as NSM's forwarder does). The lab NSM manager closes a
  connection that was not refreshed when its own path segment expires (its `--lifetime`, 1m
  by default, renewed by each Request); its Close reaches the proxy, which releases the port
  and, after NSM_IP_RELEASE_DELAY, the addresses.
  The lab here runs its NSM with a shorter lifetime (`TopologySpec.nsm_lifetime`). The targets
  name their namespace in their request, so NSM deletes a dead target's veth pair too.
* Afterwards the proxy holds exactly what the remaining LBs and targets need (tests/e2e/
  inventory.py): the bridge ports and interfaces, the VIP rules, its table's two routes per
  family, no route or address of a removed target, and the IPAM records (bridge per family, a
  `-src`/`-dst` pair per family per LB connection and per remaining target); and the remaining
  targets' traffic still flows without loss.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import trio

from proxy.lab.scenarios import stream_set
from proxy.lab.state import leftovers
from proxy.lab.topology import Topology
from tests.e2e.conftest import spec
from tests.e2e.inventory import (
    expected_ports,
    expected_records,
    expected_vips,
    inventory,
    key_records,
    target_key,
    target_port,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

NSM_LIFETIME = 10.0  # the lab NSM's connection lifetime here (its default: 60 s)
RELEASE_DELAY = 1.0  # NSM_IP_RELEASE_DELAY in the lab
CYCLES = 5
SETTLE = 10.0  # for what follows a change at once (NSP polls its file, IPAM's release delay)


async def remove_and_wait(topology: Topology, index: int) -> float:
    """Remove target `index` and wait until the proxy has dropped its VIP rules; seconds."""
    started = trio.current_time()
    await topology.remove_target(index)
    wanted = expected_vips(topology)

    async def rules_gone() -> bool:
        return {rule["src"] for rule in await topology.vip_rules()} == wanted

    await topology.wait_until(f"tg{index}'s VIP rules gone", rules_gone, SETTLE)
    return trio.current_time() - started


def owned_addresses(records: dict[str, str], key: str) -> set[str]:
    """The addresses IPAM gave a key (both ends, every family)."""
    return {address for name, address in records.items() if name.startswith(f"{key}-")}


async def test_target_churn_leaves_nothing_behind(state_dir: Path) -> None:
    async with Topology.running(spec(state_dir, nsm_lifetime=NSM_LIFETIME)) as topology:
        removed: set[str] = set()  # addresses removed targets held (both ends of their veth)
        async with stream_set(topology, per_family=1, targets=[0, 1]) as streams:
            # Connect and disconnect, again and again.
            cycle_times = []
            for cycle in range(CYCLES):
                started = trio.current_time()
                added = [await topology.add_target() for _ in range(1 if cycle < 4 else 2)]
                connected = trio.current_time() - started
                records = (await inventory(topology)).records
                for index in added:
                    key = target_key(f"tg{index}")
                    assert key_records(key, topology.families) <= set(records)
                    removed |= owned_addresses(records, key)
                removals = [await remove_and_wait(topology, index) for index in added]
                cycle_times.append((len(added), connected, sum(removals)))
            for number, (count, connected, removal) in enumerate(cycle_times):
                print(
                    f"cycle {number}: {count} target(s) connected and ready in {connected:.2f}s,"
                    f" removed (VIP rules gone) in {removal:.2f}s"
                )

            # Die without closing: SIGKILL, one keeping its namespace, one losing it at once.
            crashed, deleted = await topology.add_target(), await topology.add_target()
            records = (await inventory(topology)).records
            keys = {index: target_key(f"tg{index}") for index in (crashed, deleted)}
            for key in keys.values():
                removed |= owned_addresses(records, key)
            for index in keys:
                os.kill(topology.state.processes[f"tg{index}"].pid, signal.SIGKILL)
            killed_at = trio.current_time()
            await topology.remove_target(deleted)  # (the process is dead: nothing closes)
            port_gone: dict[int, float] = {}
            records_gone: dict[int, float] = {}

            async def cleaned() -> bool:
                now = await inventory(topology)
                for index, key in keys.items():
                    if index not in port_gone and target_port(f"tg{index}") not in now.ports:
                        port_gone[index] = trio.current_time() - killed_at
                    left = key_records(key, topology.families) & set(now.records)
                    if index not in records_gone and not left:
                        records_gone[index] = trio.current_time() - killed_at
                return len(port_gone) == len(records_gone) == len(keys)

            await topology.wait_until(
                "the killed targets' ports and IPAM records released",
                cleaned,
                NSM_LIFETIME + RELEASE_DELAY + SETTLE,
            )
            # The target named its namespace in its request, so NSM's forwarder deletes the
            # veth pair of a dead target too: nothing stays in the proxy's namespace.
            stray: list[str] = []

            async def unbridged_gone() -> bool:
                nonlocal stray
                now = await inventory(topology)
                stray = sorted(now.links - now.ports - {"lo", "bridge0"})
                return not stray

            await topology.wait_until("the dead target's veth deleted", unbridged_gone, SETTLE)
            await topology.remove_target(crashed)
            for index, what in ((crashed, "namespace kept"), (deleted, "namespace deleted")):
                print(
                    f"tg{index} SIGKILLed ({what}): its port left the bridge after"
                    f" {port_gone[index]:.1f}s, its IPAM records went after"
                    f" {records_gone[index]:.1f}s (NSM lifetime {NSM_LIFETIME:g}s, release"
                    f" delay {RELEASE_DELAY:g}s)"
                )
            log = topology.log("proxy")
            for key in keys.values():
                # Its own expiry or NSM's Close, whichever came first (both at the expiry of
                # the manager's path segment).
                reasons = re.findall(rf"target disconnected .*key={key} reason=(\w+)", log)
                assert reasons, f"the proxy never said {key} disconnected"
                print(f"  the proxy's log: target disconnected key={key} reason={reasons[-1]}")

        # Traffic from the targets that stayed went on through all of it.
        reports = streams.reports()
        for stream, report in reports.items():
            print(f"during the churn, tg{stream.target} IPv{stream.version}: {report}")
        assert all(r.lost == 0 and r.received > 0 for r in reports.values()), reports

        # Nothing left but what the LBs and the remaining targets need.
        wanted = expected_records(topology)
        last = None

        async def settled() -> bool:
            nonlocal last
            last = await inventory(topology)
            return set(last.records) == wanted and last.vip_rules == expected_vips(topology)

        try:
            await topology.wait_until("IPAM records and VIP rules as expected", settled, SETTLE)
        except Exception:
            assert last is not None
            print("IPAM records not expected:", sorted(set(last.records) - wanted))
            print("IPAM records missing:", sorted(wanted - set(last.records)))
            raise
        final = await inventory(topology)
        ports = expected_ports(topology)
        print(
            f"after the churn: {len(final.ports)} bridge ports ({len(ports)} expected),"
            f" {len(final.links)} interfaces, {len(final.vip_rules)} VIP rules,"
            f" {len(final.routes)} routes, {len(final.records)} IPAM records"
            f" ({len(wanted)} expected), {len(removed)} addresses of removed targets"
        )
        assert final.ports == ports
        assert final.links == ports | {"lo", "bridge0"}
        assert final.rules == {(vip, "4096") for vip in expected_vips(topology)}
        assert final.devices_routed() <= ports | {"lo", "bridge0"}
        per_family = [("unicast", "default"), ("unreachable", "default")]
        assert final.table_routes() == sorted(per_family * len(topology.families))
        assert final.mentions(removed) == []
        assert not final.addresses & removed
        assert set(final.records) == wanted

        started = time.monotonic()
        async with stream_set(topology, per_family=1, targets=[0, 1]) as after:
            await trio.sleep(1.0)
        reports = after.reports()
        print(f"afterwards, {len(reports)} streams for {time.monotonic() - started:.1f}s:")
        for stream, report in reports.items():
            print(f"  tg{stream.target} IPv{stream.version}: {report}")
        assert all(r.lost == 0 and r.received > 0 for r in reports.values()), reports
    assert leftovers(topology.state) == []
