"""The VIP watch: `parse_vips` (pure), and `VipWatch` against a fake ConfigurationManager.

The fake is a real `proxy.rpc.Server` on a UNIX socket (short tmp dir) speaking the real
protocol; each WatchVip call it receives is handed to the test, which decides what the stream
sends and when it ends or fails. Virtual time (autojump) wherever a delay is asserted.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from loguru import logger

from proxy.api.nsp.v1.configurationmanager_grpc import ConfigurationManagerServicer
from proxy.api.nsp.v1.configurationmanager_pb2 import VipResponse
from proxy.api.nsp.v1.model_pb2 import Trench, Vip
from proxy.kernel.router import RouterEvent, SetVips
from proxy.nsp import BadVip, VipWatch, parse_vip, parse_vips
from proxy.rpc import (
    Backoff,
    CallContext,
    ReconnectingChannel,
    RpcFailedError,
    Server,
    Status,
    StatusCode,
)

pytestmark = pytest.mark.timeout(30)

TRENCH = "trench-a"
MAX_BACKOFF = 2.0
V4 = "198.19.0.1/32"
V6 = "2001:db8:ff::1/128"
NET = "198.19.1.0/24"


def nets(*texts: str) -> frozenset[Any]:
    return frozenset(ipaddress.ip_network(text) for text in texts)


# == parse_vips ====================================================================================

GOOD = [
    ("198.19.0.1/32", "198.19.0.1/32"),
    ("198.19.0.1", "198.19.0.1/32"),  # a bare address is a host route
    ("198.19.1.0/24", "198.19.1.0/24"),
    ("2001:db8:ff::1/128", "2001:db8:ff::1/128"),
    ("2001:db8:ff::1", "2001:db8:ff::1/128"),
    ("2001:DB8:FF:0::1", "2001:db8:ff::1/128"),  # any spelling of the same address
    ("2001:db8:ff::/64", "2001:db8:ff::/64"),
    ("198.19.0.1/032", "198.19.0.1/32"),
    ("1.0.0.0/8", "1.0.0.0/8"),
]

BAD = [
    ("", "empty"),
    ("not-an-address", "not an IP address"),
    ("198.19.0.256", "not an IP address"),
    ("198.19.0.1/", "not an IP address"),
    ("/32", "not an IP address"),
    (" 198.19.0.1/32", "not an IP address"),
    ("198.19.0.1/32\n", "not an IP address"),
    ("198.19.0.1/255.255.255.255", "not an IP address"),  # netmask form: not a VIP's spelling
    ("fe80::1%eth0", "not an IP address"),  # scoped
    ("198.19.0.1/24/24", "not an IP address"),
    ("198.19.0.1/33", "prefix length 33"),
    ("2001:db8::/129", "prefix length 129"),
    ("198.19.0.1/24", "host bits set: the prefix would be 198.19.0.0/24"),
    ("2001:db8:ff::1/64", "host bits set: the prefix would be 2001:db8:ff::/64"),
    ("0.0.0.0/0", "default prefix"),
    ("::/0", "default prefix"),
    ("0.0.0.0", "this network"),
    ("0.1.2.3", "this network"),
    ("::", "unspecified"),
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("169.254.1.1", "link-local"),
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("239.1.1.0/24", "multicast"),
    ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("::ffff:198.19.0.1", "IPv4-mapped"),
    ("128.0.0.0/1", "link-local"),  # a prefix reaching a special range is refused too
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_good_vips(text: str, expected: str) -> None:
    assert parse_vip(text) == ipaddress.ip_network(expected)
    assert parse_vips([text]) == (nets(expected), [])


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_bad_vips_are_rejected_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(BadVip, match=None) as caught:
        parse_vip(text)
    assert reason in str(caught.value)
    assert parse_vips([text]) == (frozenset(), [(text, str(caught.value))])


def test_parse_vips_keeps_the_good_ones_collapses_duplicates_and_lists_each_bad_value_once() -> (
    None
):
    valid, rejected = parse_vips(
        [V4, "garbage", "198.19.0.1", V6, "", "garbage", "2001:db8:ff:0::1", NET, "127.0.0.1"]
    )
    assert valid == nets(V4, V6, NET)
    assert [value for value, _ in rejected] == ["garbage", "", "127.0.0.1"]
    assert parse_vips([]) == (frozenset(), [])


@given(st.text(max_size=60))
def test_parse_vip_never_fails_other_than_with_a_reason(text: str) -> None:
    try:
        network = parse_vip(text)
    except BadVip as exc:
        assert str(exc)
    else:
        assert network.prefixlen > 0 and network.network_address == ipaddress.ip_address(
            text.split("/")[0]
        )


@given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
def test_every_canonical_prefix_is_accepted_or_refused_as_special(address: Any, bits: int) -> None:
    network = ipaddress.ip_network(f"{address}/{min(bits, address.max_prefixlen)}", strict=False)
    try:
        assert parse_vip(str(network)) == network
    except BadVip as exc:
        assert "default prefix" in str(exc) or "reaches" in str(exc), exc


# == VipWatch against a fake NSP ===================================================================


class FakeStream:
    """One WatchVip call as the test drives it."""

    def __init__(self, request: Vip, opened_at: float) -> None:
        self.request = request
        self.opened_at = opened_at
        self._send, self._receive = trio.open_memory_channel[list[str] | Status](math.inf)

    def send(self, *addresses: str) -> None:
        self._send.send_nowait(list(addresses))

    def fail(self, code: StatusCode = StatusCode.UNAVAILABLE, text: str = "nsp restarting") -> None:
        self._send.send_nowait(Status(code, text))

    def end(self) -> None:
        """End the stream with status OK, as a server going away cleanly does."""
        self._send.close()


class FakeNsp(ConfigurationManagerServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self._opened_send, self.opened = trio.open_memory_channel[FakeStream](math.inf)

    async def WatchVip(self, message: Vip, request: CallContext) -> AsyncIterator[VipResponse]:
        stream = FakeStream(message, trio.current_time())
        self._opened_send.send_nowait(stream)
        async for item in stream._receive:
            if isinstance(item, Status):
                raise RpcFailedError(item)
            yield VipResponse(
                vips=[
                    Vip(name=f"vip-{i}", address=address, trench=Trench(name=TRENCH))
                    for i, address in enumerate(item)
                ]
            )

    async def next_stream(self, within: float = 10.0) -> FakeStream:
        with trio.fail_after(within):
            return await self.opened.receive()


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="vw-")  # short: sun_path is 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Log records (INFO and up) of the test: message, level and context."""
    records: list[dict[str, Any]] = []
    sink = logger.add(
        lambda message: records.append(
            {
                "message": message.record["message"],
                "level": message.record["level"].name,
                **message.record["extra"],
            }
        ),
        level="INFO",
    )
    try:
        yield records
    finally:
        logger.remove(sink)


def logged(logs: list[dict[str, Any]], message: str) -> list[dict[str, Any]]:
    return [record for record in logs if record["message"] == message]


@asynccontextmanager
async def serving(path: str, fake: FakeNsp) -> AsyncIterator[None]:
    """The fake NSP until the block ends (then its connections close and the socket goes)."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(Server([fake]).serve_unix, path))
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def watching(
    path: str, backoff: Backoff | None = None
) -> AsyncIterator[tuple[VipWatch, trio.MemoryReceiveChannel[RouterEvent]]]:
    """A VipWatch over its own ReconnectingChannel; (the watch, what the router receives)."""
    channel = ReconnectingChannel(
        f"unix://{path}", name="nsp", backoff=Backoff(maximum=MAX_BACKOFF, initial=0.1)
    )
    watch = VipWatch(channel, TRENCH, max_backoff=MAX_BACKOFF, backoff=backoff)
    send, receive = trio.open_memory_channel[RouterEvent](100)
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        await nursery.start(partial(watch.run, send))
        try:
            yield watch, receive
        finally:
            nursery.cancel_scope.cancel()


async def next_event(events: trio.MemoryReceiveChannel[RouterEvent], within: float = 5.0) -> Any:
    with trio.fail_after(within):
        return await events.receive()


def no_event(events: trio.MemoryReceiveChannel[RouterEvent]) -> None:
    with pytest.raises(trio.WouldBlock):
        event = events.receive_nowait()
        pytest.fail(f"unexpected router event {event}")


async def test_valid_vips_reach_the_router_and_garbage_is_logged_once(
    sockdir: str, logs: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeNsp()
    path = f"{sockdir}/nsp.sock"
    long_garbage = "x" * 10_000
    async with serving(path, fake), watching(path) as (watch, events):
        stream = await fake.next_stream()
        assert stream.request == Vip(trench=Trench(name=TRENCH))  # upstream's filter
        stream.send(V4, "not-an-address", V6, "", "198.19.0.1/24", long_garbage)
        assert await next_event(events) == SetVips(nets(V4, V6))
        assert watch.vips.value == nets(V4, V6)
        assert set(watch.rejected) == {"not-an-address", "", "198.19.0.1/24", long_garbage}

        rejected = logged(logs, "vip rejected")
        assert [(r["level"], r["address"]) for r in rejected[:3]] == [
            ("WARNING", "'not-an-address'"),
            ("WARNING", "''"),
            ("WARNING", "'198.19.0.1/24'"),
        ]
        assert rejected[0]["vip"] == "vip-1" and rejected[0]["trench"] == TRENCH
        assert rejected[0]["reason"] == "not an IP address or CIDR prefix"
        assert "host bits set" in rejected[2]["reason"]
        assert len(rejected[3]["address"]) < 200 and "10000 characters" in rejected[3]["address"]

        # The same garbage again (other messages, other order): not logged again.
        stream.send("not-an-address", V6, V4, "")
        stream.send(V4, "not-an-address", NET, "")
        assert await next_event(events) == SetVips(nets(V4, NET))
        assert len(logged(logs, "vip rejected")) == 4


async def test_an_unchanged_valid_set_sends_nothing(
    sockdir: str, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeNsp()
    path = f"{sockdir}/nsp.sock"
    async with serving(path, fake), watching(path) as (_, events):
        stream = await fake.next_stream()
        stream.send(V4, V6)
        assert await next_event(events) == SetVips(nets(V4, V6))
        stream.send(V4, V6)  # repeated, as NSP does on any change of the VIP section
        stream.send(V6, V4)  # reordered
        stream.send(V4, "198.19.0.1", V6, "garbage")  # the same set, spelled differently
        stream.send(V6)
        # The first event after the repeats is the change: none of the repeats sent anything.
        assert await next_event(events) == SetVips(nets(V6))
        await trio.sleep(5)
        no_event(events)


async def test_the_first_message_is_sent_even_when_it_holds_no_valid_vip(
    sockdir: str, autojump_clock: trio.testing.MockClock
) -> None:
    """NSP's first word replaces whatever the router started with (a previous instance's
    rules), even when the trench has no VIP; only garbage counts as none too."""
    fake = FakeNsp()
    path = f"{sockdir}/nsp.sock"
    async with serving(path, fake), watching(path) as (_, events):
        stream = await fake.next_stream()
        stream.send("garbage")
        assert await next_event(events) == SetVips(frozenset())
        stream.send()
        stream.send(V4)
        assert await next_event(events) == SetVips(nets(V4))
        stream.send()  # NSP says the VIP is gone: that is a change, unlike a lost stream
        assert await next_event(events) == SetVips(frozenset())


async def test_a_stream_ended_by_nsp_keeps_the_vips_and_is_watched_again_after_500ms(
    sockdir: str, logs: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeNsp()
    path = f"{sockdir}/nsp.sock"
    async with serving(path, fake), watching(path) as (watch, events):
        first = await fake.next_stream()
        first.send(V4, V6, "garbage")
        assert await next_event(events) == SetVips(nets(V4, V6))
        await trio.sleep(30)  # a stream that worked for a while: the retry starts short again
        ended = trio.current_time()
        first.end()

        second = await fake.next_stream()
        assert 0.4 <= second.opened_at - ended <= 0.6  # upstream's 500 ms, jittered
        no_event(events)  # the loss sent no empty set
        assert watch.vips.value == nets(V4, V6)
        [down] = logged(logs, "vip watch down, last VIPs kept")
        assert down["level"] == "WARNING"
        assert down["reason"] == "stream ended by NSP" and down["vips"] == 2

        second.send(V6, V4, "garbage")  # the same list again: nothing to do, nothing logged
        second.send(V4)
        assert await next_event(events) == SetVips(nets(V4))
        assert len(logged(logs, "vip watch resumed")) == 1
        assert len(logged(logs, "vip rejected")) == 1
        assert watch.streams == 2


async def test_failing_streams_back_off_up_to_the_cap_and_log_the_outage_once(
    sockdir: str, logs: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeNsp()
    path = f"{sockdir}/nsp.sock"
    async with serving(path, fake), watching(path) as (watch, events):
        stream = await fake.next_stream()
        stream.send(V4)
        assert await next_event(events) == SetVips(nets(V4))
        opened = [trio.current_time()]  # the stream fails at once: no reset of the backoff
        stream.fail(StatusCode.INTERNAL, "boom")
        while trio.current_time() < 60:
            stream = await fake.next_stream()
            opened.append(stream.opened_at)
            stream.fail()
        gaps = [b - a for a, b in itertools.pairwise(opened)]
        assert 0.4 <= gaps[0] <= 0.6  # upstream's 500 ms first, then growing
        assert 0.64 <= gaps[1] <= 0.96
        assert max(gaps) <= MAX_BACKOFF + 1e-6  # capped by NSM_GRPC_MAX_BACKOFF, jitter included
        assert min(gaps[-5:]) >= MAX_BACKOFF * 0.8 - 1e-6  # still trying at the cap
        assert len(opened) >= 25
        no_event(events)
        assert watch.vips.value == nets(V4)
        [down] = logged(logs, "vip watch down, last VIPs kept")
        assert down["reason"] == "INTERNAL: boom"


async def test_nsp_gone_keeps_the_vips_and_the_watch_resumes_when_it_is_back(
    sockdir: str, logs: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    path = f"{sockdir}/nsp.sock"
    async with watching(path) as (watch, events):
        fake = FakeNsp()
        async with serving(path, fake):
            stream = await fake.next_stream()
            stream.send(V4, V6)
            assert await next_event(events) == SetVips(nets(V4, V6))
        # The server is gone (connection closed, socket removed); the channel redials in vain.
        await trio.sleep(60)
        no_event(events)
        assert watch.vips.value == nets(V4, V6)
        [down] = logged(logs, "vip watch down, last VIPs kept")
        assert down["reason"].startswith("UNAVAILABLE")

        back = FakeNsp()
        async with serving(path, back):
            stream = await back.next_stream(within=MAX_BACKOFF * 2 + 1)
            stream.send(V6, NET)
            assert await next_event(events) == SetVips(nets(V6, NET))
            [resumed] = logged(logs, "vip watch resumed")
            assert resumed["outage"].endswith("s")
            assert len(logged(logs, "vip watch down, last VIPs kept")) == 1


async def test_the_watch_starts_at_once_without_nsp_and_catches_up_when_it_appears(
    sockdir: str, autojump_clock: trio.testing.MockClock
) -> None:
    path = f"{sockdir}/nsp.sock"
    start = trio.current_time()
    async with watching(path) as (watch, events):
        assert trio.current_time() == start  # started: the proxy does not wait for NSP
        await trio.sleep(20)
        no_event(events)
        fake = FakeNsp()
        async with serving(path, fake):
            stream = await fake.next_stream(within=MAX_BACKOFF + 1)
            stream.send(V4)
            assert await next_event(events) == SetVips(nets(V4))
            assert watch.streams == 1


async def test_a_bad_value_that_left_and_came_back_is_logged_again(
    sockdir: str, logs: list[dict[str, Any]], autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeNsp()
    path = f"{sockdir}/nsp.sock"
    async with serving(path, fake), watching(path) as (_, events):
        stream = await fake.next_stream()
        stream.send(V4, "bad")
        assert await next_event(events) == SetVips(nets(V4))
        stream.send(V4, V6)  # fixed
        assert await next_event(events) == SetVips(nets(V4, V6))
        stream.send(V4, "bad")  # broken again: a new event for whoever reads the log
        assert await next_event(events) == SetVips(nets(V4))
    assert [r["address"] for r in logged(logs, "vip rejected")] == ["'bad'", "'bad'"]
