"""The sysctls in a real, throw-away network namespace: fixed there, and only there.

The host's values are read before and after and must not change: /proc/sys/net shows the network
namespace of the thread that opens the file, so the writes land in the namespace only when they
run on a thread inside it (the netlink worker's).
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator

import pytest
import trio

from proxy.kernel import sysctl
from proxy.kernel.model import FAMILIES, Family
from proxy.kernel.netlink import NetlinkWorker, in_netns
from proxy.kernel.sysctl import REQUIRED

pytestmark = [
    pytest.mark.root,
]

WRONG = {
    "net.ipv4.conf.all.forwarding": "0",
    "net.ipv4.fib_multipath_hash_policy": "0",
    "net.ipv4.conf.all.rp_filter": "1",
    "net.ipv4.conf.default.rp_filter": "2",
    "net.ipv6.conf.all.forwarding": "0",
    "net.ipv6.fib_multipath_hash_policy": "0",
    "net.ipv6.conf.all.accept_dad": "1",
    "net.ipv6.conf.default.accept_dad": "1",
}


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"mp-sys-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def host_values() -> dict[str, str | None]:
    return {s.name: sysctl.read_proc(s.name) for s in REQUIRED}


def netns_values(netns: str) -> dict[str, str | None]:
    return in_netns(netns, host_values)


def set_in_netns(netns: str, values: dict[str, str]) -> None:
    def write_all() -> None:
        for name, value in values.items():
            sysctl.write_proc(name, value)

    in_netns(netns, write_all)


def test_proc_sys_shows_the_namespace_of_the_thread(netns):
    name = "net.ipv4.fib_multipath_hash_policy"
    host = sysctl.read_proc(name)
    assert host is not None
    other = "1" if host != "1" else "0"
    set_in_netns(netns, {name: other})
    assert in_netns(netns, lambda: sysctl.read_proc(name)) == other
    # The same process, another thread (this one, in the host's namespace): unchanged.
    assert sysctl.read_proc(name) == host


async def test_ensure_fixes_wrong_values_in_the_namespace_only(netns):
    set_in_netns(netns, WRONG)
    assert netns_values(netns) == WRONG
    before = host_values()
    worker = NetlinkWorker(netns)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        report = await sysctl.ensure_and_log(worker, FAMILIES)
        nursery.cancel_scope.cancel()
    assert report.ok, report.failed
    assert {r.sysctl.name: r.found for r in report.fixed} == WRONG
    assert netns_values(netns) == {s.name: s.value for s in REQUIRED}
    assert host_values() == before


async def test_ensure_only_touches_families_in_use(netns):
    set_in_netns(netns, WRONG)
    worker = NetlinkWorker(netns)
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        report = await worker.call(lambda _ipr: sysctl.ensure((Family.V4,)))
        nursery.cancel_scope.cancel()
    assert {r.sysctl.family for r in report.results} == {Family.V4}
    values = netns_values(netns)
    assert values["net.ipv4.conf.all.forwarding"] == "1"
    assert values["net.ipv6.conf.all.forwarding"] == "0"  # left alone: IPv6 not in use


def test_second_ensure_finds_everything_right(netns):
    set_in_netns(netns, WRONG)
    first = in_netns(netns, sysctl.ensure)
    second = in_netns(netns, sysctl.ensure)
    assert len(first.fixed) == len(REQUIRED)
    assert second.fixed == [] and len(second.already) == len(REQUIRED)
