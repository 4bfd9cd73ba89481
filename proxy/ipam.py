"""The IPAM client: connection address pairs with delayed release, and the bridge addresses.

Behaviour reference §3, wire-api §3.7/§4.4; the decisions (names, subnets, answers) are in
`ipam_model`. Every RPC runs under its own deadline (`call_timeout`, 10 s as upstream's release
tries) inside whatever deadline the caller has.

`IpamClient` (the endpoint and the LB mesh use it):

* `allocate_pair(key)` allocates `<key>-src` then `<key>-dst` in each family (IPv4 first), one
  attempt. It first stops any release of `key`: a pending one is dropped; one whose RPC is in
  flight is waited for, so a late release never undoes this allocation (upstream's race, §3.5,
  §11.20). A key that had no addresses in use and fails part-way gets what this call took
  released again (upstream leaked them, §11.10); a live key whose refresh fails keeps its
  addresses. The failure is an `IpamError` naming the child and the reason.
* `release_later(key)` releases the pair after `release_delay` (0: at once) in a background
  task, retrying a failed RPC with backoff until it succeeds or the key is wanted again. An
  unknown record (or NOT_FOUND) is success. Calls for one key never overlap: a release waits
  while an allocation of its key is in progress.
* `flush()` (shutdown) does every pending release now, in parallel, within the caller's
  deadline, and logs what it could not release. A `release_later` after it releases at once.
  Release registration is synchronous, so a shutdown can never miss a release that was asked
  for just before it (upstream's Proxy.Close race, §3.5).
* With a `ReleaseJournal`, every release owed is written down until it is done (or its key is
  wanted again), and `run` starts with what a previous instance left owed, at its due time: a
  proxy killed within the release delay no longer leaks the addresses until IPAM's GC.

`BridgeAddresses` allocates the `bridge` child of every family, retrying with backoff until
all families have an address, publishes them (`addresses`, and `SetBridgeAddresses` to the
router), then renews them every `renew_interval` so that IPAM's GC keeps them. A renewal that
returns another address updates both (upstream ignored it, §3.6/§11.15); a failed renewal is
logged and retried with backoff, for the families that failed, rather than waiting for the
next interval: the record must be refreshed before IPAM's GC threshold. One address per family
by construction: a failed start-up retry cannot duplicate one (upstream's start-up bug).

IPAMCli health follows the channel: `proxy.health.follow_channel(channel, health, IPAM_CLIENT)`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, KeysView
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import attrs
import trio
from loguru import logger
from purerpc.grpclib.exceptions import GRPCError, RpcFailedError
from purerpc.grpclib.status import StatusCode

from proxy.api.ipam.v1.ipam_grpc import IpamStub
from proxy.api.ipam.v1.ipam_pb2 import Prefix
from proxy.config import Config
from proxy.ipam_model import (
    BRIDGE_CHILD,
    AddressPair,
    MalformedAnswer,
    Owner,
    address_pair,
    child,
    describe,
    families_of,
    pair_children,
    parse_prefix,
)
from proxy.kernel.model import Family, IPInterface
from proxy.kernel.router import RouterEvent, SetBridgeAddresses
from proxy.release_journal import ReleaseJournal
from proxy.rpc import Backoff, ChannelState, ReconnectingChannel, Tls
from proxy.watched import Watched

__all__ = [
    "CALL_TIMEOUT",
    "AddressPair",
    "BridgeAddresses",
    "IpamClient",
    "IpamError",
    "Owner",
    "ipam_channel",
    "owner_of",
]

CALL_TIMEOUT = 10.0  # one Allocate or Release (upstream: 10 s per release try)
KEEPALIVE_TIMEOUT = 20.0  # gRPC-Go's default keepalive timeout, what upstream runs with
ChildId = tuple[Family, str]

# Outcomes after which the server may have done what was asked although we got no answer.
_UNCERTAIN = (StatusCode.UNAVAILABLE, StatusCode.DEADLINE_EXCEEDED, StatusCode.CANCELLED)


class IpamError(Exception):
    """An allocation failed; the message names the key, the child and the reason."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class _CallFailed(Exception):
    """One RPC failed. `uncertain`: IPAM may have done it anyway (no answer, bad answer)."""

    def __init__(self, reason: str, *, uncertain: bool, code: StatusCode | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.uncertain = uncertain
        self.code = code  # the gRPC status, when IPAM answered with one


def _family_name(family: Family) -> str:
    return "IPv4" if family is Family.V4 else "IPv6"


def _backoff(maximum: float) -> Backoff:
    return Backoff(maximum=maximum, initial=min(0.2, maximum))


def owner_of(config: Config) -> Owner:
    return Owner(config.trench, config.conduit, config.host, families_of(config.ip_family))


def journal_path(config: Config) -> Path:
    """Where the releases owed are kept across restarts (one file per proxy)."""
    return Path(config.state_dir) / f"{config.name}.ipam-releases.json"


def ipam_channel(config: Config, tls: Tls | None = None) -> ReconnectingChannel:
    """The channel to NSM_IPAM_SERVICE, over mutual TLS with `tls` (run it with
    `nursery.start(channel.run)`)."""
    return ReconnectingChannel(
        config.ipam_service,
        name="ipam",
        backoff=_backoff(config.grpc_max_backoff),
        keepalive=(config.grpc_keepalive_time, KEEPALIVE_TIMEOUT),
        ssl_context=tls,
    )


# -- one RPC ------------------------------------------------------------------------------------


async def _call(
    channel: ReconnectingChannel,
    method: str,
    owner: Owner,
    family: Family,
    name: str,
    seconds: float,
) -> object:
    request = child(owner, family, name)
    try:
        with trio.fail_after(seconds):
            stub = IpamStub(await channel.get())
            reply: object = await getattr(stub, method)(request)
            return reply
    except trio.TooSlowError:
        # Only our own scope raises TooSlowError here; the caller's deadline raises outside.
        state = channel.state.value
        detail = "" if state is ChannelState.READY else f", IPAM connection {state.value}"
        raise _CallFailed(f"no answer within {seconds:g}s{detail}", uncertain=True) from None
    except RpcFailedError as exc:
        status = exc.status
        reason = f"{status.status_code.name}: {status.status_message}".rstrip(": ")
        code = status.status_code
        raise _CallFailed(reason, uncertain=code in _UNCERTAIN, code=code) from None
    except GRPCError as exc:  # a protocol error: no usable answer
        raise _CallFailed(f"protocol error: {exc}", uncertain=True) from None


async def allocate_child(
    channel: ReconnectingChannel, owner: Owner, family: Family, name: str, seconds: float
) -> IPInterface:
    """One Allocate; `_CallFailed` says why it failed."""
    prefix = await _call(channel, "Allocate", owner, family, name, seconds)
    assert isinstance(prefix, Prefix)
    try:
        return parse_prefix(prefix, family)
    except MalformedAnswer as exc:
        raise _CallFailed(f"malformed answer: {exc}", uncertain=True) from None


async def release_child(
    channel: ReconnectingChannel, owner: Owner, family: Family, name: str, seconds: float
) -> None:
    """One Release; an unknown record, or NOT_FOUND (another IPAM's wording of it), is done."""
    try:
        await _call(channel, "Release", owner, family, name, seconds)
    except _CallFailed as exc:
        if exc.code != StatusCode.NOT_FOUND:
            raise


# -- connection address pairs -------------------------------------------------------------------


@attrs.define(eq=False)
class _Release:
    """One key's release in progress; owned by its task, steered by the client."""

    key: str
    children: list[ChildId]  # still to release, in order
    due: float  # trio time of the next attempt (the delay, then the backoff)
    backoff: Backoff
    stopped: bool = False  # the key is wanted again: stop after the RPC in flight, if any
    failures: int = 0
    reason: str = ""  # of the last failure
    scope: trio.CancelScope | None = None  # the wait in progress, which `wake` ends
    finished: trio.Event = attrs.field(factory=trio.Event)

    def wake(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


class IpamClient:
    """Address pairs per connection key, with delayed release. Start `run` before use."""

    def __init__(
        self,
        channel: ReconnectingChannel,
        owner: Owner,
        *,
        release_delay: float,
        max_backoff: float,
        call_timeout: float = CALL_TIMEOUT,
        journal: ReleaseJournal | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if release_delay < 0:
            raise ValueError(f"release_delay must not be negative: {release_delay}")
        self._channel = channel
        self._owner = owner
        self._release_delay = release_delay
        self._max_backoff = max_backoff
        self._call_timeout = call_timeout
        self._live: dict[str, AddressPair] = {}  # keys whose addresses are in use
        self._pending: dict[str, _Release] = {}
        self._busy: dict[str, trio.Event] = {}  # keys with an allocation in progress
        self._nursery: trio.Nursery | None = None
        self._draining = False
        self._journal = journal
        self._wall = wall_clock
        self._owed: dict[str, float] = {}  # key -> when its release is due (wall clock)

    @classmethod
    def from_config(cls, config: Config, channel: ReconnectingChannel) -> IpamClient:
        return cls(
            channel,
            owner_of(config),
            release_delay=config.ip_release_delay,
            max_backoff=config.grpc_max_backoff,
            journal=ReleaseJournal(journal_path(config)),
        )

    @property
    def live_keys(self) -> KeysView[str]:
        """Keys with addresses in use (allocated, no release begun)."""
        return self._live.keys()

    @property
    def pending_releases(self) -> KeysView[str]:
        """Keys whose release is waiting for its delay or retrying."""
        return self._pending.keys()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the releases until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._carry_over()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def _carry_over(self) -> None:
        """The releases a previous instance owed, each at its due time (now, if past)."""
        if self._journal is None:
            return
        owed = self._journal.load()
        now = self._wall()
        for key, due in owed.items():
            self._schedule(key, list(pair_children(key, self._owner.families)), max(0.0, due - now))
        if owed:
            logger.info("releases carried over from the previous instance", keys=len(owed))

    # -- allocation ------------------------------------------------------------------------------

    async def allocate_pair(self, key: str) -> AddressPair:
        """The key's addresses (refreshed when it has some); IpamError when IPAM fails."""
        children = pair_children(key, self._owner.families)
        async with self._turn(key):
            interrupted = self._pending.pop(key, None)
            was_live = key in self._live
            taken: list[ChildId] = []
            try:
                if interrupted is not None:
                    interrupted.stopped = True
                    interrupted.wake()
                    await interrupted.finished.wait()  # the RPC in flight, if any, ends first
                allocated = await self._allocate(key, children, taken)
            except BaseException:
                if not was_live:
                    # Nobody uses these: what this call took, and what a release it
                    # interrupted did not get to (the interrupted release still runs its RPC
                    # in flight if this call was cancelled while waiting for it).
                    left = interrupted.children if interrupted is not None else []
                    self._schedule(key, [*taken, *(c for c in left if c not in taken)], 0.0)
                raise
            pair = address_pair(key, allocated)
            previous = self._live.get(key)
            self._live[key] = pair
            if previous is None:
                logger.info("allocated", key=key, src=describe(pair.src), dst=describe(pair.dst))
            elif previous != pair:
                logger.warning(
                    "addresses changed on refresh",
                    key=key,
                    src=describe(pair.src),
                    dst=describe(pair.dst),
                    old_src=describe(previous.src),
                    old_dst=describe(previous.dst),
                )
            else:
                logger.debug("refreshed", key=key)
            return pair

    async def _allocate(
        self, key: str, children: Iterable[ChildId], taken: list[ChildId]
    ) -> dict[ChildId, IPInterface]:
        """Allocate each child in order; `taken` grows with what IPAM may now hold for us."""
        allocated: dict[ChildId, IPInterface] = {}
        for family, name in children:
            try:
                address = await allocate_child(
                    self._channel, self._owner, family, name, self._call_timeout
                )
            except _CallFailed as exc:
                if exc.uncertain:
                    taken.append((family, name))
                logger.warning(
                    "allocation failed",
                    key=key,
                    child=name,
                    family=_family_name(family),
                    reason=exc.reason,
                )
                raise IpamError(
                    f"cannot allocate {name} ({_family_name(family)}): {exc.reason}",
                    reason=exc.reason,
                ) from None
            except BaseException:
                taken.append((family, name))  # cancelled with the request sent: maybe taken
                raise
            taken.append((family, name))
            allocated[(family, name)] = address
            logger.debug("allocated child", key=key, child=name, address=str(address))
        return allocated

    @asynccontextmanager
    async def _turn(self, key: str) -> AsyncIterator[None]:
        """One allocation of a key at a time (a refresh and a heal may overlap)."""
        while (busy := self._busy.get(key)) is not None:
            await busy.wait()
        done = self._busy[key] = trio.Event()
        try:
            yield
        finally:
            del self._busy[key]
            done.set()

    # -- release ---------------------------------------------------------------------------------

    def release_later(self, key: str) -> None:
        """Release the key's pair after the release delay; never blocks."""
        delay = 0.0 if self._draining else self._release_delay
        self._schedule(key, list(pair_children(key, self._owner.families)), delay)

    def _schedule(self, key: str, children: list[ChildId], delay: float) -> None:
        if not children:
            return
        pending = self._pending.get(key)
        if pending is not None:
            # Keeps its time; a release_later after a rollback widens it to the whole pair.
            pending.children.extend(c for c in children if c not in pending.children)
            return
        if self._nursery is None:
            logger.warning("release not scheduled: the IPAM client is not running", key=key)
            return
        record = _Release(key, children, trio.current_time() + delay, _backoff(self._max_backoff))
        self._pending[key] = record
        self._owe(key, self._wall() + delay)
        self._nursery.start_soon(self._release, record)
        logger.debug("release scheduled", key=key, delay=delay)

    def _owe(self, key: str, due: float | None) -> None:
        """Note (or, with None, forget) a release owed, in the journal too."""
        if due is None:
            if self._owed.pop(key, None) is None:
                return
        else:
            self._owed[key] = due
        if self._journal is not None:
            self._journal.save(self._owed)

    async def _release(self, record: _Release) -> None:
        key = record.key
        try:
            while record.children and not record.stopped:
                if trio.current_time() < record.due:
                    await self._pause(record, partial(trio.sleep_until, record.due))
                    continue
                busy = self._busy.get(key)
                if busy is not None:  # asked again for release while being allocated
                    await self._pause(record, busy.wait)
                    continue
                family, name = record.children[0]
                self._live.pop(key, None)  # from the first RPC on, the addresses are going
                try:
                    await release_child(
                        self._channel, self._owner, family, name, self._call_timeout
                    )
                except _CallFailed as exc:
                    record.failures += 1
                    record.reason = exc.reason
                    delay = record.backoff.next_delay()
                    record.due = trio.current_time() + delay
                    (logger.warning if record.failures == 1 else logger.debug)(
                        "release failed, retrying",
                        key=key,
                        child=name,
                        family=_family_name(family),
                        reason=exc.reason,
                        retry_in=round(delay, 3),
                    )
                    continue
                record.children.pop(0)
                logger.debug("released child", key=key, child=name, family=_family_name(family))
        except trio.Cancelled:
            if record.children and not record.stopped:
                logger.debug("release abandoned", key=key, reason=record.reason or "stopping")
            raise
        finally:
            record.finished.set()
            if self._pending.get(key) is record:
                del self._pending[key]
            if (record.stopped or not record.children) and key not in self._pending:
                self._owe(key, None)  # done, or wanted again; abandoned ones stay owed
        if record.stopped:
            logger.info("release stopped: the key is wanted again", key=key)
        else:
            logger.info("released", key=key, failures=record.failures)

    @staticmethod
    async def _pause(record: _Release, wait: Callable[[], Awaitable[object]]) -> None:
        """Wait, unless `record.wake()` ends it (the key is wanted again, or a flush)."""
        with trio.CancelScope() as scope:
            record.scope = scope
            try:
                await wait()
            finally:
                record.scope = None

    async def flush(self) -> None:
        """Do every pending release now, in parallel, within the caller's deadline; log each
        key that could not be released. Later `release_later` calls release at once."""
        self._draining = True
        records = list(self._pending.values())
        now = trio.current_time()
        for record in records:
            record.due = min(record.due, now)
            record.wake()
        logger.info("flushing releases", keys=len(records))
        try:
            for record in records:
                await record.finished.wait()
        finally:
            for record in records:
                if record.children and not record.stopped:
                    logger.warning(
                        "release not done",
                        key=record.key,
                        children=",".join(name for _, name in record.children),
                        reason=record.reason or "no time left",
                    )


# -- bridge addresses ---------------------------------------------------------------------------


class BridgeAddresses:
    """The gateway address of each family: allocated, published, kept alive, followed."""

    def __init__(
        self,
        channel: ReconnectingChannel,
        owner: Owner,
        *,
        renew_interval: float,
        max_backoff: float,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        if renew_interval <= 0:
            raise ValueError(f"renew_interval must be greater than 0: {renew_interval}")
        self._channel = channel
        self._owner = owner
        self._renew_interval = renew_interval
        self._max_backoff = max_backoff
        self._call_timeout = call_timeout
        self._current: dict[Family, IPInterface] = {}
        self._failing = False
        self.addresses: Watched[frozenset[IPInterface]] = Watched(frozenset())

    @classmethod
    def from_config(cls, config: Config, channel: ReconnectingChannel) -> BridgeAddresses:
        return cls(
            channel,
            owner_of(config),
            renew_interval=config.bridge_ip_renew_interval,
            max_backoff=config.grpc_max_backoff,
        )

    async def run(
        self,
        router_events: trio.MemorySendChannel[RouterEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Allocate (started once every family has an address), then renew until cancelled."""
        backoff = _backoff(self._max_backoff)
        missing = list(self._owner.families)
        while True:
            missing = await self._allocate(missing)
            if not missing:
                break
            await trio.sleep(backoff.next_delay())
        backoff.reset()
        self.addresses.set(frozenset(self._current.values()))
        task_status.started()
        logger.info("bridge addresses", addresses=describe(self._current.values()))
        await router_events.send(SetBridgeAddresses(self.addresses.value))
        while True:
            await trio.sleep(self._renew_interval)
            missing = list(self._owner.families)
            while True:
                missing = await self._allocate(missing)
                if not missing:
                    break
                await self._publish(router_events)  # what did succeed may have changed
                await trio.sleep(backoff.next_delay())
            backoff.reset()
            await self._publish(router_events)

    async def _allocate(self, families: Iterable[Family]) -> list[Family]:
        """Allocate `bridge` in each family; the families that failed."""
        answers: dict[Family, IPInterface] = {}
        failed: list[Family] = []
        for family in families:
            try:
                answers[family] = await allocate_child(
                    self._channel, self._owner, family, BRIDGE_CHILD, self._call_timeout
                )
            except _CallFailed as exc:
                failed.append(family)
                # Once per outage at WARNING, then at DEBUG: IPAM may be down for long.
                (logger.warning if not self._failing else logger.debug)(
                    "bridge allocation failed, retrying",
                    family=_family_name(family),
                    reason=exc.reason,
                )
        if failed:
            self._failing = True
        elif self._failing:
            self._failing = False
            logger.info("bridge allocation works again")
        for family, address in answers.items():
            old = self._current.get(family)
            if old is not None and old != address:
                logger.warning(
                    "bridge address changed",
                    family=_family_name(family),
                    old=str(old),
                    address=str(address),
                )
            elif old is None:
                logger.debug("bridge address allocated", address=str(address))
        self._current.update(answers)  # one address per family: a retry never duplicates
        return failed

    async def _publish(self, router_events: trio.MemorySendChannel[RouterEvent]) -> None:
        addresses = frozenset(self._current.values())
        if addresses == self.addresses.value:
            return
        self.addresses.set(addresses)
        logger.info("bridge addresses", addresses=describe(addresses))
        await router_events.send(SetBridgeAddresses(addresses))
