"""The router task: the one owner of the kernel state and of what is wanted of it.

Other tasks send it immutable events (what they want: bridge addresses, target ports, load
balancers with their interface and addresses, VIPs; what happened: link events). After each batch
of events, and every `interval` seconds in any case, it reconciles: dump the managed objects,
plan (a pure function), apply, check. A periodic pass that finds work repaired drift (a rule
deleted or a port detached by hand) and says so.

A load-balancer's addresses become nexthops only while its interface exists: when the interface
goes (the LB's namespace vanished), the next reconcile, triggered by the link event, takes its
nexthop out of the group, which bounds the black-hole to one netlink round-trip after the event.
"""

from __future__ import annotations

from functools import partial

import attrs
import trio
from loguru import logger
from pyroute2 import IPRoute

from proxy.kernel.apply import Applied, apply_all, describe
from proxy.kernel.model import (
    Desired,
    IPAddress,
    IPInterface,
    IPNetwork,
    Observed,
    Scope,
)
from proxy.kernel.monitor import LinkChanged, Resynced
from proxy.kernel.netlink import NetlinkWorker
from proxy.kernel.observe import Kinds, observe
from proxy.kernel.plan import (
    AddAddress,
    AddRule,
    Conflict,
    CreateBridge,
    DelAddress,
    DelNexthop,
    DelRoute,
    DelRule,
    Op,
    PutNexthop,
    PutRoute,
    SetLink,
    guard_route,
    plan,
)
from proxy.watched import Watched


@attrs.frozen
class SetBridgeAddresses:
    addresses: frozenset[IPInterface]


@attrs.frozen
class SetTargetPort:
    name: str
    wanted: bool = True


@attrs.frozen
class SetLoadBalancer:
    """An LB connection: its interface becomes a port, its addresses nexthops (while it exists)."""

    key: str
    interface: str
    addresses: frozenset[IPAddress]


@attrs.frozen
class RemoveLoadBalancer:
    key: str


@attrs.frozen
class SetVips:
    vips: frozenset[IPNetwork]


@attrs.frozen
class ConnectionsKnown:
    """Every load-balancer connection there is has been reported (the mesh has settled after
    start): the LB nexthops a previous instance left and nobody wants now may go."""


RouterEvent = (
    SetBridgeAddresses
    | SetTargetPort
    | SetLoadBalancer
    | RemoveLoadBalancer
    | SetVips
    | ConnectionsKnown
    | LinkChanged
    | Resynced
)


@attrs.frozen
class LoadBalancer:
    interface: str
    addresses: frozenset[IPAddress]


@attrs.define
class Intent:
    """What the rest of the proxy has asked for (owned by the router task)."""

    bridge_addresses: frozenset[IPInterface] = frozenset()
    target_ports: frozenset[str] = frozenset()
    load_balancers: dict[str, LoadBalancer] = attrs.field(factory=dict)
    vips: frozenset[IPNetwork] = frozenset()
    released_ports: frozenset[str] = frozenset()  # said to be no longer wanted
    # Until a source has spoken, the router adopts what the kernel holds for it instead of
    # removing it: a restart must not drop traffic while IPAM, NSP and NSM are asked again.
    addresses_known: bool = False
    vips_known: bool = False
    connections_known: bool = False

    def update(self, event: RouterEvent) -> None:
        match event:
            case SetBridgeAddresses(addresses=addresses):
                self.bridge_addresses = addresses
                self.addresses_known = True
            case SetTargetPort(name=name, wanted=True):
                self.target_ports |= {name}
                self.released_ports -= {name}
            case SetTargetPort(name=name, wanted=False):
                self.target_ports -= {name}
                self.released_ports |= {name}
            case SetLoadBalancer(key=key, interface=interface, addresses=addresses):
                self.load_balancers[key] = LoadBalancer(interface, addresses)
                self.released_ports -= {interface}
            case RemoveLoadBalancer(key=key):
                gone = self.load_balancers.pop(key, None)
                if gone is not None:
                    self.released_ports |= {gone.interface}
            case SetVips(vips=vips):
                self.vips = vips
                self.vips_known = True
            case ConnectionsKnown():
                self.connections_known = True
            case LinkChanged(link=link, deleted=True):
                self.released_ports -= {link.name}  # gone: nothing left to release
            case LinkChanged() | Resynced():
                pass  # only a reason to look again


def desired_state(intent: Intent, observed: Observed, mac: str) -> Desired:
    """What the kernel should hold now. LBs count only while their interface exists; what a
    source has not reported yet is kept as the kernel has it (adopted, not flushed)."""
    present = [lb for lb in intent.load_balancers.values() if lb.interface in observed.links]
    nexthops = {address for lb in present for address in lb.addresses}
    if not intent.connections_known:
        nexthops |= adopted_gateways(observed)
    return Desired(
        mac=mac,
        addresses=intent.bridge_addresses if intent.addresses_known else observed.bridge_addresses,
        ports=intent.target_ports | {lb.interface for lb in intent.load_balancers.values()},
        nexthops=frozenset(nexthops),
        vips=intent.vips if intent.vips_known else frozenset(r.source for r in observed.rules),
        release_ports=intent.released_ports,
    )


def adopted_gateways(observed: Observed) -> set[IPAddress]:
    """The load-balancer addresses the kernel already routes through (a previous instance's)."""
    members = {nh.gateway for nh in observed.nexthops.values() if not nh.is_group and nh.gateway}
    return members | {gateway for route in observed.routes for gateway in route.gateways}


def kinds_for(events: list[RouterEvent], bridge: str) -> Kinds:
    """What a batch of events may have changed, so the reconcile dumps only that."""
    kinds = Kinds(0)
    for event in events:
        match event:
            case SetBridgeAddresses():
                kinds |= Kinds.LINKS | Kinds.ADDRESSES
            case SetTargetPort():
                kinds |= Kinds.LINKS
            case ConnectionsKnown():
                kinds |= Kinds.LINKS | Kinds.NEXTHOPS | Kinds.ROUTES
            case SetLoadBalancer() | RemoveLoadBalancer():
                kinds |= Kinds.LINKS | Kinds.NEXTHOPS | Kinds.ROUTES
            case SetVips():
                kinds |= Kinds.RULES
            case LinkChanged(link=link):
                kinds |= (
                    Kinds.ALL
                    if link.name == bridge
                    else Kinds.LINKS | Kinds.NEXTHOPS | Kinds.ROUTES
                )
            case Resynced():
                kinds |= Kinds.ALL
    return kinds


def kinds_touched(ops: list[Op]) -> Kinds:
    """What carrying out `ops` changed (deleting a nexthop can take routes with it)."""
    kinds = Kinds(0)
    for op in ops:
        match op:
            case CreateBridge():
                kinds |= Kinds.ALL  # a new bridge: new index for ports, addresses, nexthops
            case SetLink():
                kinds |= Kinds.LINKS
            case AddAddress() | DelAddress():
                kinds |= Kinds.ADDRESSES
            case PutNexthop() | DelNexthop():
                kinds |= Kinds.NEXTHOPS | Kinds.ROUTES
            case PutRoute() | DelRoute():
                kinds |= Kinds.ROUTES
            case AddRule() | DelRule():
                kinds |= Kinds.RULES
    return kinds


def summary(ops: list[Op]) -> str:
    """`AddRule=1000 PutNexthop=128 ...` (one log line, whatever the batch size)."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[type(op).__name__] = counts.get(type(op).__name__, 0) + 1
    return " ".join(f"{name}={count}" for name, count in counts.items())


def egress_installed(observed: Observed) -> bool:
    """At least one load-balancer nexthop is in the kernel (not merely wanted)."""
    return any(route != guard_route(route.family) for route in observed.routes)


@attrs.frozen
class ReconcileResult:
    observed: Observed  # after the operations
    ops: list[Op]
    applied: Applied
    conflict: str | None = None


@attrs.frozen
class ReconcileJob:
    """One reconcile, run on the netlink worker thread from a snapshot of the intent."""

    scope: Scope
    mac: str
    intent: Intent
    kinds: Kinds

    def run(self, ipr: IPRoute, *, previous: Observed | None) -> ReconcileResult:
        observed = observe(self.scope, self.kinds, previous)
        desired = desired_state(self.intent, observed, self.mac)
        nothing = Applied(0, ())
        try:
            ops = plan(desired, observed, self.scope)
        except Conflict as exc:
            return ReconcileResult(observed, [], nothing, conflict=str(exc))
        if not ops:
            return ReconcileResult(observed, ops, nothing)
        applied = apply_all(ipr, ops, self.scope)
        # Look again at what the operations changed: "installed" means seen in the kernel.
        return ReconcileResult(observe(self.scope, kinds_touched(ops), observed), ops, applied)


class Router:
    def __init__(
        self,
        worker: NetlinkWorker,
        scope: Scope,
        mac: str,
        *,
        interval: float = 30.0,
    ) -> None:
        self._worker = worker
        self.scope = scope
        self.mac = mac
        self.interval = interval
        self.intent = Intent()
        self.egress: Watched[bool] = Watched(False)
        # The kernel as of the last reconcile (None before the first): for health and tests.
        self.observed: Watched[Observed | None] = Watched(None)
        self.reconciles = 0
        self.writes = 0  # kernel operations carried out, for tests and benchmarks
        self.last_failures: tuple[str, ...] = ()

    async def run(
        self,
        events: trio.MemoryReceiveChannel[RouterEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Reconcile now (adopting what a previous instance left), then after each batch of
        events and every `interval`."""
        await self.reconcile()
        task_status.started()
        while True:
            batch: list[RouterEvent] = []
            with trio.move_on_after(self.interval):
                batch.append(await events.receive())
                while True:
                    try:
                        batch.append(events.receive_nowait())
                    except trio.WouldBlock:
                        break
            for event in batch:
                self.intent.update(event)
            if batch:
                await self.reconcile(kinds_for(batch, self.scope.bridge))
            else:
                await self.reconcile(Kinds.ALL, periodic=True)

    async def reconcile(self, kinds: Kinds = Kinds.ALL, *, periodic: bool = False) -> list[Op]:
        """Dump `kinds` (the rest as last seen), plan, apply, look again at what changed.

        All of it runs as one job on the netlink worker (the planning too: with a thousand VIPs
        it is ~10 ms of Python the event loop need not carry). A periodic pass (everything
        dumped, no event behind it) that finds work is repairing drift."""
        if not kinds:
            return []
        snapshot = attrs.evolve(self.intent, load_balancers=dict(self.intent.load_balancers))
        job = ReconcileJob(self.scope, self.mac, snapshot, kinds)
        result = await self._worker.call(partial(job.run, previous=self.observed.value))
        if result.conflict is not None:
            logger.error("cannot manage the bridge", reason=result.conflict)
        ops = result.ops
        if ops:
            if periodic:
                shown = "; ".join(describe(op) for op in ops[:5])
                logger.warning("repaired drift", operations=summary(ops), first=shown)
            else:
                logger.info("reconciled", operations=summary(ops))
            for op in ops:
                logger.trace("kernel", op=describe(op))
            self.writes += result.applied.done
            self.last_failures = tuple(str(f.error) for f in result.applied.failures)
            for failure in result.applied.failures:
                logger.warning(
                    "kernel operation failed", op=describe(failure.op), reason=str(failure.error)
                )
        self._settle(result.observed)
        return ops

    def _settle(self, observed: Observed) -> None:
        self.observed.set(observed)
        self.reconciles += 1
        self.egress.set(egress_installed(observed))
