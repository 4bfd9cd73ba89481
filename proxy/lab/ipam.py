"""The lab IPAM: `ipam.v1.Ipam` with Meridio's semantics, for running the proxy without Kubernetes.

* One trench per process (`trench`), one prefix per family, carved into conduit prefixes and
  those into node prefixes (`ipam_alloc`), each assigned on first use (the lowest free one) and
  kept.
* `Allocate(Child)` returns one address of the node prefix with the node prefix length,
  idempotently per (trench, conduit, node, family, child name): the same child gets the same
  address again and its record is refreshed. The lowest free address is handed out; never the
  first or last of the node prefix.
* `Release(Child)` deletes the record; releasing what is unknown (also another trench) is a
  success, as upstream.
* Garbage collection (`run_gc`): every `gc_interval`, records not refreshed for `gc_threshold`
  are deleted (upstream: every 2 h, 40 min).
* Allocations persist in SQLite (`ipam_store`): a restarted IPAM with the same database gives
  the same children the same addresses.

Errors are gRPC statuses with a message: INVALID_ARGUMENT for a malformed request, NOT_FOUND for
another trench, FAILED_PRECONDITION for a family without a prefix, RESOURCE_EXHAUSTED when no
address, node prefix or conduit prefix is left.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import NoReturn

import attrs
import trio
from google.protobuf.empty_pb2 import Empty
from loguru import logger
from purerpc.grpclib.exceptions import FailedPreconditionError, ResourceExhaustedError

from proxy.api.ipam.v1 import ipam_grpc
from proxy.api.ipam.v1.ipam_pb2 import IPV4, IPV6, Child, Prefix
from proxy.lab.ipam_alloc import (
    DEFAULT_CONDUIT_PREFIX_LENGTH,
    DEFAULT_NODE_PREFIX_LENGTH,
    Address,
    Family,
    FamilyLayout,
    LayoutError,
    Network,
    address_at,
    family_of,
    first_free_offset,
    first_free_subnet,
    make_layout,
)
from proxy.lab.ipam_store import ChildKey, IpamStore
from proxy.lab.listen import serve_with_tasks
from proxy.rpc import Address as ListenAddress
from proxy.rpc import CallContext, InvalidArgumentError, NotFoundError
from proxy.security.tls import SpiffeTls

DEFAULT_TRENCH = "default"
DEFAULT_PREFIXES: tuple[Network, ...] = (
    ipaddress.IPv4Network("198.18.0.0/16"),
    ipaddress.IPv6Network("2001:db8:100::/48"),
)
DEFAULT_GC_THRESHOLD = 40 * 60.0
DEFAULT_GC_INTERVAL = 2 * 3600.0

_FAMILIES: dict[int, Family] = {IPV4: 4, IPV6: 6}


# -- outcomes the servicer turns into statuses -----------------------------------------------------


class IpamError(Exception):
    """A request the IPAM cannot serve; the message says why."""


class UnknownTrench(IpamError):
    pass


class FamilyNotConfigured(IpamError):
    pass


class Exhausted(IpamError):
    pass


# -- settings --------------------------------------------------------------------------------------


@attrs.frozen
class IpamSettings:
    trench: str = DEFAULT_TRENCH
    prefixes: tuple[Network, ...] = DEFAULT_PREFIXES
    conduit_prefix_length: Mapping[Family, int] = attrs.field(
        factory=lambda: dict(DEFAULT_CONDUIT_PREFIX_LENGTH)
    )
    node_prefix_length: Mapping[Family, int] = attrs.field(
        factory=lambda: dict(DEFAULT_NODE_PREFIX_LENGTH)
    )
    db: str = ":memory:"
    gc_threshold: float = DEFAULT_GC_THRESHOLD
    gc_interval: float = DEFAULT_GC_INTERVAL

    def layouts(self) -> dict[Family, FamilyLayout]:
        """The checked layout of each configured family; LayoutError says what is wrong."""
        layouts: dict[Family, FamilyLayout] = {}
        for prefix in self.prefixes:
            family = family_of(prefix)
            if family in layouts:
                raise LayoutError(
                    f"more than one IPv{family} prefix ({layouts[family].prefix}, {prefix})"
                )
            layouts[family] = make_layout(
                prefix, self.conduit_prefix_length[family], self.node_prefix_length[family]
            )
        if not layouts:
            raise LayoutError("no prefix configured")
        return layouts


# -- the allocator ---------------------------------------------------------------------------------


@attrs.frozen
class Allocation:
    address: Address
    node_prefix: Network
    created: bool  # False: an existing record, refreshed

    @property
    def prefix_length(self) -> int:
        return self.node_prefix.prefixlen


class Ipam:
    """The allocation service of one trench over a store; synchronous, one transaction per
    call (so calls from concurrent handlers never interleave)."""

    def __init__(
        self,
        store: IpamStore,
        trench: str,
        layouts: Mapping[Family, FamilyLayout],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.trench = trench
        self.layouts = dict(layouts)
        self._now = now
        with store.transaction():
            for layout in self.layouts.values():
                store.check_layout(trench, layout)

    def allocate(self, key: ChildKey) -> Allocation:
        self._check_trench(key.trench)
        layout = self.layouts.get(key.family)
        if layout is None:
            raise FamilyNotConfigured(
                f"no IPv{key.family} prefix is configured for trench {key.trench}"
            )
        with self.store.transaction():
            node_prefix = self._node_prefix(key, layout)
            existing = self.store.child_address(key)
            if existing is not None:
                self.store.touch_child(key, self._now())
                return Allocation(existing, node_prefix, created=False)
            taken = self.store.node_offsets(key.trench, key.family, key.conduit, key.node)
            offset = first_free_offset(node_prefix, taken)
            if offset is None:
                raise Exhausted(
                    f"node prefix {node_prefix} of node {key.node} (conduit {key.conduit}) is"
                    f" full: {len(taken)} addresses in use"
                )
            address = address_at(node_prefix, offset)
            self.store.add_child(key, address, offset, self._now())
        return Allocation(address, node_prefix, created=True)

    def release(self, key: ChildKey) -> Address | None:
        """Delete the child's record; the address it held, or None if it had none."""
        if key.trench != self.trench:
            return None
        with self.store.transaction():
            return self.store.delete_child(key)

    def collect(self, threshold: float) -> int:
        """Delete the records not refreshed within `threshold` seconds; how many."""
        with self.store.transaction():
            stale = self.store.delete_stale(self._now() - threshold)
        for record in stale:
            logger.debug(
                "collected",
                trench=record.key.trench,
                conduit=record.key.conduit,
                node=record.key.node,
                child=record.key.name,
                address=str(record.address),
            )
        return len(stale)

    def _check_trench(self, trench: str) -> None:
        if trench != self.trench:
            raise UnknownTrench(f"trench {trench} not found: this IPAM serves trench {self.trench}")

    def _node_prefix(self, key: ChildKey, layout: FamilyLayout) -> Network:
        """The node's prefix, assigned now (with the conduit's) if this is its first request."""
        store = self.store
        node_prefix = store.node_prefix(key.trench, key.family, key.conduit, key.node)
        if node_prefix is not None:
            return node_prefix
        conduit_prefix = self._conduit_prefix(key, layout)
        node_prefix = first_free_subnet(
            conduit_prefix,
            layout.node_length,
            store.node_prefixes(key.trench, key.family, key.conduit),
        )
        if node_prefix is None:
            raise Exhausted(
                f"no free /{layout.node_length} node prefix left in conduit {key.conduit}'s"
                f" {conduit_prefix}"
            )
        store.add_node(key.trench, key.family, key.conduit, key.node, node_prefix)
        logger.info(
            "node prefix assigned", conduit=key.conduit, node=key.node, prefix=str(node_prefix)
        )
        return node_prefix

    def _conduit_prefix(self, key: ChildKey, layout: FamilyLayout) -> Network:
        store = self.store
        conduit_prefix = store.conduit_prefix(key.trench, key.family, key.conduit)
        if conduit_prefix is not None:
            return conduit_prefix
        conduit_prefix = first_free_subnet(
            layout.prefix, layout.conduit_length, store.conduit_prefixes(key.trench, key.family)
        )
        if conduit_prefix is None:
            raise Exhausted(
                f"no free /{layout.conduit_length} conduit prefix left in trench"
                f" {key.trench}'s {layout.prefix}"
            )
        store.add_conduit(key.trench, key.family, key.conduit, conduit_prefix)
        logger.info("conduit prefix assigned", conduit=key.conduit, prefix=str(conduit_prefix))
        return conduit_prefix


@contextmanager
def open_ipam(settings: IpamSettings, now: Callable[[], float] = time.time) -> Iterator[Ipam]:
    """An Ipam over the settings' database, closed on exit. Raises LayoutError or StoreError."""
    layouts = settings.layouts()
    store = IpamStore.open(settings.db)
    try:
        yield Ipam(store, settings.trench, layouts, now)
    finally:
        store.close()


async def run_gc(ipam: Ipam, interval: float, threshold: float) -> NoReturn:
    """Collect stale records every `interval` seconds, forever (the first run after one
    interval, as upstream's ticker)."""
    while True:
        await trio.sleep(interval)
        collected = ipam.collect(threshold)
        if collected:
            logger.info("garbage collected", records=collected)


# -- the gRPC face ---------------------------------------------------------------------------------


def child_key(child: Child) -> ChildKey:
    """The key of a request's child; InvalidArgumentError says what is missing."""
    if not child.name:
        raise InvalidArgumentError("child name is empty")
    if not child.HasField("subnet"):
        raise InvalidArgumentError("child has no subnet")
    subnet = child.subnet
    family = _FAMILIES.get(subnet.ipFamily)
    if family is None:
        raise InvalidArgumentError(f"unknown ipFamily {subnet.ipFamily} (IPV4 = 0, IPV6 = 1)")
    if not subnet.node:
        raise InvalidArgumentError("subnet node is empty")
    if not subnet.conduit.name:
        raise InvalidArgumentError("subnet conduit name is empty")
    if not subnet.conduit.trench.name:
        raise InvalidArgumentError("subnet conduit trench name is empty")
    return ChildKey(
        subnet.conduit.trench.name, subnet.conduit.name, subnet.node, family, child.name
    )


class IpamServicer(ipam_grpc.IpamServicer):  # type: ignore[misc]  # untyped generated base
    def __init__(self, ipam: Ipam) -> None:
        self._ipam = ipam

    async def Allocate(self, message: Child, request: CallContext) -> Prefix:
        key = child_key(message)
        try:
            allocation = self._ipam.allocate(key)
        except UnknownTrench as exc:
            raise NotFoundError(str(exc)) from None
        except FamilyNotConfigured as exc:
            raise FailedPreconditionError(str(exc)) from None
        except Exhausted as exc:
            logger.warning("allocation failed", child=key.name, node=key.node, reason=str(exc))
            raise ResourceExhaustedError(str(exc)) from None
        logger.debug(
            "allocated" if allocation.created else "refreshed",
            conduit=key.conduit,
            node=key.node,
            child=key.name,
            address=f"{allocation.address}/{allocation.prefix_length}",
            peer=request.peer.address,
        )
        return Prefix(address=str(allocation.address), prefixLength=allocation.prefix_length)

    async def Release(self, message: Child, request: CallContext) -> Empty:
        key = child_key(message)
        address = self._ipam.release(key)
        logger.debug(
            "released" if address is not None else "released unknown child",
            trench=key.trench,
            conduit=key.conduit,
            node=key.node,
            child=key.name,
            address=str(address or ""),
            peer=request.peer.address,
        )
        return Empty()


async def serve_ipam(
    address: ListenAddress,
    settings: IpamSettings,
    *,
    now: Callable[[], float] = time.time,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[ListenAddress] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the IPAM and run its garbage collector (unless `gc_interval` is 0) until
    cancelled; `nursery.start` returns the address bound. LayoutError, StoreError (settings or
    database that cannot work) and OSError (cannot listen) are raised from `nursery.start`."""
    with open_ipam(settings, now) as ipam:
        tasks = []
        if math.isfinite(settings.gc_interval) and settings.gc_interval > 0:
            tasks.append(partial(run_gc, ipam, settings.gc_interval, settings.gc_threshold))
        context = {
            "trench": ipam.trench,
            "prefixes": ", ".join(layout.describe() for layout in ipam.layouts.values()),
            "db": settings.db,
        }
        await serve_with_tasks(
            "ipam",
            [IpamServicer(ipam)],
            address,
            tasks,
            context=context,
            tls=tls,
            task_status=task_status,
        )
