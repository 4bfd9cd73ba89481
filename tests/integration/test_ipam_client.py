"""The IPAM client against the lab IPAM (`proxy.lab.ipam`): Meridio's semantics over the wire.

Real time, short intervals: the lab IPAM, the client and the health registry run in this trio
run, over a UNIX socket in a short /tmp directory.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from proxy.health import (
    IPAM_CLIENT,
    NOT_SERVING,
    SERVING,
    Health,
    ServingStatus,
    follow_channel,
)
from proxy.ipam import BridgeAddresses, IpamClient, IpamError
from proxy.ipam_model import Owner
from proxy.kernel.router import RouterEvent, SetBridgeAddresses
from proxy.lab.ipam import IpamSettings, serve_ipam
from proxy.lab.ipam_store import IpamStore
from proxy.rpc import Backoff, ReconnectingChannel, UnixAddress
from tests.integration.waiting import eventually

pytestmark = pytest.mark.timeout(30)

TRENCH = "trench-a"
OWNER = Owner(TRENCH, "conduit-a", "node-1")
MAX_BACKOFF = 0.2
BRIDGE = frozenset(
    {ipaddress.ip_interface("198.18.0.1/24"), ipaddress.ip_interface("2001:db8:100::1/64")}
)


def channel_to(path: str) -> ReconnectingChannel:
    return ReconnectingChannel(
        f"unix://{path}", name="ipam", backoff=Backoff(maximum=MAX_BACKOFF, initial=0.05)
    )


@asynccontextmanager
async def lab_ipam(
    path: str, db: str = ":memory:", now: Callable[[], float] = time.time
) -> AsyncIterator[None]:
    settings = IpamSettings(trench=TRENCH, db=db, gc_interval=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_ipam, now=now), UnixAddress(path), settings)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client_of(path: str, release_delay: float = 0.0) -> AsyncIterator[IpamClient]:
    """A client over its own channel: leaving the block is a proxy restart."""
    channel = channel_to(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        client = IpamClient(channel, OWNER, release_delay=release_delay, max_backoff=MAX_BACKOFF)
        await nursery.start(client.run)
        yield client
        nursery.cancel_scope.cancel()


def children(db: str) -> set[str]:
    """The names of the child records in the lab IPAM's database."""
    store = IpamStore.open(db)
    try:
        return {record.key.name for record in store.children()}
    finally:
        store.close()


async def bridge_once(path: str) -> tuple[frozenset[object], list[RouterEvent]]:
    channel = channel_to(path)
    send, receive = trio.open_memory_channel[RouterEvent](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        bridge = BridgeAddresses(channel, OWNER, renew_interval=60, max_backoff=MAX_BACKOFF)
        with trio.fail_after(10):
            await nursery.start(bridge.run, send)
            event = await receive.receive()
        nursery.cancel_scope.cancel()
    return frozenset(bridge.addresses.value), [event]


async def test_bridge_keeps_its_address_across_a_client_restart(sockdir: str) -> None:
    path = f"{sockdir}/ipam.sock"
    async with lab_ipam(path):
        first, events = await bridge_once(path)
        assert first == BRIDGE
        assert events == [SetBridgeAddresses(BRIDGE)]
        again, events = await bridge_once(path)
        assert again == BRIDGE
        assert events == [SetBridgeAddresses(BRIDGE)]


async def test_pairs_are_stable_per_key_across_a_client_restart(sockdir: str) -> None:
    path = f"{sockdir}/ipam.sock"
    async with lab_ipam(path):
        async with client_of(path) as client:
            with trio.fail_after(10):
                a = await client.allocate_pair("conn-a")
                b = await client.allocate_pair("conn-b")
                assert await client.allocate_pair("conn-a") == a
        assert [str(x) for x in a.src + a.dst] == [
            "198.18.0.1/24",
            "2001:db8:100::1/64",
            "198.18.0.2/24",
            "2001:db8:100::2/64",
        ]
        assert not set(a.src + a.dst) & set(b.src + b.dst)
        async with client_of(path) as client:
            with trio.fail_after(10):
                assert await client.allocate_pair("conn-a") == a
                assert await client.allocate_pair("conn-b") == b


async def test_released_records_are_gone_after_the_delay(sockdir: str) -> None:
    path = f"{sockdir}/ipam.sock"
    delay = 0.5
    async with lab_ipam(path), client_of(path, release_delay=delay) as client:
        with trio.fail_after(10):
            a = await client.allocate_pair("conn-a")
            await client.allocate_pair("conn-b")
            client.release_later("conn-a")
            held = await client.allocate_pair("conn-c")  # a's addresses are still taken
            assert not set(held.src + held.dst) & set(a.src + a.dst)
            start = trio.current_time()
            await eventually(lambda: not client.pending_releases, within=10.0, interval=0.02)
            assert trio.current_time() - start >= delay - 0.1
            # The lowest addresses are free again: a's records are gone from the IPAM.
            assert await client.allocate_pair("conn-d") == a


async def test_ipam_outage_degrades_health_and_everything_resumes_after_it(sockdir: str) -> None:
    path = f"{sockdir}/ipam.sock"
    db = f"{sockdir}/ipam.db"
    renewals: list[float] = []

    def now() -> float:  # the lab IPAM reads its clock once per Allocate
        renewals.append(time.time())
        return time.time()

    health = Health()
    channel = channel_to(path)
    send, receive = trio.open_memory_channel[RouterEvent](10)
    bridge = BridgeAddresses(channel, OWNER, renew_interval=0.3, max_backoff=MAX_BACKOFF)
    client = IpamClient(channel, OWNER, release_delay=0, max_backoff=MAX_BACKOFF, call_timeout=1)

    async def serving(wanted: ServingStatus) -> None:
        watched = health.watched(IPAM_CLIENT)
        assert watched is not None
        with trio.fail_after(10):
            await watched.wait_for(wanted)

    async with trio.open_nursery() as nursery:
        server = trio.CancelScope()

        async def serve() -> None:
            with server:
                async with lab_ipam(path, db, now):
                    await trio.sleep_forever()

        nursery.start_soon(serve)
        await nursery.start(channel.run)
        nursery.start_soon(follow_channel, channel, health, IPAM_CLIENT)
        await nursery.start(client.run)
        with trio.fail_after(10):
            await nursery.start(bridge.run, send)
        await serving(SERVING)
        assert bridge.addresses.value == BRIDGE
        assert receive.receive_nowait() == SetBridgeAddresses(BRIDGE)
        with trio.fail_after(10):
            pair = await client.allocate_pair("conn-a")

        server.cancel()  # the IPAM goes away
        await serving(NOT_SERVING)
        client.release_later("conn-a")  # cannot be done now: retried
        with pytest.raises(IpamError, match=r"conn-b-src \(IPv4\): no answer within 1s, IPAM"):
            with trio.fail_after(5):
                await client.allocate_pair("conn-b")
        await trio.sleep(1)  # several renewals and release retries fail meanwhile
        assert set(client.pending_releases) == {"conn-a", "conn-b"}  # conn-b: the rollback
        assert children(db) == {"bridge", "conn-a-src", "conn-a-dst"}

        server = trio.CancelScope()
        nursery.start_soon(serve)  # back, with the same database
        await serving(SERVING)
        await eventually(lambda: not client.pending_releases, within=10.0, interval=0.02)
        seen = len(renewals)
        # two renewals (IPv4 and IPv6 each)
        await eventually(lambda: len(renewals) >= seen + 4, within=10.0, interval=0.02)
        assert bridge.addresses.value == BRIDGE
        with pytest.raises(trio.WouldBlock):
            receive.receive_nowait()  # nothing changed: nothing more for the router
        assert children(db) == {"bridge"}
        with trio.fail_after(10):
            assert await client.allocate_pair("conn-c") == pair  # a's addresses, free again
        nursery.cancel_scope.cancel()
