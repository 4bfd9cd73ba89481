"""The proxy's registration and LB discovery against the lab NSM (registry over a UNIX socket)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import trio

from proxy import rpc
from proxy.api.registry import registry_grpc
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceQuery,
)
from proxy.lab.nsm.forwarding import NoKernel
from proxy.lab.nsm.server import serve_nsm
from proxy.nsm.discovery import Discovery, LbEvent, LbGone, LbSeen
from proxy.nsm.registration import Registration
from proxy.rpc.fdpass import path_of_url
from proxy.shutdown import Shutdown

pytestmark = pytest.mark.timeout(30)
LB_SERVICE = "conduit-a.trench-a.red"


@pytest.fixture
async def nsm(nursery: trio.Nursery) -> AsyncIterator[rpc.ReconnectingChannel]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="mp-nsmc-")
    try:
        path = await nursery.start(lambda task_status: serve_nsm(
            f"{directory}/nsm.sock", forwarder=NoKernel(), task_status=task_status
        ))  # fmt: skip
        channel = rpc.ReconnectingChannel(
            f"unix://{path}", name="nsm", backoff=rpc.Backoff(maximum=0.5)
        )
        await nursery.start(channel.run)
        yield channel
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def endpoint_socket() -> Iterator[str]:
    """A listening UNIX socket standing for the proxy's endpoint: its path. The registration
    passes the socket file as a descriptor, so it must exist."""
    directory = tempfile.mkdtemp(dir="/tmp", prefix="mp-nsel-")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(f"{directory}/listen.on")
        listener.listen()
        yield f"{directory}/listen.on"
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


async def find(channel: rpc.ReconnectingChannel, name: str) -> list[NetworkServiceEndpoint]:
    stub = registry_grpc.NetworkServiceEndpointRegistryStub(await channel.get())
    query = NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint(name=name))
    async with rpc.server_stream(stub.Find, query) as answers:
        return [a.network_service_endpoint async for a in answers]


async def test_registration_registers_and_unregisters_within_the_budget(
    nsm: rpc.ReconnectingChannel,
) -> None:
    shutdown = Shutdown(5.0)
    with endpoint_socket() as listen:
        registration = Registration(
            nsm,
            name="proxy-a",
            service="proxy.conduit-a.trench-a.red",
            host="node-a",
            url=f"unix://{listen}",
            call_timeout=5.0,
            backoff=rpc.Backoff(maximum=0.5),
            shutdown=shutdown,
        )
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(registration.run)
                [nse] = await find(nsm, "proxy-a")
                labels = nse.network_service_labels["proxy.conduit-a.trench-a.red"].labels
                assert dict(labels) == {"nodeName": "node-a"}
                assert nse.expiration_time.seconds > time.time() + 30
                # The socket went as a descriptor: NSM (this process here) holds it and
                # publishes where it dials it, as nsmgr's localbypass does.
                assert nse.url.startswith(f"unix:///proc/{os.getpid()}/fd/")
                held, ours = os.stat(path_of_url(nse.url)), os.stat(listen)
                assert (held.st_dev, held.st_ino) == (ours.st_dev, ours.st_ino)
                shutdown.begin()
                nursery.cancel_scope.cancel()
        assert await find(nsm, "proxy-a") == []


async def test_registration_stops_at_once_when_nsm_never_answers() -> None:
    """Upstream's registration ignored SIGTERM (§11.13); cancellation ends ours at once."""
    channel = rpc.ReconnectingChannel(
        "unix:///tmp/mp-nowhere/nsm.sock", name="nsm", backoff=rpc.Backoff(maximum=0.5)
    )
    shutdown = Shutdown(5.0)
    registration = Registration(
        channel,
        name="proxy-a",
        service="proxy.x",
        host="node-a",
        url="unix:///tmp/x",
        call_timeout=15.0,
        backoff=rpc.Backoff(maximum=0.5),
        shutdown=shutdown,
    )
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run)
        nursery.start_soon(registration.run)
        await trio.sleep(0.5)
        shutdown.begin()
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started < 5


async def test_discovery_reports_load_balancers_appearing_and_going(
    nsm: rpc.ReconnectingChannel,
) -> None:
    send, receive = trio.open_memory_channel[LbEvent](10)
    discovery = Discovery(
        nsm, LB_SERVICE, send, token_lifetime=600.0, backoff=rpc.Backoff(maximum=0.5)
    )
    stub = registry_grpc.NetworkServiceEndpointRegistryStub(await nsm.get())

    def lb(name: str, lifetime: float) -> NetworkServiceEndpoint:
        nse = NetworkServiceEndpoint(
            name=name, network_service_names=[LB_SERVICE], url=f"unix:///tmp/{name}.sock"
        )
        nse.expiration_time.seconds = int(time.time() + lifetime)
        return nse

    await stub.Register(lb("lb-a", 60))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(discovery.run)
            assert await receive.receive() == LbSeen("lb-a")
            await stub.Register(lb("lb-b", 60))
            assert await receive.receive() == LbSeen("lb-b")
            await stub.Register(lb("lb-a", 60))  # a refresh is not news
            unregister = lb("lb-b", 0)
            unregister.expiration_time.seconds = -1
            await stub.Unregister(unregister)
            assert await receive.receive() == LbGone("lb-b", "deleted")
            assert set(discovery.known) == {"lb-a"}
            nursery.cancel_scope.cancel()


async def test_registration_registers_again_as_soon_as_a_restarted_nsm_is_back() -> None:
    """The lab registry keeps registrations in memory, as a restarted one forgets them: the proxy
    must not wait for its refresh (40 s) to be findable again."""
    directory = tempfile.mkdtemp(dir="/tmp", prefix="mp-nsmr-")
    path = f"{directory}/nsm.sock"
    channel = rpc.ReconnectingChannel(
        f"unix://{path}", name="nsm", backoff=rpc.Backoff(maximum=0.2)
    )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{directory}/listen.on")
    registration = Registration(
        channel,
        name="proxy-a",
        service="proxy.conduit-a.trench-a.red",
        host="node-a",
        url=f"unix://{directory}/listen.on",
        call_timeout=5.0,
        backoff=rpc.Backoff(maximum=0.2),
        shutdown=Shutdown(5.0),
    )
    try:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as first_nsm:
                await first_nsm.start(lambda task_status: serve_nsm(
                    path, forwarder=NoKernel(), task_status=task_status
                ))  # fmt: skip
                await nursery.start(channel.run)
                await nursery.start(registration.run)
                assert registration.registrations == 1
                first_nsm.cancel_scope.cancel()  # and wait until it has removed its socket
            await nursery.start(lambda task_status: serve_nsm(
                path, forwarder=NoKernel(), task_status=task_status
            ))  # fmt: skip
            for _ in range(100):  # 5 s; the refresh would come after 40 s
                if await find(channel, "proxy-a"):
                    break
                await trio.sleep(0.05)
            else:
                pytest.fail("the proxy did not register again with the restarted NSM")
            services = registry_grpc.NetworkServiceRegistryStub(await channel.get())
            query = NetworkServiceQuery(
                network_service=NetworkService(name="proxy.conduit-a.trench-a.red")
            )
            async with rpc.server_stream(services.Find, query) as answers:
                assert [a.network_service.name async for a in answers] == [
                    "proxy.conduit-a.trench-a.red"
                ]
            nursery.cancel_scope.cancel()
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)
