"""The VIP watch and the NSPCli health against the real lab NSP (`proxy.lab.nsp`), real time.

The NSP serves a configuration file in a tmp dir with a short poll; the test edits the file (by
rename, as `kubectl` would replace a ConfigMap), stops and restarts the server, and looks at what
the router would receive and at the health the proxy reports.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import pytest
import trio

from proxy.health import NOT_SERVING, NSP_CLIENT, SERVING, Health, follow_channel
from proxy.kernel.router import RouterEvent, SetVips
from proxy.lab.nsp import serve_nsp
from proxy.nsp import VipWatch
from proxy.rpc import Backoff, ReconnectingChannel, UnixAddress

pytestmark = pytest.mark.timeout(30)

POLL = 0.05
MAX_BACKOFF = 0.5
TRENCH = "trench-a"
VIPS = {"vip-v4": "198.19.0.1/32", "vip-v6": "2001:db8:ff::1/128", "vip-net": "198.19.1.0/24"}


def nets(*texts: str) -> frozenset[Any]:
    return frozenset(ipaddress.ip_network(text) for text in texts)


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="nspc-")  # short: the socket lives here too
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_config(path: str, vips: dict[str, str]) -> None:
    """The trench's configuration with these VIPs, replaced atomically (rename)."""
    config = {
        "trench": {"name": TRENCH},
        "conduits": [{"name": "conduit-a", "trench": TRENCH}],
        "vips": [
            {"name": name, "address": address, "trench": TRENCH} for name, address in vips.items()
        ],
    }
    with open(f"{path}.tmp", "w") as file:
        json.dump(config, file)
    os.replace(f"{path}.tmp", path)


@attrs.define
class Proxy:
    """The proxy side: the NSP channel, its health, VIP watches and what the router gets."""

    channel: ReconnectingChannel
    health: Health
    nursery: trio.Nursery

    async def watch(self, trench: str = TRENCH) -> tuple[VipWatch, trio.MemoryReceiveChannel[Any]]:
        watch = VipWatch(self.channel, trench, max_backoff=MAX_BACKOFF)
        send, receive = trio.open_memory_channel[RouterEvent](100)
        await self.nursery.start(partial(watch.run, send))
        return watch, receive


@asynccontextmanager
async def proxy_side(socket: str) -> AsyncIterator[Proxy]:
    channel = ReconnectingChannel(
        f"unix://{socket}", name="nsp", backoff=Backoff(maximum=MAX_BACKOFF, initial=0.05)
    )
    health = Health()
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        nursery.start_soon(follow_channel, channel, health, NSP_CLIENT)
        try:
            yield Proxy(channel, health, nursery)
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def nsp(socket: str, config_path: str) -> AsyncIterator[None]:
    """The lab NSP until the block ends."""
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(serve_nsp, UnixAddress(socket), config_path, poll_interval=POLL)
        )
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def next_vips(events: trio.MemoryReceiveChannel[Any], within: float = 2.0) -> Any:
    with trio.fail_after(within):
        event = await events.receive()
    assert isinstance(event, SetVips)
    return event.vips


async def no_event(events: trio.MemoryReceiveChannel[Any], during: float) -> None:
    with trio.move_on_after(during):
        event = await events.receive()
        pytest.fail(f"unexpected router event {event}")


async def wait_health(health: Health, status: int, within: float) -> float:
    watched = health.watched(NSP_CLIENT)
    assert watched is not None
    start = time.monotonic()
    with trio.fail_after(within):
        while watched.value != status:
            await watched.wait_change(watched.value)
    return time.monotonic() - start


async def test_vips_reach_the_router_and_each_edit_brings_the_new_full_list(
    workdir: str,
) -> None:
    socket, config = f"{workdir}/nsp.sock", f"{workdir}/trench.json"
    write_config(config, VIPS)
    async with nsp(socket, config), proxy_side(socket) as proxy:
        watch, events = await proxy.watch()
        assert await next_vips(events) == nets(*VIPS.values())

        write_config(config, {"vip-v4": "198.19.0.2/32", "vip-new": "2001:db8:ff::2/128"})
        edited = time.monotonic()
        assert await next_vips(events, within=1.0) == nets("198.19.0.2/32", "2001:db8:ff::2/128")
        print(f"\nedit reached the router after {time.monotonic() - edited:.3f}s (poll {POLL}s)")

        write_config(config, {})
        assert await next_vips(events, within=1.0) == frozenset()
        assert watch.vips.value == frozenset()
        assert proxy.health.status(NSP_CLIENT) == SERVING


async def test_garbage_vips_are_skipped_and_the_good_ones_applied(
    workdir: str, warnings: list[dict[str, Any]]
) -> None:
    socket, config = f"{workdir}/nsp.sock", f"{workdir}/trench.json"
    garbage = {"vip-junk": "not-an-address", "vip-empty": "", "vip-hostbits": "198.19.2.1/24"}
    write_config(config, {**VIPS, **garbage})
    async with nsp(socket, config), proxy_side(socket) as proxy:
        watch, events = await proxy.watch()
        assert await next_vips(events) == nets(*VIPS.values())
        assert set(watch.rejected) == set(garbage.values())

        # Another edit repeats the garbage: applied again, not logged again.
        write_config(config, {**VIPS, **garbage, "vip-more": "198.19.0.9/32"})
        assert await next_vips(events, within=1.0) == nets(*VIPS.values(), "198.19.0.9/32")
    rejected = [record for record in warnings if record["message"] == "vip rejected"]
    assert sorted((r["vip"], r["address"]) for r in rejected) == sorted(
        (name, repr(value)) for name, value in garbage.items()
    )


async def test_a_vip_watch_for_another_trench_gets_none_of_these_vips(workdir: str) -> None:
    socket, config = f"{workdir}/nsp.sock", f"{workdir}/trench.json"
    write_config(config, VIPS)
    async with nsp(socket, config), proxy_side(socket) as proxy:
        _, own = await proxy.watch(TRENCH)
        other_watch, other = await proxy.watch("trench-b")
        assert await next_vips(own) == nets(*VIPS.values())
        assert await next_vips(other) == frozenset()  # NSP's answer: trench-b has no VIP here

        write_config(config, {**VIPS, "vip-more": "198.19.0.9/32"})
        assert await next_vips(own, within=1.0) == nets(*VIPS.values(), "198.19.0.9/32")
        await no_event(other, during=10 * POLL)
        assert other_watch.vips.value == frozenset()


async def test_nsp_down_keeps_the_vips_and_health_follows_then_the_watch_resumes(
    workdir: str, warnings: list[dict[str, Any]]
) -> None:
    socket, config = f"{workdir}/nsp.sock", f"{workdir}/trench.json"
    write_config(config, VIPS)
    async with proxy_side(socket) as proxy:
        watch, events = await proxy.watch()
        assert proxy.health.status(NSP_CLIENT) == NOT_SERVING  # no NSP yet
        async with nsp(socket, config):
            assert await next_vips(events) == nets(*VIPS.values())
            await wait_health(proxy.health, SERVING, within=2)

        took = await wait_health(proxy.health, NOT_SERVING, within=2)
        print(f"\nNSPCli NOT_SERVING {took:.3f}s after the NSP stopped")
        await no_event(events, during=1.5)  # several failed redials later: still no change
        assert watch.vips.value == nets(*VIPS.values())
        assert proxy.health.status(NSP_CLIENT) == NOT_SERVING
        down = [r for r in warnings if r["message"] == "vip watch down, last VIPs kept"]
        assert len(down) == 1 and down[0]["vips"] == 3

        write_config(config, {"vip-v4": "198.19.0.1/32"})  # changed while NSP was away
        async with nsp(socket, config):
            restarted = time.monotonic()
            assert await next_vips(events, within=MAX_BACKOFF + 2) == nets("198.19.0.1/32")
            await wait_health(proxy.health, SERVING, within=1)
            print(f"watch resumed {time.monotonic() - restarted:.3f}s after the restart")
            write_config(config, VIPS)
            assert await next_vips(events, within=1.0) == nets(*VIPS.values())
            assert watch.streams == 2
