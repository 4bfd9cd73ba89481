"""`meridio-proxy lab demo`: the lab up, real traffic through the proxy, one LB taken away and
brought back, every claim checked, the lab down. Exit status 0 only if every check held.

How a flow's path is known, two ways that must agree:

* **observed**: the outside host has one link per LB (`lb0`, `lb1`, ...) and an AF_PACKET
  recorder notes the link each flow's packets arrive on (`traffic.PathRecorder`);
* **counted**: each LB's outside link counts the packets it sent.

Not by `ip route get ... ipproto P sport S dport D` in the proxy's namespace: the kernel hashes
a target socket's packets on the socket's random flow hash, not on their 5-tuple (see
`Topology.egress_choices`), so that prediction is right for about half the flows with two LBs.

The flows are kept open between rounds (UDP sockets and TCP connections with fixed source
ports), so "moved" means the same 5-tuple took another LB, and a TCP connection that moved had
to survive the move.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable

import trio

from proxy.lab.scenarios import FlowProbe, Round, flow_probe, wait_rebalanced
from proxy.lab.state import leftovers
from proxy.lab.topology import Topology, TopologySpec

__all__ = ["DEMO_PROXY_ENV", "Checks", "run_demo"]

# A returning LB gets the buckets that were idle this long (the proxy's default is 5s).
DEMO_PROXY_ENV = {"NSM_ECMP_IDLE_TIMER": "1s"}
BAR = 30
EXTRA_PACKETS = 20  # an LB's counter and the recorder may differ by its ARP/NDP traffic
LOST = "(lost)"


class Checks:
    """Claims and whether they held, printed as they are made."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.results: list[tuple[bool, str]] = []

    def __call__(self, ok: bool, text: str) -> bool:
        self.results.append((ok, text))
        self.out(f"  {'✓' if ok else '✗'} {text}")
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.results)

    @property
    def held(self) -> int:
        return sum(1 for ok, _ in self.results if ok)


class Demo:
    def __init__(self, topology: Topology, probe: FlowProbe, check: Checks) -> None:
        self.topology = topology
        self.probe = probe
        self.out = check.out
        self.check = check

    async def round(self, what: str) -> Round:
        """One message on every flow; prints the spread over the LBs and checks that every
        flow was answered, came through one LB, and that the LBs' counters agree."""
        result = await self.probe.round()
        total = len(result.answers)
        self.out(
            f"  {what}: {total} flows, one message each;"
            f" {total - len(result.failed)} answered in {result.elapsed:.1f}s"
        )
        self.distribution(result)
        retried = sum(1 for a in result.answers.values() if a.ok and a.tries > 1)
        self.check(
            not result.failed,
            f"every flow answered by the outside host: {total - len(result.failed)}/{total}"
            + (f" ({retried} UDP flows needed a resend)" if retried else "")
            + (f"; unanswered: {_kinds(result)}" if result.failed else ""),
        )
        split = self.probe.split()
        self.check(not split, f"every flow came through one LB only ({len(split)} split)")
        lbs = sorted(set(result.counted) | set(result.seen), key=_lb_order)
        apart = [
            f"{lb}: counted {result.counted.get(lb, 0)}, seen {result.seen.get(lb, 0)}"
            for lb in lbs
            if abs(result.counted.get(lb, 0) - result.seen.get(lb, 0)) > EXTRA_PACKETS
        ]
        self.check(
            not apart,
            "each LB's own packet counter agrees with what the outside host saw from it"
            + (f" ({'; '.join(apart)})" if apart else ""),
        )
        return result

    def distribution(self, result: Round) -> None:
        placement = result.placement
        per_lb = Counter(lb for lb in placement.values() if lb)
        names = sorted(set(result.counted) | set(per_lb), key=_lb_order)
        total = max(1, sum(per_lb.values()))
        rows = [f"    {'LB':<5} {'UDP':>5} {'TCP':>5} {'packets':>8}  flows"]
        for name in names:
            udp = sum(1 for k, lb in placement.items() if lb == name and k[0] == "udp")
            tcp = sum(1 for k, lb in placement.items() if lb == name and k[0] == "tcp")
            share = per_lb[name] / total
            bar = "█" * round(share * BAR)
            packets = result.counted.get(name, 0)
            rows.append(f"    {name:<5} {udp:>5} {tcp:>5} {packets:>8}  {bar:<{BAR}} {share:6.1%}")
        self.out("\n".join(rows))

    def moves(self, before: Round, after: Round) -> None:
        moves = Counter(
            (before.placement[k] or LOST, after.placement[k] or LOST) for k in before.placement
        )
        rows = ["    before -> after    flows"]
        for (old, new), count in sorted(moves.items(), key=lambda i: (_lb_order(i[0][0]), i[0])):
            note = "stayed" if old == new else "moved"
            rows.append(f"    {old:>6} -> {new:<7} {count:>5}  {note}")
        self.out("\n".join(rows))


def _kinds(result: Round) -> str:
    kinds = Counter(
        f"{protocol}/IPv{6 if ':' in source else 4}"
        f" via {result.placement.get((protocol, source, sport)) or 'nothing seen outside'}"
        for protocol, source, sport in result.failed
    )
    return ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))


def _lb_order(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name if c.isdigit())
    return (int(digits) if digits else 1 << 30, name)


async def run_demo(
    spec: TopologySpec, *, udp: int = 200, tcp: int = 50, out: Callable[[str], None] = print
) -> bool:
    """The whole demo; True when every check held."""
    from proxy.lab.status import collect, render

    started = time.monotonic()
    families = " and ".join(f"IPv{v}" for v in spec.families)
    out(
        f"meridio-proxy lab demo: {spec.lbs} LBs, {spec.targets} targets, {families}.\n"
        f"Traffic: from each target's VIP of each family to the outside host, {udp} UDP flows\n"
        f"and {tcp} TCP connections, kept open; the outside host has one link per LB, so it\n"
        "sees which LB carried each flow.\n"
    )
    out("BRINGING THE LAB UP")
    topology = await Topology.up(spec, progress=lambda line: out("  " + line))
    check = Checks(out)
    try:
        out("\n" + render(await collect(topology)))
        async with flow_probe(topology, udp=udp, tcp=tcp) as probe:
            await _rounds(Demo(topology, probe, check))
    finally:
        with contextlib.suppress(Exception):  # a closed stdout must not keep the lab up
            out("\nTAKING THE LAB DOWN")
        try:
            await topology.down()
        except Exception as exc:
            with contextlib.suppress(Exception):
                out(f"  {exc}")
    left = leftovers(topology.state)
    check(
        not left,
        "nothing left: no namespace, process, socket or state file"
        + (f" (left: {', '.join(left)})" if left else ""),
    )
    elapsed = time.monotonic() - started
    verdict = "PASS" if check.ok else "FAIL"
    out(f"\n{verdict}: {check.held}/{len(check.results)} checks held, in {elapsed:.0f}s")
    return check.ok


async def _rounds(demo: Demo) -> None:
    topology, out, check = demo.topology, demo.out, demo.check
    lbs = sorted((lb.name for lb in topology.lbs.values()), key=_lb_order)

    out("\n1. TRAFFIC OVER EVERY LB")
    first = await demo.round("round 1")
    for version in topology.families:
        flows = [k for k in first.placement if (":" in k[1]) == (version == 6)]
        bound = len(flows) / len(lbs) / 2
        counts = Counter(first.placement[k] for k in flows)
        check(
            all(counts[lb] >= bound for lb in lbs),
            f"IPv{version}: each LB carries at least half an even share ({bound:.0f} of"
            f" {len(flows)} flows): " + ", ".join(f"{lb} {counts[lb]}" for lb in lbs),
        )

    index = max(topology.lbs)
    victim = topology.lbs[index].name
    survivors = [lb for lb in lbs if lb != victim]
    out(f"\n2. {victim.upper()} STOPS (SIGTERM: it unregisters; the outside host withdraws it)")
    started = trio.current_time()
    await topology.stop_lb(index, signal.SIGTERM)
    exited = trio.current_time() - started
    await topology.wait_lb_member(victim, present=False)
    gone = trio.current_time() - started
    out(
        f"  {victim} exited {exited:.2f}s after SIGTERM; the proxy had it out of its nexthop"
        f" groups {gone:.2f}s after SIGTERM"
    )
    second = await demo.round("round 2, the same flows")
    demo.moves(first, second)
    stayed = [k for k in first.placement if first.placement[k] in survivors]
    moved = [k for k in stayed if second.placement[k] != first.placement[k]]
    lost = [k for k in stayed if k in second.failed]
    check(
        not moved and not lost,
        f"flows on {', '.join(survivors)} that moved: {len(moved)}, lost: {len(lost)}"
        f" (of {len(stayed)}; goal 0)",
    )
    orphans = [k for k in first.placement if first.placement[k] == victim]
    rehomed = [k for k in orphans if second.placement[k] in survivors and k not in second.failed]
    tcp = sum(1 for k in rehomed if k[0] == "tcp")
    check(
        len(rehomed) == len(orphans),
        f"{victim}'s flows answered through {', '.join(survivors)} now: {len(rehomed)}"
        f"/{len(orphans)} (TCP connections among them that survived the move: {tcp})",
    )
    check(
        second.seen.get(victim, 0) == 0 and second.counted.get(victim, 0) <= EXTRA_PACKETS,
        f"{victim} carried no flow while stopped (packets: {second.seen.get(victim, 0)})",
    )

    out(f"\n3. {victim.upper()} COMES BACK")
    started = trio.current_time()
    await topology.start_lb(index)
    back = trio.current_time() - started
    balanced = await wait_rebalanced(topology, victim)
    out(
        f"  {victim} was in the proxy's nexthop groups {back:.2f}s after it started; buckets"
        f" idle for NSM_ECMP_IDLE_TIMER moved to it {balanced:.2f}s later"
    )
    third = await demo.round("round 3, the same flows")
    demo.moves(second, third)
    returned = [k for k in third.placement if third.placement[k] == victim]
    check(bool(returned), f"{victim} carries flows again: {len(returned)}")
    strays = [
        k
        for k in third.placement
        if third.placement[k] != second.placement[k] and third.placement[k] != victim
    ]
    check(not strays, f"flows that changed LB went to {victim} only (others: {len(strays)})")
