"""`follow_channel`: a sub-service follows a real ReconnectingChannel to a real server that is
stopped and started (UNIX socket in a short tmp dir; virtual time, so the backoff costs nothing)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trio.testing

from proxy.health import (
    IPAM_CLIENT,
    NOT_SERVING,
    NSP_CLIENT,
    SERVING,
    Health,
    HealthServicer,
    ServingStatus,
    follow_channel,
)
from proxy.rpc import Backoff, ChannelState, ReconnectingChannel, Server

pytestmark = pytest.mark.timeout(20)

MAX_BACKOFF = 2.0


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="hf-")  # short: sun_path is 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(path: str) -> AsyncIterator[None]:
    """A real gRPC server (any service will do: the channel only needs a peer) until the block
    ends; leaving it closes the connections (GOAWAY) and removes the socket file."""
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(Server([HealthServicer(Health())]).serve_unix, path))
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


def state(channel: ReconnectingChannel) -> ChannelState:
    return channel.state.value  # read anew each time (no narrowing across awaits)


async def record(health: Health, service: str, history: list[ServingStatus]) -> None:
    watched = health.watched(service)
    assert watched is not None
    history.append(watched.value)
    while True:
        history.append(await watched.wait_change(history[-1]))


async def wait_status(health: Health, service: str, status: ServingStatus, within: float) -> float:
    """Wait (virtual time) for the status; how long it took."""
    watched = health.watched(service)
    assert watched is not None
    start = trio.current_time()
    with trio.fail_after(within):
        await watched.wait_change(NOT_SERVING if status == SERVING else SERVING)
    return trio.current_time() - start


async def test_serving_exactly_while_the_channel_is_ready(
    sockdir: str, autojump_clock: trio.testing.MockClock
) -> None:
    path = f"{sockdir}/nsp.sock"
    channel = ReconnectingChannel(
        f"unix://{path}", name="nsp", backoff=Backoff(maximum=MAX_BACKOFF, initial=0.1)
    )
    health = Health()
    history: list[ServingStatus] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(record, health, NSP_CLIENT, history)
        await nursery.start(channel.run)
        nursery.start_soon(follow_channel, channel, health, NSP_CLIENT)

        # No server: the channel keeps failing, the sub-service stays down.
        await trio.sleep(30)
        assert state(channel) is ChannelState.TRANSIENT_FAILURE
        assert health.status(NSP_CLIENT) == NOT_SERVING

        async with serving(path):
            # The next redial (at most one capped backoff away) makes it SERVING.
            assert await wait_status(health, NSP_CLIENT, SERVING, within=MAX_BACKOFF + 1) <= (
                MAX_BACKOFF
            )
            assert state(channel) is ChannelState.READY
            await trio.sleep(10)
            assert health.status(NSP_CLIENT) == SERVING
        # The server closed the connection: NOT_SERVING at once, not at the next keepalive.
        assert await wait_status(health, NSP_CLIENT, NOT_SERVING, within=1) < 0.5
        await trio.sleep(10)
        assert health.status(NSP_CLIENT) == NOT_SERVING

        async with serving(path):
            await wait_status(health, NSP_CLIENT, SERVING, within=MAX_BACKOFF + 1)
            assert health.status(IPAM_CLIENT) == NOT_SERVING  # only its own sub-service
            assert health.status("Readiness") == NOT_SERVING  # the others are still down
            nursery.cancel_scope.cancel()
    assert history == [NOT_SERVING, SERVING, NOT_SERVING, SERVING]  # no flapping in between
    assert channel.connects == 2
    assert health.status(NSP_CLIENT) == NOT_SERVING  # the follower was cancelled too


async def test_cancelled_follower_leaves_the_sub_service_not_serving(
    sockdir: str, autojump_clock: trio.testing.MockClock
) -> None:
    path = f"{sockdir}/nsp.sock"
    channel = ReconnectingChannel(
        f"unix://{path}", name="nsp", backoff=Backoff(maximum=MAX_BACKOFF, initial=0.1)
    )
    health = Health()
    async with serving(path), trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        async with trio.open_nursery() as followers:
            followers.start_soon(follow_channel, channel, health, NSP_CLIENT)
            await wait_status(health, NSP_CLIENT, SERVING, within=1)
            followers.cancel_scope.cancel()
        # Nobody follows the channel any more: its state is no longer known to health.
        assert state(channel) is ChannelState.READY
        assert health.status(NSP_CLIENT) == NOT_SERVING
        nursery.cancel_scope.cancel()
