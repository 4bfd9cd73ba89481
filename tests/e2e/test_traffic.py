"""Traffic through the proxy in the lab (scenarios 1 and 2): ingress from every LB to every
target, egress from every target's VIPs over every LB with the replies back, and how evenly
many flows spread over the LBs."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import trio

from proxy.lab.scenarios import flow_probe
from proxy.lab.state import leftovers
from proxy.lab.topology import Topology
from tests.e2e.conftest import spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]


def version_of(address: str) -> int:
    return 6 if ":" in address else 4


async def test_ingress_and_egress_over_every_lb(topology: Topology) -> None:
    """Ingress: each LB pings each target's node-subnet address and VIPs, through the proxy's
    bridge, both families. Egress: flows from each target's VIP of each family reach the
    outside host over every LB, and every one is answered."""
    pings: dict[tuple[str, str], bool] = {}

    async def ping(lb: str, address: str) -> None:
        done = await topology.run(
            lb, "ping", f"-{version_of(address)}", "-c", "1", "-W", "2", address, check=False
        )
        pings[lb, address] = done.returncode == 0

    async with trio.open_nursery() as nursery:
        for lb in topology.lbs.values():
            for index in topology.targets:
                addresses = (await topology.target_addresses(index)).values()
                vips = [topology.vip(index, v) for v in topology.families]
                for address in [*addresses, *vips]:
                    nursery.start_soon(ping, lb.name, address)
    failed = sorted(key for key, ok in pings.items() if not ok)
    print(f"ingress: {len(pings) - len(failed)}/{len(pings)} pings from an LB answered")
    assert len(pings) == 2 * 2 * 4 and not failed, failed

    async with flow_probe(topology, udp=40, tcp=10) as probe:
        first = await probe.round()
    spread: Counter[tuple[str, int, str | None]] = Counter(
        (source, version_of(source), lb) for (_, source, _), lb in first.placement.items()
    )
    for key, count in sorted(spread.items(), key=str):
        print("egress", *key, count)
    assert not first.failed, sorted(first.failed)
    assert not probe.split()
    lbs = {lb.name for lb in topology.lbs.values()}
    for index in topology.targets:
        for version in topology.families:
            vip = topology.vip(index, version)
            carriers = {lb for (source, _, lb), n in spread.items() if source == vip and n}
            assert carriers == lbs, (vip, spread)


async def test_distribution_over_four_lbs(state_dir: Path) -> None:
    """1000 flows (UDP and TCP, from two targets' VIPs, both families) over four LBs: each LB
    carries a fair share. The bound: within 5 standard deviations of the binomial count (a fair
    spread fails it with a chance below 1e-5 per LB); the figures printed say how close."""
    lab = spec(state_dir, lbs=4)
    async with Topology.running(lab) as topology:
        async with flow_probe(topology, udp=200, tcp=50) as probe:
            result = await probe.round()
        assert not result.failed, sorted(result.failed)
        lbs = sorted(lb.name for lb in topology.lbs.values())
        for version in topology.families:
            placed = [
                lb for (_, src, _), lb in result.placement.items() if version_of(src) == version
            ]
            counts = Counter(placed)
            flows, share = len(placed), 1 / len(lbs)
            fair = flows * share
            sigma = math.sqrt(flows * share * (1 - share))
            chi2 = sum((counts[lb] - fair) ** 2 / fair for lb in lbs)
            worst = max(abs(counts[lb] - fair) for lb in lbs)
            print(
                f"IPv{version}: {flows} flows over {len(lbs)} LBs: "
                + ", ".join(f"{lb} {counts[lb]}" for lb in lbs)
                + f"; fair {fair:.0f}, worst {worst / fair:.1%} off ({worst / sigma:.1f} sigma),"
                f" chi-square {chi2:.2f} ({len(lbs) - 1} degrees of freedom)"
            )
            assert sum(counts[lb] for lb in lbs) == flows, counts
            for lb in lbs:
                assert abs(counts[lb] - fair) <= 5 * sigma, (version, counts)
    assert leftovers(topology.state) == []
