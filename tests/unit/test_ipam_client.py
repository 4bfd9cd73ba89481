"""The IPAM client against a fake IPAM that speaks the real protocol, with a mock clock.

The fake is an `IpamServicer` served by `proxy.rpc.Server` on a UNIX socket; the test controls
its answers, failures and pace, and it records every call with the (virtual) time it came in.
"""

from __future__ import annotations

import ipaddress
import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from google.protobuf.empty_pb2 import Empty
from loguru import logger
from purerpc.grpclib.exceptions import ResourceExhaustedError

from proxy.api.ipam.v1 import ipam_grpc
from proxy.api.ipam.v1.ipam_pb2 import IPV4, IPV6, Child, Prefix
from proxy.config import IpFamily
from proxy.ipam import BridgeAddresses, IpamClient, IpamError
from proxy.ipam_model import (
    AddressPair,
    MalformedAnswer,
    Owner,
    child,
    families_of,
    pair_children,
    parse_prefix,
)
from proxy.kernel.model import Family
from proxy.kernel.router import RouterEvent, SetBridgeAddresses
from proxy.release_journal import ReleaseJournal
from proxy.rpc import (
    Backoff,
    InvalidArgumentError,
    NotFoundError,
    ReconnectingChannel,
    Server,
    UnavailableError,
)
from proxy.watched import Watched

pytestmark = pytest.mark.timeout(30)

OWNER = Owner("trench-a", "conduit-a", "node-1")
DELAY = 20.0
MAX_BACKOFF = 2.0
WALL_START = 1_800_000_000.0  # the wall clock, as trio's mock clock advances it
NETWORKS: dict[int, ipaddress.IPv4Network | ipaddress.IPv6Network] = {
    IPV4: ipaddress.ip_network("198.18.0.0/24"),
    IPV6: ipaddress.ip_network("2001:db8::/64"),
}
V4, V6 = Family.V4, Family.V6


def iface(text: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    return ipaddress.ip_interface(text)


# -- the fake IPAM ---------------------------------------------------------------------------------


@attrs.frozen
class Call:
    method: str
    family: int
    name: str
    time: float


class FakeIpam(ipam_grpc.IpamServicer):  # type: ignore[misc]
    """Meridio's semantics (idempotent per child, lowest free address, release of the unknown
    is a success), with knobs: failures, gates, answers and slow releases."""

    def __init__(self) -> None:
        self.records: dict[tuple[int, str], str] = {}
        self.calls: list[Call] = []
        self.events = Watched(0)  # bumped on each call's start and end
        # (family, name) -> exceptions to raise on the next calls (the last one sticks)
        self.allocate_errors: dict[tuple[int, str], list[Exception]] = {}
        self.release_errors: list[Exception] = []  # raised by the next Release calls
        self.answers: dict[tuple[int, str], Prefix] = {}  # instead of the record's address
        self.allocate_gates: dict[tuple[int, str], trio.Event] = {}
        self.release_gate: trio.Event | None = None
        self.release_time = 0.0  # how long a release takes
        self.refuse_release: Callable[[str], Exception | None] = lambda name: None

    def bump(self) -> None:
        self.events.set(self.events.value + 1)

    def _check(self, message: Child) -> tuple[int, str]:
        subnet = message.subnet
        if (subnet.conduit.trench.name, subnet.conduit.name, subnet.node) != (
            OWNER.trench,
            OWNER.conduit,
            OWNER.node,
        ) or subnet.ipFamily not in NETWORKS:
            raise InvalidArgumentError(f"unexpected subnet {subnet}")
        return subnet.ipFamily, message.name

    async def Allocate(self, message: Child) -> Prefix:
        family, name = self._check(message)
        self.calls.append(Call("Allocate", family, name, trio.current_time()))
        self.bump()
        try:
            gate = self.allocate_gates.get((family, name))
            if gate is not None:
                await gate.wait()
            errors = self.allocate_errors.get((family, name))
            if errors:
                raise errors.pop(0) if len(errors) > 1 else errors[0]
            network = NETWORKS[family]
            if (family, name) not in self.records:
                used = set(self.records.values())
                free = next(str(a) for a in network.hosts() if str(a) not in used)
                self.records[(family, name)] = free
            answer = self.answers.get((family, name))
            if answer is not None:
                return answer
            return Prefix(address=self.records[(family, name)], prefixLength=network.prefixlen)
        finally:
            self.bump()

    async def Release(self, message: Child) -> Empty:
        family, name = self._check(message)
        self.calls.append(Call("Release", family, name, trio.current_time()))
        self.bump()
        try:
            if self.release_gate is not None:
                await self.release_gate.wait()
            await trio.sleep(self.release_time)
            if self.release_errors:
                raise self.release_errors.pop(0)
            refusal = self.refuse_release(name)
            if refusal is not None:
                raise refusal
            self.records.pop((family, name), None)
            return Empty()
        finally:
            self.bump()

    def called(self, method: str) -> list[tuple[int, str]]:
        return [(c.family, c.name) for c in self.calls if c.method == method]

    def times(self, method: str) -> list[float]:
        return [c.time for c in self.calls if c.method == method]

    async def until(self, condition: Callable[[], bool], within: float = 60.0) -> None:
        with trio.fail_after(within):
            while not condition():
                # A call's end is seen here before its answer reaches the client: poll too.
                with trio.move_on_after(0.001):
                    await self.events.wait_change(self.events.value)


@attrs.define
class Env:
    fake: FakeIpam
    client: IpamClient
    channel: ReconnectingChannel
    nursery: trio.Nursery
    path: str


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="ipamc-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def running(
    sockdir: str,
    *,
    release_delay: float = DELAY,
    families: tuple[Family, ...] = (V4, V6),
    serve: bool = True,
    fake: FakeIpam | None = None,
    journal: ReleaseJournal | None = None,
) -> AsyncIterator[Env]:
    fake = fake or FakeIpam()
    path = f"{sockdir}/ipam.sock"
    async with trio.open_nursery() as nursery:
        if serve:
            await nursery.start(Server([fake]).serve_unix, path)
        channel = ReconnectingChannel(
            f"unix://{path}", name="ipam", backoff=Backoff(maximum=MAX_BACKOFF)
        )
        await nursery.start(channel.run)
        client = IpamClient(
            channel,
            attrs.evolve(OWNER, families=families),
            release_delay=release_delay,
            max_backoff=MAX_BACKOFF,
            journal=journal,
            wall_clock=lambda: WALL_START + trio.current_time(),
        )
        await nursery.start(client.run)
        yield Env(fake, client, channel, nursery, path)
        nursery.cancel_scope.cancel()


PAIR_CHILDREN = [(IPV4, "k-src"), (IPV4, "k-dst"), (IPV6, "k-src"), (IPV6, "k-dst")]


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    sink = logger.add(
        lambda message: records.append(dict(message.record)), level=0, format="{message}"
    )
    try:
        yield records
    finally:
        logger.remove(sink)


# -- pure decisions -------------------------------------------------------------------------------


def test_subnet_is_upstreams_shape() -> None:
    request = child(OWNER, V6, "bridge")
    assert request.name == "bridge"
    assert request.subnet.conduit.name == "conduit-a"
    assert request.subnet.conduit.trench.name == "trench-a"
    assert request.subnet.node == "node-1"
    assert request.subnet.ipFamily == IPV6
    assert child(OWNER, V4, "x").subnet.ipFamily == IPV4


def test_families_ipv4_first() -> None:
    assert families_of(IpFamily.DUALSTACK) == (V4, V6)
    assert families_of(IpFamily.IPV6) == (V6,)
    assert Owner("t", "c", "n", families=(V6, V4)).families == (V4, V6)
    with pytest.raises(ValueError):
        Owner("t", "c", "n", families=(V4, V4))


def test_children_in_allocation_order() -> None:
    assert pair_children("k", (V6, V4)) == (
        (V4, "k-src"),
        (V4, "k-dst"),
        (V6, "k-src"),
        (V6, "k-dst"),
    )
    with pytest.raises(ValueError):
        pair_children("", (V4,))


@pytest.mark.parametrize(
    ("address", "length", "family", "expected"),
    [
        ("198.18.0.7", 24, V4, "198.18.0.7/24"),
        ("2001:db8::7", 64, V6, "2001:db8::7/64"),
        ("198.18.0.7", 33, V4, None),
        ("198.18.0.7", -1, V4, None),
        ("", 24, V4, None),
        ("198.18.0.7/24", 24, V4, None),
        ("not an address", 24, V4, None),
        ("2001:db8::7", 64, V4, None),  # the wrong family
        ("198.18.0.7", 24, V6, None),
    ],
)
def test_parse_prefix(address: str, length: int, family: Family, expected: str | None) -> None:
    prefix = Prefix(address=address, prefixLength=length)
    if expected is None:
        with pytest.raises(MalformedAnswer):
            parse_prefix(prefix, family)
    else:
        assert parse_prefix(prefix, family) == iface(expected)


# -- allocation -----------------------------------------------------------------------------------


async def test_pair_is_allocated_in_order_and_stable(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir) as env:
        pair = await env.client.allocate_pair("k")
        assert pair == AddressPair(
            src=(iface("198.18.0.1/24"), iface("2001:db8::1/64")),
            dst=(iface("198.18.0.2/24"), iface("2001:db8::2/64")),
        )
        assert env.fake.called("Allocate") == PAIR_CHILDREN
        assert await env.client.allocate_pair("k") == pair
        assert await env.client.allocate_pair("other") != pair
        assert set(env.client.live_keys) == {"k", "other"}
        assert not env.client.pending_releases


async def test_single_family(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir, families=(V6,)) as env:
        pair = await env.client.allocate_pair("k")
        assert pair == AddressPair(src=(iface("2001:db8::1/64"),), dst=(iface("2001:db8::2/64"),))
        assert env.fake.called("Allocate") == [(IPV6, "k-src"), (IPV6, "k-dst")]


# -- delayed release ------------------------------------------------------------------------------


async def test_release_after_the_delay_and_only_once(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir) as env:
        await env.client.allocate_pair("k")
        start = trio.current_time()
        env.client.release_later("k")
        await trio.sleep(5)
        env.client.release_later("k")  # pending already: changes nothing
        assert set(env.client.pending_releases) == {"k"}
        await trio.sleep(DELAY - 5 - 0.01)
        assert env.fake.called("Release") == []
        assert env.fake.records  # still allocated just before the delay ends
        await env.fake.until(lambda: not env.client.pending_releases)
        assert not env.fake.records
        assert env.fake.called("Release") == PAIR_CHILDREN  # each once, in order
        assert min(env.fake.times("Release")) == pytest.approx(start + DELAY)
        assert not env.client.pending_releases and not env.client.live_keys


async def test_allocate_cancels_a_pending_release(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir) as env:
        pair = await env.client.allocate_pair("k")
        env.client.release_later("k")
        await trio.sleep(DELAY / 2)
        assert await env.client.allocate_pair("k") == pair  # a heal: Close, then Request
        assert not env.client.pending_releases
        await trio.sleep(10 * DELAY)
        assert env.fake.called("Release") == []
        assert len(env.fake.records) == 4
        assert set(env.client.live_keys) == {"k"}


async def test_zero_delay_releases_at_once(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir, release_delay=0) as env:
        await env.client.allocate_pair("k")
        start = trio.current_time()
        env.client.release_later("k")
        await env.fake.until(lambda: not env.fake.records and not env.client.pending_releases)
        assert env.fake.times("Release")[0] == pytest.approx(start, abs=1e-6)


async def test_in_flight_release_is_waited_for_and_never_undoes_the_allocation(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir, release_delay=0) as env:
        await env.client.allocate_pair("k")
        env.fake.release_gate = gate = trio.Event()  # a slow IPAM: the release hangs
        env.client.release_later("k")
        await env.fake.until(lambda: len(env.fake.called("Release")) == 1)
        allocations = len(env.fake.called("Allocate"))
        done: list[AddressPair] = []

        async def allocate() -> None:
            done.append(await env.client.allocate_pair("k"))

        env.nursery.start_soon(allocate)
        await trio.sleep(3)  # inside the per-call deadline (10 s) of the release in flight
        assert not done
        assert len(env.fake.called("Allocate")) == allocations  # waits for the release
        gate.set()
        await env.fake.until(lambda: bool(done))
        # The release stopped after its RPC in flight; the allocation came after it.
        assert env.fake.called("Release") == [(IPV4, "k-src")]
        assert env.fake.calls[-4].method == "Allocate"
        await trio.sleep(10 * DELAY)
        assert env.fake.called("Release") == [(IPV4, "k-src")]
        assert len(env.fake.records) == 4  # everything allocated stays allocated
        assert str(done[0].src[0].ip) == env.fake.records[(IPV4, "k-src")]
        assert set(env.client.live_keys) == {"k"} and not env.client.pending_releases


async def test_release_waits_for_an_allocation_in_progress(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir, release_delay=0) as env:
        env.fake.allocate_gates[(IPV6, "k-src")] = gate = trio.Event()
        env.nursery.start_soon(env.client.allocate_pair, "k")
        await env.fake.until(lambda: (IPV6, "k-src") in env.fake.called("Allocate"))
        env.client.release_later("k")  # a Close while the Request is being served
        await trio.sleep(1)
        assert env.fake.called("Release") == []
        gate.set()
        await env.fake.until(lambda: not env.fake.records and len(env.fake.calls) == 8)
        assert env.fake.called("Release") == PAIR_CHILDREN


async def test_failed_release_is_retried_with_backoff(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir, release_delay=0) as env:
        await env.client.allocate_pair("k")
        env.fake.release_errors = [UnavailableError("down")] * 6
        env.client.release_later("k")
        await env.fake.until(lambda: not env.fake.records and not env.client.pending_releases)
        times = env.fake.times("Release")
        assert env.fake.called("Release")[:7] == [(IPV4, "k-src")] * 7
        gaps = [b - a for a, b in itertools.pairwise(times[:7])]
        assert all(0.1 < gap <= MAX_BACKOFF + 1e-6 for gap in gaps), gaps
        assert gaps[-1] > gaps[0]  # growing, up to the cap
        assert not env.client.pending_releases


async def test_release_of_an_unknown_record_is_done(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir, release_delay=0) as env:
        env.client.release_later("never-allocated")  # the lab and Meridio answer Empty
        await env.fake.until(lambda: len(env.fake.called("Release")) == 4)
        env.fake.release_errors = [NotFoundError("no such node")] * 4  # another way to say it
        env.client.release_later("gone")
        await env.fake.until(lambda: len(env.fake.called("Release")) == 8)
        await trio.sleep(60)
        assert len(env.fake.called("Release")) == 8  # no retries
        assert not env.client.pending_releases


async def test_release_retries_stop_when_the_key_is_wanted_again(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir, release_delay=0) as env:
        await env.client.allocate_pair("k")
        env.fake.release_errors = [UnavailableError("down")] * 1000
        env.client.release_later("k")
        await env.fake.until(lambda: len(env.fake.called("Release")) >= 3)
        env.fake.release_errors = []
        await env.client.allocate_pair("k")
        attempts = len(env.fake.called("Release"))
        await trio.sleep(100)
        assert len(env.fake.called("Release")) == attempts
        assert len(env.fake.records) == 4 and set(env.client.live_keys) == {"k"}


# -- failures and rollback ------------------------------------------------------------------------


async def test_partial_allocation_of_a_new_key_is_rolled_back(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env:
        env.fake.allocate_errors[(IPV6, "k-src")] = [ResourceExhaustedError("node prefix full")]
        with pytest.raises(IpamError) as caught:
            await env.client.allocate_pair("k")
        assert "k-src (IPv6)" in str(caught.value)
        assert "RESOURCE_EXHAUSTED: node prefix full" in str(caught.value)
        # What it took is released at once (no delay), not what IPAM refused.
        await env.fake.until(lambda: not env.fake.records and not env.client.pending_releases)
        assert env.fake.called("Release") == [(IPV4, "k-src"), (IPV4, "k-dst")]
        assert not env.client.live_keys and not env.client.pending_releases


async def test_failed_refresh_of_a_live_key_keeps_its_addresses(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env:
        pair = await env.client.allocate_pair("k")
        env.fake.allocate_errors[(IPV6, "k-src")] = [UnavailableError("restarting")]
        with pytest.raises(IpamError, match="UNAVAILABLE: restarting"):
            await env.client.allocate_pair("k")
        await trio.sleep(10 * DELAY)
        assert env.fake.called("Release") == []
        assert len(env.fake.records) == 4
        assert set(env.client.live_keys) == {"k"}
        del env.fake.allocate_errors[(IPV6, "k-src")]
        assert await env.client.allocate_pair("k") == pair


async def test_malformed_answer_is_an_error_and_its_child_is_released(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env:
        env.fake.answers[(IPV4, "k-dst")] = Prefix(address="2001:db8::99", prefixLength=64)
        with pytest.raises(IpamError, match=r"k-dst \(IPv4\): malformed answer"):
            await env.client.allocate_pair("k")
        # IPAM did allocate the child it answered badly about: it goes back too.
        await env.fake.until(lambda: not env.fake.records and not env.client.pending_releases)
        assert env.fake.called("Release") == [(IPV4, "k-src"), (IPV4, "k-dst")]


async def test_a_cancelled_allocation_releases_what_it_may_have_taken(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env:
        env.fake.allocate_gates[(IPV6, "k-src")] = trio.Event()  # never answers
        with trio.move_on_after(3) as caller:  # the NSM request's own deadline
            await env.client.allocate_pair("k")
        assert caller.cancelled_caught
        await env.fake.until(lambda: len(env.fake.called("Release")) == 3)
        assert env.fake.called("Release") == [(IPV4, "k-src"), (IPV4, "k-dst"), (IPV6, "k-src")]
        assert not env.client.live_keys


async def test_unreachable_ipam_is_an_ipam_error(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir, serve=False) as env:
        start = trio.current_time()
        with pytest.raises(IpamError, match="no answer within 10s, IPAM connection") as caught:
            await env.client.allocate_pair("k")
        assert trio.current_time() - start == pytest.approx(10)
        assert "k-src (IPv4)" in str(caught.value)


# -- releases owed across restarts ----------------------------------------------------------------


async def test_a_release_owed_is_written_down_until_it_is_done(
    sockdir: str, autojump_clock: Any
) -> None:
    journal = ReleaseJournal(Path(sockdir) / "proxy-a.ipam-releases.json")
    async with running(sockdir, journal=journal) as env:
        await env.client.allocate_pair("k")
        assert not journal.path.exists()  # nothing owed
        env.client.release_later("k")
        assert journal.load() == {"k": pytest.approx(WALL_START + trio.current_time() + DELAY)}
        await env.fake.until(lambda: not env.client.pending_releases, within=DELAY + 5)
        assert not journal.path.exists()


async def test_a_release_owed_by_a_killed_instance_is_done_by_the_next_at_its_time(
    sockdir: str, autojump_clock: Any, logs: list[dict[str, Any]]
) -> None:
    """The proxy killed within the release delay: the next instance releases the addresses
    when they were due (upstream left them to IPAM's GC, up to 2 h 40 m)."""
    journal = ReleaseJournal(Path(sockdir) / "proxy-a.ipam-releases.json")
    fake = FakeIpam()
    async with running(sockdir, fake=fake, journal=journal) as first:
        await first.client.allocate_pair("gone")
        await first.client.allocate_pair("stays")
        due = trio.current_time() + DELAY
        first.client.release_later("gone")
        await trio.sleep(5)
    # (cancelled: the file is as a SIGKILL leaves it, written when the release was asked for)
    assert set(journal.load()) == {"gone"}
    assert fake.called("Release") == []
    await trio.sleep(1)
    async with running(sockdir, fake=fake, journal=journal) as second:
        assert set(second.client.pending_releases) == {"gone"}
        await fake.until(lambda: not second.client.pending_releases, within=DELAY)
        assert min(fake.times("Release")) == pytest.approx(due)
        assert {name for _, name in fake.called("Release")} == {"gone-src", "gone-dst"}
        assert len(fake.records) == 4  # "stays" untouched
    assert not journal.path.exists()
    assert any(r["message"] == "releases carried over from the previous instance" for r in logs)


async def test_a_carried_over_key_wanted_again_is_not_released(
    sockdir: str, autojump_clock: Any
) -> None:
    journal = ReleaseJournal(Path(sockdir) / "proxy-a.ipam-releases.json")
    fake = FakeIpam()
    async with running(sockdir, fake=fake, journal=journal) as first:
        await first.client.allocate_pair("k")
        first.client.release_later("k")
    async with running(sockdir, fake=fake, journal=journal) as second:
        await second.client.allocate_pair("k")  # the target came back (a heal)
        await trio.sleep(10 * DELAY)
        assert fake.called("Release") == []
        assert set(second.client.live_keys) == {"k"}
    assert not journal.path.exists()


# -- flush ----------------------------------------------------------------------------------------


async def test_flush_releases_everything_pending_now_in_parallel(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env:
        keys = [f"conn-{i}" for i in range(5)]
        for key in keys:
            await env.client.allocate_pair(key)
            env.client.release_later(key)
        env.fake.release_time = 1.0  # 4 releases per key, one after the other
        start = trio.current_time()
        with trio.fail_after(15):  # the shutdown budget
            await env.client.flush()
        assert trio.current_time() - start == pytest.approx(4.0)  # 5 keys side by side
        assert not env.fake.records and not env.client.pending_releases
        assert len(env.fake.called("Release")) == 20
        # After a flush, nothing waits for the delay any more.
        await env.client.allocate_pair("late")
        env.client.release_later("late")
        await env.fake.until(lambda: not env.fake.records, within=4.5)


async def test_flush_logs_what_it_could_not_release(
    sockdir: str, autojump_clock: Any, logs: list[dict[str, Any]]
) -> None:
    async with running(sockdir) as env:
        await env.client.allocate_pair("stuck")
        await env.client.allocate_pair("fine")
        env.client.release_later("stuck")
        env.client.release_later("fine")
        env.fake.refuse_release = lambda name: (
            UnavailableError("disk full") if name.startswith("stuck") else None
        )
        with trio.move_on_after(5):
            await env.client.flush()
        assert all(name.startswith("stuck") for _, name in env.fake.records)
        not_done = [r for r in logs if r["message"] == "release not done"]
        assert [r["extra"]["key"] for r in not_done] == ["stuck"]
        assert not_done[0]["extra"]["reason"] == "UNAVAILABLE: disk full"


# -- bridge addresses -----------------------------------------------------------------------------


@asynccontextmanager
async def bridge_running(
    env: Env, renew: float = 300.0
) -> AsyncIterator[tuple[BridgeAddresses, trio.MemoryReceiveChannel[RouterEvent]]]:
    send, receive = trio.open_memory_channel[RouterEvent](10)
    bridge = BridgeAddresses(env.channel, OWNER, renew_interval=renew, max_backoff=MAX_BACKOFF)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run, send)
        yield bridge, receive
        nursery.cancel_scope.cancel()


BRIDGE = frozenset({iface("198.18.0.1/24"), iface("2001:db8::1/64")})


async def test_bridge_start_retries_the_failed_family_without_duplicates(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env:
        env.fake.allocate_errors[(IPV6, "bridge")] = [UnavailableError("not yet")] * 4 + [
            ResourceExhaustedError("full")
        ]
        send, receive = trio.open_memory_channel[RouterEvent](10)
        bridge = BridgeAddresses(env.channel, OWNER, renew_interval=300, max_backoff=MAX_BACKOFF)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fix_later, env.fake, 10.0)
            start = trio.current_time()
            await nursery.start(bridge.run, send)
            assert trio.current_time() - start >= 10.0
            assert bridge.addresses.value == BRIDGE
            assert receive.receive_nowait() == SetBridgeAddresses(BRIDGE)
            with pytest.raises(trio.WouldBlock):
                receive.receive_nowait()
            # Only the failed family was asked again, at most MAX_BACKOFF apart.
            assert env.fake.called("Allocate").count((IPV4, "bridge")) == 1
            times = [c.time for c in env.fake.calls if c.family == IPV6]
            assert len(times) >= 5
            assert all(b - a <= MAX_BACKOFF + 1e-6 for a, b in itertools.pairwise(times))
            nursery.cancel_scope.cancel()


async def _fix_later(fake: FakeIpam, after: float) -> None:
    await trio.sleep(after)
    del fake.allocate_errors[(IPV6, "bridge")]


async def test_bridge_renewal_follows_a_changed_answer(sockdir: str, autojump_clock: Any) -> None:
    async with running(sockdir) as env, bridge_running(env, renew=300.0) as (bridge, events):
        assert events.receive_nowait() == SetBridgeAddresses(BRIDGE)
        start = trio.current_time()
        await trio.sleep(301)  # one renewal with the same answers: nothing to tell
        assert env.fake.called("Allocate").count((IPV4, "bridge")) == 2
        assert env.fake.times("Allocate")[-1] == pytest.approx(start + 300, abs=0.01)
        with pytest.raises(trio.WouldBlock):
            events.receive_nowait()
        # IPAM lost its records and gives another address (upstream kept the old one)
        env.fake.answers[(IPV4, "bridge")] = Prefix(address="198.18.0.77", prefixLength=24)
        seen = bridge.addresses.value
        with trio.fail_after(301):
            changed = await bridge.addresses.wait_change(seen)
        expected = frozenset({iface("198.18.0.77/24"), iface("2001:db8::1/64")})
        assert changed == expected
        assert events.receive_nowait() == SetBridgeAddresses(expected)


async def test_bridge_failed_renewal_is_retried_with_backoff(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir) as env, bridge_running(env, renew=300.0) as (bridge, events):
        events.receive_nowait()
        env.fake.allocate_errors[(IPV4, "bridge")] = [UnavailableError("down")] * 3 + [
            ResourceExhaustedError("odd")
        ]
        start = trio.current_time()
        await trio.sleep(300.5)
        await env.fake.until(lambda: len(env.fake.called("Allocate")) >= 2 + 2 + 3)
        del env.fake.allocate_errors[(IPV4, "bridge")]
        await env.fake.until(lambda: bool(env.fake.records) and env.fake.calls[-1].family == IPV4)
        v4 = [c.time - start for c in env.fake.calls if c.family == IPV4][1:]
        assert v4[0] == pytest.approx(300, abs=0.01)
        assert all(b - a <= MAX_BACKOFF + 1e-6 for a, b in itertools.pairwise(v4))
        assert v4[-1] < 300 + 10  # retried soon, not at the next interval
        v6 = [c for c in env.fake.calls if c.family == IPV6]
        assert len(v6) == 2  # the family that renewed fine is not asked again
        assert bridge.addresses.value == BRIDGE
        with pytest.raises(trio.WouldBlock):
            events.receive_nowait()


async def test_bridge_task_is_cancellable_while_ipam_is_down(
    sockdir: str, autojump_clock: Any
) -> None:
    async with running(sockdir, serve=False) as env:
        send, _ = trio.open_memory_channel[RouterEvent](1)
        bridge = BridgeAddresses(env.channel, OWNER, renew_interval=300, max_backoff=MAX_BACKOFF)
        with trio.move_on_after(120) as waited:
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.run, send)
        assert waited.cancelled_caught
        assert bridge.addresses.value == frozenset()
