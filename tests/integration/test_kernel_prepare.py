"""What the proxy checks of its namespace at start: nexthop support and sysctls."""

from __future__ import annotations

import subprocess

import pytest
import trio

from proxy import config
from proxy.kernel import model
from proxy.kernel.netlink import NetlinkWorker
from proxy.kernel.settings import prepare
from tests.integration.netns import ip, namespaces

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]


def read(netns: str, name: str) -> str:
    path = "/proc/sys/" + name.replace(".", "/")
    command = ["ip", "netns", "exec", netns, "cat", path]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


async def test_prepare_probes_resilient_groups_and_fixes_sysctls() -> None:
    with namespaces("proxy") as names:
        netns = names["proxy"]
        worker = NetlinkWorker(netns)
        cfg = config.load({"NSM_HOST": "node-a", "NSM_ROUTING_TABLE": "77"})
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            scope = await prepare(worker, cfg)
            nursery.cancel_scope.cancel()
        assert scope.mode is model.EgressMode.RESILIENT
        assert scope.table == 77
        assert read(netns, "net.ipv4.conf.all.forwarding") == "1"
        assert read(netns, "net.ipv6.fib_multipath_hash_policy") == "1"
        assert ip("nexthop", "show", netns=netns).strip() == ""  # the probe left nothing
