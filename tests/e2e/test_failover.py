"""LB loss three ways, and an LB added, with packets (scenarios 3 and 4).

Three LBs, so that "flows on the surviving LBs that moved" means something (with two, every
flow that stays has nowhere else to go). The figures are printed (`pytest -s`); the
benchmarks (`make bench`) repeat them and `benchmarks/README.md` records them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.lab.demo import DEMO_PROXY_ENV
from proxy.lab.scenarios import LossHow, lb_added, lb_loss
from proxy.lab.state import leftovers
from proxy.lab.topology import Topology
from tests.e2e.conftest import spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

LB_LIFETIME = 3.0  # a frozen LB is out of the registry within this


@pytest.mark.parametrize("how", ["unregister", "vanish", "freeze"])
async def test_lb_loss(state_dir: Path, how: LossHow) -> None:
    """An LB goes while streams and flows run. Its streams lose at most what was in flight
    until the proxy dropped it; nothing on the surviving LBs moves or is lost; its flows are
    answered through the survivors."""
    lab = spec(state_dir, lbs=3, lb_lifetime=LB_LIFETIME)
    async with Topology.running(lab) as topology:
        figures = await lb_loss(topology, how)
        print(figures)
        victim, survivors = figures.victim_streams, figures.survivor_streams
        print(
            f"{how}: {figures.victim} out of the groups after {figures.out_of_groups_s:.3f}s;"
            f" its {victim.count} streams lost {victim.lost} packets (worst"
            f" {victim.worst_ms:.0f} ms); {survivors.count} streams on survivors lost"
            f" {survivors.lost}, moved {survivors.moved}; flows on survivors moved"
            f" {figures.flows_moved}/{figures.flows_on_survivors}"
        )
        assert victim.count >= 2 and survivors.count >= 2, figures
        assert survivors.lost == 0 and survivors.moved == 0, figures
        assert figures.flows_moved == 0 and figures.flows_lost == 0, figures
        assert figures.orphans > 0 and figures.orphans_answered == figures.orphans, figures
        assert victim.moved == victim.count, figures  # every one of its streams went elsewhere
        ports = await topology.bridge_ports()
        assert len(ports) == 2 + 2, ports  # the survivors' and the targets': the victim's gone
        if how == "freeze":
            index = next(i for i, lb in topology.lbs.items() if lb.name == figures.victim)
            await topology.thaw_lb(index)
            await topology.wait_lb_member(figures.victim, present=True)
            assert len(await topology.bridge_ports()) == 3 + 2
    assert leftovers(topology.state) == []


async def test_lb_added(state_dir: Path) -> None:
    """A third LB joins while streams run on two: the running streams stay where they are and
    lose nothing; once its share of buckets has gone idle and moved, new flows reach it."""
    lab = spec(state_dir, lbs=2, proxy_env=DEMO_PROXY_ENV)
    async with Topology.running(lab) as topology:
        figures = await lb_added(topology)
        print(figures)
        share = figures.new_flows_on_added / figures.new_flows
        print(
            f"{figures.added} in the groups {figures.in_groups_s:.2f}s after it started, holding"
            f" buckets {figures.buckets_s:.2f}s later; running streams moved"
            f" {figures.active_streams.moved}/{figures.active_streams.count}, lost"
            f" {figures.active_streams.lost}; new flows through it:"
            f" {figures.new_flows_on_added}/{figures.new_flows} ({share:.0%}, fair 33%)"
        )
        assert figures.active_streams.moved == 0 and figures.active_streams.lost == 0, figures
        assert figures.new_flows_unanswered == 0, figures
        # Fair is 1/3: the new LB takes the idle buckets up to its share. The bound is loose
        # (binomial over ~480 flows: 1/3 ± 5 sigma is 0.23-0.44); it proves flows reach it.
        assert 0.2 <= share <= 0.47, figures
    assert leftovers(topology.state) == []
