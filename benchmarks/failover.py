"""End-to-end failover figures in the lab, repeated: LB loss three ways, an LB added, the proxy
SIGKILLed, each peer restarted, and the slow cases the tests leave out (a frozen LB with a
one-minute registration, legacy multipath egress). `python -m benchmarks.failover --help`.

Every scenario runs in a lab of its own (`proxy.lab.topology`), measured by
`proxy.lab.scenarios` exactly as tests/e2e does; what is printed is min-max over the runs.
Root: the lab makes network namespaces, and takes every one of them away again.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import trio

from proxy.lab.demo import DEMO_PROXY_ENV
from proxy.lab.scenarios import LossHow, lb_added, lb_loss, peer_restart, proxy_restart
from proxy.lab.topology import Topology, TopologySpec

Figures = dict[str, float]
Scenario = Callable[[Path], Awaitable[Figures]]

FAST_LB_LIFETIME = 3.0


def lab(state_dir: Path, **fields: object) -> TopologySpec:
    return TopologySpec(name=f"b{secrets.token_hex(3)}", state_dir=state_dir, **fields)  # type: ignore[arg-type]


def loss(how: LossHow, lb_lifetime: float = FAST_LB_LIFETIME, mode: str = "") -> Scenario:
    async def scenario(state_dir: Path) -> Figures:
        env = {"NSM_EGRESS_MODE": mode} if mode else {}
        spec = lab(state_dir, lbs=3, lb_lifetime=lb_lifetime, proxy_env=env)
        async with Topology.running(spec) as topology:
            f = await lb_loss(topology, how, within=lb_lifetime * 3)
        return {
            "LB out of the proxy's groups, s": f.out_of_groups_s,
            "blackhole: its streams' packets lost": f.victim_streams.lost,
            "blackhole: worst stream, ms": f.victim_streams.worst_ms,
            "streams on survivors: packets lost": f.survivor_streams.lost,
            "streams on survivors: moved": f.survivor_streams.moved,
            "flows on survivors: moved": f.flows_moved,
            "flows on survivors: of": f.flows_on_survivors,
            "flows on survivors: unanswered": f.flows_lost,
            "its flows unanswered after": f.orphans - f.orphans_answered,
        }

    return scenario


async def added(state_dir: Path) -> Figures:
    async with Topology.running(lab(state_dir, lbs=2, proxy_env=DEMO_PROXY_ENV)) as topology:
        f = await lb_added(topology)
    return {
        "new LB in the proxy's groups (from its start), s": f.in_groups_s,
        "then holding buckets, s": f.buckets_s,
        "running streams moved": f.active_streams.moved,
        "running streams: packets lost": f.active_streams.lost,
        "new flows through it, %": 100 * f.new_flows_on_added / f.new_flows,
    }


async def restart(state_dir: Path) -> Figures:
    async with Topology.running(lab(state_dir)) as topology:
        f = await proxy_restart(topology)
    return {
        "SIGKILL -> Readiness SERVING, s": f.ready_s,
        "streams: packets lost": f.streams.lost,
        "streams moved": f.streams.moved,
        "bridge MAC changed": float(f.before.bridge_mac != f.after.bridge_mac),
        "addresses changed": float(
            f.before.bridge_addresses != f.after.bridge_addresses
            or f.before.target_addresses != f.after.target_addresses
        ),
        "ports replaced": float(f.before.ports != f.after.ports),
        "IPAM records before": len(f.before.records),
        "IPAM records after": len(f.after.records),
        "IPAM records no interface holds": len(f.leaked),
    }


def peer(name: str, service: str) -> Scenario:
    async def scenario(state_dir: Path) -> Figures:
        env = {"NSM_MAX_TOKEN_LIFETIME": "12s"} if name == "nsm" else {}
        async with Topology.running(lab(state_dir, proxy_env=env)) as topology:
            f = await peer_restart(topology, name, after=8.0 if name == "nsm" else 1.0)
        return {
            f"{name} away (stop -> listening again), s": f.down_s,
            "streams: packets lost": f.streams.lost,
            f"{service} not SERVING, s": f.not_serving_s[service],
            "Readiness not SERVING, s": f.not_serving_s["Readiness"],
            "restart -> every service SERVING, s": f.ready_again_s,
        }

    return scenario


SCENARIOS: Mapping[str, tuple[str, Scenario]] = {
    "unregister": ("LB unregisters (SIGTERM), 3 LBs", loss("unregister")),
    "vanish": ("LB namespace and interface vanish, 3 LBs", loss("vanish")),
    "freeze": (
        f"LB frozen (SIGSTOP), registration lifetime {FAST_LB_LIFETIME:g}s, 3 LBs",
        loss("freeze"),
    ),
    "added": ("LB added (2 -> 3), idle timer 1s", added),
    "restart": ("proxy SIGKILLed and started again", restart),
    "ipam": ("IPAM restarted (1 s away)", peer("ipam", "IPAMCli")),
    "nsp": ("NSP restarted (1 s away)", peer("nsp", "NSPCli")),
    "nsm": (
        "NSM manager restarted (1 s away), refreshes through the new one",
        peer("nsm", "NSMEndpoint"),
    ),
    "vanish-multipath": (
        "LB vanishes, legacy multipath egress (NSM_EGRESS_MODE=multipath), 3 LBs",
        loss("vanish", mode="multipath"),
    ),
    "freeze-1m": (
        "LB frozen (SIGSTOP), registration lifetime 1m (the lab's default), 3 LBs",
        loss("freeze", lb_lifetime=60.0),
    ),
}
SLOW = ("freeze-1m",)  # runs once, and only when asked or with --all


def span(values: list[float]) -> str:
    def show(value: float) -> str:
        return f"{value:.3f}" if value % 1 else f"{value:.0f}"

    low, high = min(values), max(values)
    return show(low) if low == high else f"{show(low)}-{show(high)}"


async def run(names: list[str], runs: int, state_dir: Path) -> None:
    for name in names:
        title, scenario = SCENARIOS[name]
        count = 1 if name in SLOW else runs
        collected: dict[str, list[float]] = {}
        started = time.monotonic()
        for _ in range(count):
            for key, value in (await scenario(state_dir)).items():
                collected.setdefault(key, []).append(float(value))
        print(f"\n{title} ({count} runs, {time.monotonic() - started:.0f}s)", flush=True)
        width = max(map(len, collected))
        for key, values in collected.items():
            print(f"  {key:<{width}}  {span(values)}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.failover", description=__doc__)
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"some of: {', '.join(SCENARIOS)} (default: all but {', '.join(SLOW)})",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each scenario (default 3)")
    parser.add_argument("--all", action="store_true", help="the slow scenarios too")
    options = parser.parse_args()
    unknown = [name for name in options.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"no scenario {', '.join(unknown)}; scenarios: {', '.join(SCENARIOS)}")
    if os.geteuid() != 0:
        print("the benchmark needs root (network namespaces)", file=sys.stderr)
        return 1
    names = options.scenarios or [n for n in SCENARIOS if options.all or n not in SLOW]
    print(f"end-to-end failover in the lab ({os.uname().release}, {os.cpu_count()} CPUs)")
    state_dir = Path(tempfile.mkdtemp(dir="/tmp", prefix="mp-bench-"))
    try:
        trio.run(run, names, options.runs, state_dir)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
