"""Failure scenarios, measured with packets: what `tests/e2e` asserts and `make bench` repeats.

Each scenario breaks one thing in a running lab while traffic flows, waits for the proxy to
react, and returns its figures as a value (nothing here asserts or prints):

* `lb_loss`: an LB goes (unregisters, vanishes with its namespace, or freezes) → how long its
  streams lost packets (the blackhole window), how long until the proxy dropped it, and whether
  flows on the surviving LBs moved;
* `lb_added`: an LB comes → whether active flows stayed and how many new flows it gets;
* `proxy_restart`: the proxy is SIGKILLed and started again → egress loss, whether addresses,
  MAC and ports stayed, and IPAM records nobody holds;
* `peer_restart`: IPAM, NSP or the NSM manager restarts → loss and the health transitions.

Two kinds of traffic, because they answer different questions:

* **streams** (`StreamSet`): constant-rate UDP with sequence numbers, one socket each; lost
  packets at a known rate are a time (the blackhole window), and the outside host's interface
  says which LB carried every packet, so a stream that changed LB is seen;
* **flows** (`FlowProbe`): many UDP sockets and TCP connections kept open and exchanged once per
  round; with hundreds of them, "flows on the surviving LBs that moved" has statistical weight.

A target's socket is hashed on its own random flow hash, not its 5-tuple (see
`Topology.egress_choices`), so which LB a stream takes is only known by watching it; the victim
of an LB loss is therefore picked after the streams started, as the LB carrying streams of
every family.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Literal

import attrs
import trio

from proxy.api.health.v1 import health_grpc
from proxy.api.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from proxy.config import parse_duration
from proxy.lab import traffic
from proxy.lab.topology import HEALTH_SERVICES, OUTSIDE_HOST, Topology, TopologyError, ip_json
from proxy.rpc import open_channel, server_stream

__all__ = [
    "FlowProbe",
    "HealthLog",
    "LbAddedFigures",
    "LbLossFigures",
    "LossHow",
    "PeerRestartFigures",
    "ProxyRestartFigures",
    "Round",
    "Snapshot",
    "StreamFigures",
    "StreamKey",
    "StreamSet",
    "flow_probe",
    "ipam_records",
    "lab_addresses",
    "lb_added",
    "lb_loss",
    "leaked_records",
    "peer_restart",
    "proxy_restart",
    "stream_set",
    "wait_rebalanced",
]

LossHow = Literal["unregister", "vanish", "freeze"]
STREAM_PORT = 7200  # streams use STREAM_PORT, STREAM_PORT + 1, ...
WARM_UP = 1.0  # seconds of streaming before anything breaks: every stream has a path
AFTER = 1.0  # seconds of streaming after the proxy reacted
Placement = dict[traffic.FlowKey, str | None]


# -- streams ---------------------------------------------------------------------------------------


@attrs.frozen(order=True)
class StreamKey:
    target: int
    version: int
    port: int


class StreamSet:
    """Running constant-rate streams by key (`stream_set`), and what they saw."""

    def __init__(self) -> None:
        self.streams: dict[StreamKey, traffic.Stream] = {}

    def carrier(self, key: StreamKey, before: float | None = None) -> str | None:
        """The LB (outside interface) that carried the last packet of the stream sent before
        `before` (time.monotonic(); None: any)."""
        stream = self.streams[key]
        found = None
        for sequence in sorted(stream.arrivals):
            if before is not None and stream.sent[sequence] >= before:
                break
            found = stream.arrivals[sequence]
        return found

    def carriers(self, before: float | None = None) -> dict[StreamKey, str | None]:
        return {key: self.carrier(key, before) for key in self.streams}

    def reports(self) -> dict[StreamKey, traffic.StreamReport]:
        return {key: stream.report() for key, stream in sorted(self.streams.items())}


@asynccontextmanager
async def stream_set(
    topology: Topology,
    *,
    per_family: int = 4,
    rate: float = 200.0,
    targets: Iterable[int] | None = None,
) -> AsyncIterator[StreamSet]:
    """`per_family` streams from each target's VIP of each family to the outside host at `rate`
    packets per second each, while the body runs; every stream has carried packets before the
    body starts. All streams stop together and drain together after the body."""
    streams = StreamSet()
    stop = trio.Event()
    chosen = sorted(topology.targets) if targets is None else list(targets)

    async def one(
        key: StreamKey, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with topology.udp_stream(key.target, key.version, rate=rate, port=key.port) as s:
            streams.streams[key] = s
            task_status.started()
            await stop.wait()

    port = STREAM_PORT
    async with trio.open_nursery() as nursery:
        for target in chosen:
            for version in topology.families:
                for _ in range(per_family):
                    await nursery.start(one, StreamKey(target, version, port))
                    port += 1
        try:
            await trio.sleep(WARM_UP)
            yield streams
        finally:
            stop.set()


# -- flows -----------------------------------------------------------------------------------------


@attrs.frozen
class Round:
    placement: Placement  # the LB each flow came through (None: not seen at the outside)
    counted: dict[str, int]  # packets each LB sent to the outside (its own counter)
    seen: dict[str, int]  # packets the outside host saw from each LB
    answers: dict[traffic.FlowKey, traffic.Answer]
    elapsed: float  # seconds the exchange took
    failed: frozenset[traffic.FlowKey] = attrs.field(init=False)

    @failed.default
    def _failed(self) -> frozenset[traffic.FlowKey]:
        return frozenset(key for key, answer in self.answers.items() if not answer.ok)

    def on(self, lb: str) -> list[traffic.FlowKey]:
        return [key for key, where in self.placement.items() if where == lb]


SETTLE = 0.3  # for TCP's delayed ACKs, so the LBs' counters and the recorder see the same


class FlowProbe:
    """UDP flows and TCP connections from each target's VIPs to the outside host's echo server,
    kept open; `round()` sends one message on each and says which LB carried it."""

    def __init__(self, topology: Topology, udp: int, tcp: int) -> None:
        self.topology = topology
        self.udp = udp
        self.tcp = tcp
        self.recorder = traffic.PathRecorder(topology.netns("out"))
        self.flow_sets: list[traffic.FlowSet] = []

    @property
    def keys(self) -> list[traffic.FlowKey]:
        return [flow.key for flows in self.flow_sets for flow in flows.flows]

    async def open(self) -> None:
        """Open `udp` and `tcp` more flows from each VIP of every target."""
        topology = self.topology
        for index in sorted(topology.targets):
            for version in topology.families:
                flows = traffic.FlowSet(
                    topology.netns(topology.targets[index].name),
                    topology.vip(index, version),
                    OUTSIDE_HOST[version],
                    traffic.ECHO_PORT,
                )
                await flows.open(self.udp, self.tcp)
                self.flow_sets.append(flows)

    def close(self) -> None:
        for flows in self.flow_sets:
            flows.aclose_sync()
        self.flow_sets = []

    async def round(self) -> Round:
        """One message on every flow and where each went."""
        chosen = self.flow_sets
        await trio.sleep(SETTLE)  # whatever went before (TCP handshakes) counted and seen
        before = await self.topology.counters()
        self.recorder.reset()
        answers: dict[traffic.FlowKey, traffic.Answer] = {}
        started = trio.current_time()

        async def exchange(flows: traffic.FlowSet) -> None:
            answers.update(await flows.exchange())

        async with trio.open_nursery() as nursery:
            for flows in chosen:
                nursery.start_soon(exchange, flows)
        elapsed = trio.current_time() - started
        await trio.sleep(SETTLE)
        after = await self.topology.counters()
        keys = [flow.key for flows in chosen for flow in flows.flows]
        return Round(
            placement={key: self.recorder.path(key) for key in keys},
            counted={lb: after[lb] - before.get(lb, 0) for lb in after},
            seen=dict(self.recorder.packets),
            answers=answers,
            elapsed=elapsed,
        )

    def split(self) -> list[traffic.FlowKey]:
        """Flows whose packets came through more than one LB in the last round."""
        return [key for key in self.keys if len(self.recorder.paths(key)) > 1]


@asynccontextmanager
async def flow_probe(
    topology: Topology, *, udp: int = 100, tcp: int = 20
) -> AsyncIterator[FlowProbe]:
    """A FlowProbe with the outside host's echo server and path recorder running and its flows
    open while the body runs."""
    probe = FlowProbe(topology, udp, tcp)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            traffic.serve_echo,
            topology.netns("out"),
            [OUTSIDE_HOST[v] for v in topology.families],
            traffic.ECHO_PORT,
        )
        await nursery.start(probe.recorder.run)
        try:
            await probe.open()
            yield probe
        finally:
            probe.close()
            nursery.cancel_scope.cancel()


# -- health ----------------------------------------------------------------------------------------


class HealthLog:
    """Every status the proxy's health server sends for some services (grpc.health.v1 Watch),
    with the time it arrived (time.monotonic()); `run` follows them until cancelled."""

    def __init__(self, topology: Topology, services: Iterable[str]) -> None:
        self.address = topology.address("health")
        self.services = tuple(services)
        self.events: list[tuple[float, str, str]] = []  # (when, service, status name)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_channel(self.address, connect_timeout=2.0) as channel:
            stub = health_grpc.HealthStub(channel)
            async with trio.open_nursery() as nursery:
                for service in self.services:
                    await nursery.start(self._watch, stub, service)
                task_status.started()

    async def _watch(
        self,
        stub: health_grpc.HealthStub,
        service: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        request = HealthCheckRequest(service=service)
        async with server_stream(stub.Watch, request) as responses:
            started = False
            async for response in responses:
                name = HealthCheckResponse.ServingStatus.Name(response.status)
                self.events.append((time.monotonic(), service, name))
                if not started:
                    started = True
                    task_status.started()

    def statuses(self, service: str, since: float = 0.0) -> list[str]:
        """The statuses `service` went through from `since` on (starting with the one it had
        then), each change once."""
        found: list[str] = []
        for when, name, status in self.events:
            if name != service:
                continue
            if when < since:
                found = [status]
            elif not found or found[-1] != status:
                found.append(status)
        return found

    def down_for(self, service: str, since: float = 0.0) -> float:
        """Seconds `service` was not SERVING since `since` (up to now if it still is not)."""
        total, down_since = 0.0, None
        for when, name, status in self.events:
            if name != service:
                continue
            when = max(when, since)
            if status != "SERVING" and down_since is None:
                down_since = when
            elif status == "SERVING" and down_since is not None:
                total += when - down_since
                down_since = None
        if down_since is not None:
            total += time.monotonic() - down_since
        return total


# -- kernel and IPAM state -------------------------------------------------------------------------


async def lab_addresses(topology: Topology) -> set[str]:
    """Every global address on an interface in the proxy's, the LBs' and the targets'
    namespaces (what an IPAM record may legitimately stand for)."""
    roles = ["proxy", *(lb.name for lb in topology.lbs.values() if lb.netns is not None)]
    roles += [target.name for target in topology.targets.values() if target.netns is not None]
    found: set[str] = set()
    for role in roles:
        for addresses in (await topology.addresses(role)).values():
            found.update(addresses)
    return found


def ipam_records(topology: Topology) -> dict[str, str]:
    """The lab IPAM's child records: name (with the family, e.g. `bridge/6`) -> address."""
    path = topology.directory / "ipam.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT name, family, address FROM child").fetchall()
    return {f"{name}/{family}": str(ipaddress.ip_address(a)) for name, family, a in rows}


async def leaked_records(topology: Topology) -> dict[str, str]:
    """IPAM records whose address no interface in the lab holds."""
    assigned = await lab_addresses(topology)
    return {name: a for name, a in ipam_records(topology).items() if a not in assigned}


async def wait_rebalanced(topology: Topology, name: str, within: float = 10.0) -> float:
    """Until LB `name` holds buckets in every resilient group of the proxy (at once for a plain
    multipath route); the seconds taken."""
    from proxy.lab.status import nexthop_groups

    started = trio.current_time()

    async def holds() -> bool:
        groups = await nexthop_groups(topology, await topology.lb_addresses())
        return all(
            member["buckets"]
            for group in groups.values()
            if group["type"] == "resilient"
            for member in group["members"]
            if member["lb"] == name
        )

    await topology.wait_until(f"{name} holding buckets", holds, within)
    return trio.current_time() - started


# -- what the streams say --------------------------------------------------------------------------


@attrs.frozen
class StreamFigures:
    """Streams of one group (e.g. those on the victim) after an event."""

    count: int
    lost: int  # packets
    worst_ms: float  # the most lost by one stream, as time at the stream's rate
    moved: int  # streams that changed LB after the event

    @classmethod
    def of(cls, streams: StreamSet, keys: Iterable[StreamKey], since: float) -> StreamFigures:
        keys = list(keys)
        reports = {key: streams.streams[key].report() for key in keys}
        before = streams.carriers(since)
        moved = sum(1 for key in keys if streams.carrier(key) != before[key])
        return cls(
            count=len(keys),
            lost=sum(r.lost for r in reports.values()),
            worst_ms=max((r.lost_ms for r in reports.values()), default=0.0),
            moved=moved,
        )


def _pick_victim(carriers: dict[StreamKey, str | None], families: tuple[int, ...]) -> str:
    """The LB that carries streams of every family, the most such streams first."""
    per_lb: dict[str, Counter[int]] = {}
    for key, lb in carriers.items():
        if lb is not None:
            per_lb.setdefault(lb, Counter())[key.version] += 1
    ranked = sorted(per_lb.items(), key=lambda item: (-min(item[1][v] for v in families), item[0]))
    for lb, counts in ranked:
        if all(counts[v] for v in families):
            return lb
    raise TopologyError(f"no LB carries streams of every family: {carriers}")


def _lb_index(topology: Topology, name: str) -> int:
    return next(index for index, lb in topology.lbs.items() if lb.name == name)


# -- LB loss -----------------------------------------------------------------------------------


@attrs.frozen
class LbLossFigures:
    how: LossHow
    victim: str
    out_of_groups_s: float  # from the break until the proxy had it out of every group
    victim_streams: StreamFigures  # the streams it carried: lost = the blackhole
    survivor_streams: StreamFigures  # the streams on the other LBs (goal: no loss, none moved)
    flows_on_survivors: int
    flows_moved: int  # of those, now through another LB (goal 0)
    flows_lost: int  # of those, unanswered afterwards (goal 0)
    orphans: int  # flows the victim carried
    orphans_answered: int  # of those, answered through a survivor afterwards


async def lb_loss(
    topology: Topology,
    how: LossHow,
    *,
    per_family: int = 6,
    rate: float = 200.0,
    udp: int = 100,
    tcp: int = 20,
    within: float = 60.0,
) -> LbLossFigures:
    """One LB goes while streams and flows run; the LB is chosen as one carrying streams of every
    family. `how`: "unregister" (SIGTERM: it unregisters and removes its routes), "vanish" (its
    process killed and its namespace deleted, as a node that goes), "freeze" (SIGSTOP: its
    interface and forwarding stay, it answers nothing and its registration expires). The LB is
    not brought back."""
    async with flow_probe(topology, udp=udp, tcp=tcp) as probe:
        first = await probe.round()
        async with stream_set(topology, per_family=per_family, rate=rate) as streams:
            victim = _pick_victim(streams.carriers(), topology.families)
            index = _lb_index(topology, victim)
            broken = time.monotonic()
            started = trio.current_time()
            if how == "unregister":
                await topology.stop_lb(index, signal.SIGTERM)
            elif how == "vanish":
                await topology.delete_lb_namespace(index)
            else:
                await topology.freeze_lb(index)
            await topology.wait_lb_member(victim, present=False, within=within)
            gone = trio.current_time() - started
            await trio.sleep(AFTER)
        second = await probe.round()
    carriers = streams.carriers(broken)
    on_victim = [key for key, lb in carriers.items() if lb == victim]
    on_survivors = [key for key, lb in carriers.items() if lb not in (victim, None)]
    survivors = [key for key, lb in first.placement.items() if lb not in (victim, None)]
    orphans = first.on(victim)
    return LbLossFigures(
        how=how,
        victim=victim,
        out_of_groups_s=gone,
        victim_streams=StreamFigures.of(streams, on_victim, broken),
        survivor_streams=StreamFigures.of(streams, on_survivors, broken),
        flows_on_survivors=len(survivors),
        flows_moved=sum(1 for k in survivors if second.placement[k] != first.placement[k]),
        flows_lost=sum(1 for k in survivors if k in second.failed),
        orphans=len(orphans),
        orphans_answered=sum(1 for k in orphans if k not in second.failed),
    )


# -- LB added ----------------------------------------------------------------------------------


@attrs.frozen
class LbAddedFigures:
    added: str
    in_groups_s: float  # from starting it until it was in every group
    buckets_s: float  # then until it held buckets of every resilient group
    active_streams: StreamFigures  # streams running throughout (goal: none moved, no loss)
    new_flows: int
    new_flows_on_added: int  # new flows opened afterwards that went through it
    new_flows_unanswered: int
    lbs: int  # LBs after the addition


async def lb_added(
    topology: Topology, *, per_family: int = 4, rate: float = 200.0, udp: int = 100, tcp: int = 20
) -> LbAddedFigures:
    """An LB is added while streams run: do they stay where they are, and do new flows (opened
    once the new LB holds buckets) reach it?"""
    async with stream_set(topology, per_family=per_family, rate=rate) as streams:
        added_at = time.monotonic()
        started = trio.current_time()
        index = await topology.add_lb(wait=False)
        added = topology.lbs[index].name
        await topology.wait_lb_member(added, present=True)
        in_groups = trio.current_time() - started
        buckets = await wait_rebalanced(topology, added)
        await trio.sleep(AFTER)
    async with flow_probe(topology, udp=udp, tcp=tcp) as probe:
        after = await probe.round()
    return LbAddedFigures(
        added=added,
        in_groups_s=in_groups,
        buckets_s=buckets,
        active_streams=StreamFigures.of(streams, streams.streams, added_at),
        new_flows=len(after.placement),
        new_flows_on_added=len(after.on(added)),
        new_flows_unanswered=len(after.failed),
        lbs=len(topology.lbs),
    )


# -- proxy restart -----------------------------------------------------------------------------


@attrs.frozen
class Snapshot:
    """What must not change when the proxy restarts."""

    bridge_mac: str
    bridge_addresses: frozenset[str]
    ports: frozenset[tuple[str, int]]  # (name, ifindex) of the bridge's ports
    target_addresses: frozenset[tuple[int, int, str]]  # (target, version, address)
    records: frozenset[tuple[str, str]]  # IPAM (name/family, address)

    @classmethod
    async def take(cls, topology: Topology) -> Snapshot:
        proxy = topology.netns("proxy")
        [bridge] = await ip_json("address", "show", "dev", "bridge0", netns=proxy)
        addresses = frozenset(
            a["local"] for a in bridge.get("addr_info", []) if a.get("scope") == "global"
        )
        ports = frozenset((p["ifname"], p["ifindex"]) for p in await topology.bridge_ports())
        targets: set[tuple[int, int, str]] = set()
        for index in topology.targets:
            addressed = await topology.target_addresses(index)
            targets.update((index, version, address) for version, address in addressed.items())
        records = frozenset(ipam_records(topology).items())
        return cls(bridge["address"], addresses, ports, frozenset(targets), records)


@attrs.frozen
class ProxyRestartFigures:
    ready_s: float  # from SIGKILL until Readiness SERVING again
    streams: StreamFigures  # every stream (goal: no loss, none moved)
    before: Snapshot
    after: Snapshot
    leaked: dict[str, str]  # IPAM records no interface holds, after the release delay


async def proxy_restart(
    topology: Topology, *, per_family: int = 4, rate: float = 200.0
) -> ProxyRestartFigures:
    """SIGKILL the proxy while streams run and start it again at once; compare what it owned."""
    before = await Snapshot.take(topology)
    async with stream_set(topology, per_family=per_family, rate=rate) as streams:
        killed = time.monotonic()
        ready = await topology.restart_proxy(signal.SIGKILL)
        await trio.sleep(AFTER)
    env = topology.proxy_environment()
    await trio.sleep(float(parse_duration(env["NSM_IP_RELEASE_DELAY"])) + 0.5)
    after = await Snapshot.take(topology)
    return ProxyRestartFigures(
        ready_s=ready,
        streams=StreamFigures.of(streams, streams.streams, killed),
        before=before,
        after=after,
        leaked=await leaked_records(topology),
    )


# -- peer restarts -----------------------------------------------------------------------------


@attrs.frozen
class PeerRestartFigures:
    peer: str
    down_s: float  # how long the peer was away (stop to listening again)
    streams: StreamFigures  # every stream (goal: no loss, none moved)
    statuses: dict[str, list[str]]  # per health service: the statuses it went through
    not_serving_s: dict[str, float]  # per health service: seconds not SERVING
    ready_again_s: float  # from the restart until every service SERVING again


async def peer_restart(
    topology: Topology,
    peer: str,
    *,
    down_for: float = 1.0,
    per_family: int = 2,
    rate: float = 200.0,
    within: float = 60.0,
    after: float = AFTER,
) -> PeerRestartFigures:
    """Stop a peer, keep it away `down_for` seconds, start it again, all while streams run and
    the proxy's health is watched; wait until every health service is SERVING again, and keep
    the streams running `after` seconds more."""
    health = HealthLog(topology, HEALTH_SERVICES)
    async with trio.open_nursery() as nursery:
        await nursery.start(health.run)
        async with stream_set(topology, per_family=per_family, rate=rate) as streams:
            stopped = time.monotonic()
            started = trio.current_time()
            await topology.restart_peer(peer, down_for=down_for)
            down = trio.current_time() - started
            await topology.wait_ready(within=within)
            ready = trio.current_time() - started
            await trio.sleep(after)
        nursery.cancel_scope.cancel()
    return PeerRestartFigures(
        peer=peer,
        down_s=down,
        streams=StreamFigures.of(streams, streams.streams, stopped),
        statuses={s: health.statuses(s, stopped) for s in HEALTH_SERVICES},
        not_serving_s={s: health.down_for(s, stopped) for s in HEALTH_SERVICES},
        ready_again_s=ready,
    )
