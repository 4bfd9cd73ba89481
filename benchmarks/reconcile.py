"""Benchmark of the kernel dataplane (root; one throw-away namespace, removed at the end).

1. Reconcile from empty to 64 LBs x 2 families + 1000 VIPs (500 per family): wall time and
   kernel operations.
2. One LB out of 64 goes (its interface is deleted): time from the link deletion to the kernel
   updated, and the share of surviving flows that moved (ECMP decision read with `ip route get`
   over 2000 UDP flows per family).
3. Event-loop latency while reconciling: a 1 ms heartbeat task's worst lag, and the latency of
   gRPC health checks served over a UNIX socket during step 1.

Run: `make bench` (or `.venv/bin/python -m benchmarks.reconcile`). Prints one table.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import trio

from proxy import log, rpc
from proxy.api.health.v1 import health_grpc
from proxy.api.health.v1.health_pb2 import HealthCheckRequest
from proxy.health import Health, HealthServicer
from proxy.kernel.model import EgressMode, Observed, Scope, stable_mac
from proxy.kernel.monitor import LinkMonitor
from proxy.kernel.netlink import NetlinkWorker
from proxy.kernel.router import (
    ConnectionsKnown,
    Router,
    RouterEvent,
    SetBridgeAddresses,
    SetLoadBalancer,
    SetVips,
)

LBS = 64
VIPS_PER_FAMILY = 500
FLOWS = 2000


def ip(netns: str, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["ip", "-n", netns, *args], input=stdin, capture_output=True, text=True, check=True
    )
    return result.stdout


def lb_gateways(i: int) -> frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    return frozenset(
        {
            ipaddress.ip_address(f"198.18.{i // 200}.{10 + i % 200}"),
            ipaddress.ip_address(f"2001:db8::{i + 10:x}"),
        }
    )


def flows(netns: str, version: int) -> list[str]:
    vip, dst = (
        ("198.19.0.0", "203.0.113.7") if version == 4 else ("2001:db8:ff::", "2001:db8:ee::7")
    )
    lines = "".join(
        f"route get {dst} from {vip} iif bridge0 ipproto udp sport {10000 + n} dport 53\n"
        for n in range(FLOWS)
    )
    out = ip(netns, "-j", "-batch", "-", stdin=lines)
    decoder, position, found = json.JSONDecoder(), 0, []
    while position < len(out):
        if out[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(out, position)
        found.append(value[0].get("gateway", "?"))
    return found


def members(observed: Observed | None) -> int:
    if observed is None:
        return 0
    return sum(len(nh.members) for nh in observed.nexthops.values() if nh.is_group)


async def wait_for(router: Router, condition) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    seen = router.observed.value
    while not condition(seen):
        seen = await router.observed.wait_change(seen)
    return time.perf_counter() - start


async def heartbeat(lags: list[float]) -> None:
    while True:
        before = trio.current_time()
        await trio.sleep(0.001)
        lags.append(trio.current_time() - before - 0.001)


async def health_checks(path: str, latencies: list[float]) -> None:
    async with rpc.open_channel(f"unix://{path}") as channel:
        stub = health_grpc.HealthStub(channel)
        while True:
            start = time.perf_counter()
            await stub.Check(HealthCheckRequest(service=""))
            latencies.append(time.perf_counter() - start)
            await trio.sleep(0.005)


def prepare(netns: str) -> None:
    """The namespace's sysctls (as the proxy's init container sets them) and 64 veth "LBs"."""
    for name, value in [
        ("net.ipv4.conf.all.forwarding", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        ("net.ipv4.fib_multipath_hash_policy", "1"),
        ("net.ipv6.fib_multipath_hash_policy", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
    ]:
        command = ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name}={value}"]
        subprocess.run(command, check=True)
    batch = "".join(
        f"link add lb{i} type veth peer name lb{i}p\nlink set lb{i} up\nlink set lb{i}p up\n"
        for i in range(LBS)
    )
    ip(netns, "-batch", "-", stdin=batch)


async def run(netns: str, socket_dir: str) -> dict[str, str]:
    worker = NetlinkWorker(netns)
    router = Router(
        worker, Scope(mode=EgressMode.RESILIENT), stable_mac("bench", "t", "c"), interval=3600
    )
    send, receive = trio.open_memory_channel[RouterEvent](10_000)
    results: dict[str, str] = {}
    socket_path = f"{socket_dir}/health.sock"
    lags: list[float] = []
    latencies: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        await nursery.start(LinkMonitor(worker, send.clone()).run)
        await nursery.start(router.run, receive)
        await nursery.start(rpc.Server([HealthServicer(Health())]).serve_unix, socket_path)
        nursery.start_soon(heartbeat, lags)
        nursery.start_soon(health_checks, socket_path, latencies)
        await trio.sleep(0.2)
        lags.clear()
        latencies.clear()
        writes_before = router.writes

        vips = frozenset(
            {
                ipaddress.ip_network(f"198.19.{i // 250}.{i % 250}/32")
                for i in range(VIPS_PER_FAMILY)
            }
            | {ipaddress.ip_network(f"2001:db8:ff::{i:x}/128") for i in range(VIPS_PER_FAMILY)}
        )
        start = time.perf_counter()
        await send.send(
            SetBridgeAddresses(
                frozenset(
                    {
                        ipaddress.ip_interface("198.18.0.1/16"),
                        ipaddress.ip_interface("2001:db8::1/64"),
                    }
                )
            )
        )
        for i in range(LBS):
            await send.send(SetLoadBalancer(f"lb-{i}", f"lb{i}", lb_gateways(i)))
        await send.send(SetVips(vips))
        await send.send(ConnectionsKnown())
        await wait_for(
            router,
            lambda o: (
                o is not None and members(o) == 2 * LBS and len(o.rules) == 2 * VIPS_PER_FAMILY
            ),
        )
        full = time.perf_counter() - start
        results["empty -> 64 LBs x 2 families + 1000 VIPs"] = f"{full * 1000:.0f} ms"
        results["  kernel operations"] = str(router.writes - writes_before)
        results["  reconciles"] = str(router.reconciles)
        results["  event-loop lag, worst (1 ms heartbeat)"] = f"{max(lags) * 1000:.1f} ms"
        results["  event-loop lag, p99"] = f"{statistics.quantiles(lags, n=100)[98] * 1000:.1f} ms"
        results["  health Check latency p50 / max"] = (
            f"{statistics.median(latencies) * 1000:.1f} / {max(latencies) * 1000:.1f} ms"
            f" ({len(latencies)} checks)"
        )

        idle = time.perf_counter()
        assert await router.reconcile(periodic=True) == []
        results["periodic reconcile with nothing to do"] = (
            f"{(time.perf_counter() - idle) * 1000:.0f} ms"
        )

        before = {v: flows(netns, v) for v in (4, 6)}
        gone = lb_gateways(17)
        start = time.perf_counter()
        ip(netns, "link", "del", "lb17")
        took = await wait_for(router, lambda o: members(o) == 2 * (LBS - 1))
        total = (time.perf_counter() - start) * 1000
        results["one LB of 64 gone -> kernel updated"] = (
            f"{took * 1000:.1f} ms after `ip link del` returned ({total:.1f} ms with it)"
        )
        for version in (4, 6):
            after = flows(netns, version)
            survivors = [
                n for n, gw in enumerate(before[version]) if ipaddress.ip_address(gw) not in gone
            ]
            moved = sum(1 for n in survivors if after[n] != before[version][n])
            results[f"  IPv{version} surviving flows moved"] = f"{moved}/{len(survivors)}"
        nursery.cancel_scope.cancel()
    return results


def main() -> int:
    if os.geteuid() != 0:
        print("the benchmark needs root (network namespaces)", file=sys.stderr)
        return 1
    log.setup("INFO", "json")  # as a deployed proxy logs (to stdout; the table goes to stderr)
    netns = f"mp-bench-{secrets.token_hex(3)}"
    socket_dir = tempfile.mkdtemp(dir="/tmp", prefix="mp-bench-")
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        prepare(netns)
        results = trio.run(run, netns, socket_dir)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
        shutil.rmtree(socket_dir, ignore_errors=True)
    width = max(map(len, results))
    print(
        f"kernel dataplane benchmark ({os.uname().release}, {os.cpu_count()} CPUs)", file=sys.stderr
    )
    for name, value in results.items():
        print(f"  {name:<{width}}  {value}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
