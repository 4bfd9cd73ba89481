"""The lab on mutual TLS (its default): SVIDs rotated under traffic, and what is refused.

The rest of tests/e2e runs secured too; this file checks what only security changes: every
workload takes the rotated SVIDs while traffic flows without loss, new connections are made
with the new SVIDs, and the proxy's endpoint refuses a caller without one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio

from proxy.api.health.v1.health_grpc import HealthStub
from proxy.api.health.v1.health_pb2 import HealthCheckRequest
from proxy.lab.scenarios import peer_restart, stream_set
from proxy.lab.state import leftovers
from proxy.lab.topology import Topology
from proxy.rpc import UnavailableError, open_channel
from tests.e2e.conftest import spec

pytestmark = [pytest.mark.root, pytest.mark.timeout(150)]

ROTATE = 2.0  # seconds between SVID rotations here (SPIRE's default: half an SVID's hour)


def rotations(log: str) -> int:
    return len(re.findall(r"identity rotated", log))


async def test_svids_rotate_under_traffic_without_loss(state_dir: Path) -> None:
    async with Topology.running(spec(state_dir, svid_rotate=ROTATE)) as topology:
        before = rotations(topology.log("proxy"))
        async with stream_set(topology, per_family=2, rate=200) as streams:
            await trio.sleep(ROTATE * 2.5)
        reports = streams.reports()
        lost = sum(r.lost for r in reports.values())
        rotated = {
            role: rotations(topology.log(role)) for role in ("proxy", "nsm", "ipam", "lb0", "tg0")
        }
        print(f"rotations seen: {rotated}; {len(reports)} streams lost {lost} packets")
        assert rotations(topology.log("proxy")) - before >= 2
        assert all(count >= 2 for count in rotated.values()), rotated
        assert lost == 0, reports
        # A new connection after the rotations (IPAM restarted: the proxy dials it again) is
        # made with the new SVIDs, and everything is ready again.
        figures = await peer_restart(topology, "ipam", down_for=0.5)
        assert figures.statuses["IPAMCli"][-1] == "SERVING", figures
    assert leftovers(topology.state) == []


async def test_the_proxy_endpoint_refuses_a_caller_without_an_svid(topology: Topology) -> None:
    # The proxy's private socket directory, as the lab noted it (/tmp/<NSM_NAME>-*).
    [directory] = [p for p in topology.state.paths if Path(p).name.startswith(topology.proxy_name)]
    socket = f"{directory}/listen.on"
    with pytest.raises(UnavailableError), trio.fail_after(10):
        async with open_channel(f"unix://{socket}", connect_timeout=2) as channel:
            await HealthStub(channel).Check(HealthCheckRequest())
    await trio.sleep(0.2)
    assert "TLS handshake refused" in topology.log("proxy")
    assert set((await topology.health()).values()) == {"SERVING"}
