"""The proxy's registration and LB discovery against the lab NSM (registry over a UNIX socket)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from functools import partial

import attrs
import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from proxy import rpc
from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.networkservice_grpc import NetworkServiceServicer
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry import registry_grpc
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceQuery,
)
from proxy.kernel.router import RouterEvent, SetLoadBalancer
from proxy.lab.nsm.forwarding import NoKernel
from proxy.lab.nsm.server import serve_nsm
from proxy.nsm.discovery import Discovery, LbEvent, LbGone, LbListed, LbSeen
from proxy.nsm.mesh import LbConnection, Mesh, MeshSettings
from proxy.nsm.path import server_hop
from proxy.nsm.registration import Registration
from proxy.rpc.fdpass import path_of_url
from proxy.shutdown import Shutdown
from tests.integration.waiting import eventually

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
            assert await receive.receive() == LbListed(frozenset({"lb-a"}))  # all there was
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


# -- the mesh passes its namespace -----------------------------------------------------------------


@attrs.frozen
class Pair:
    src: tuple[ipaddress.IPv4Interface, ...]
    dst: tuple[ipaddress.IPv4Interface, ...]


class FakeAddresses:
    async def allocate_pair(self, key: str) -> Pair:
        return Pair(
            (ipaddress.IPv4Interface("198.18.3.2/24"),), (ipaddress.IPv4Interface("198.18.3.3/24"),)
        )

    def release_later(self, key: str) -> None:
        pass


class Lb(NetworkServiceServicer):  # type: ignore[misc]
    """An LB endpoint as NSM's are: its answer's namespace passed back as a descriptor."""

    def __init__(self) -> None:
        self.closes: list[Connection] = []

    async def Request(self, message: NetworkServiceRequest, request: rpc.CallContext) -> Connection:
        assert request.fds is not None
        hop = server_hop(message.connection, "lb-a")
        url = request.fds.send_path("/proc/thread-self/ns/net")
        hop.connection.mechanism.CopyFrom(
            Mechanism(cls="LOCAL", type="KERNEL", parameters={"name": "lb-if", "inodeURL": url})
        )
        return hop.answer(hop.connection)

    async def Close(self, message: Connection, request: rpc.CallContext) -> Empty:
        self.closes.append(message)
        return Empty()


def same_file(a: str, b: str) -> bool:
    first, second = os.stat(a), os.stat(b)
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


async def test_the_mesh_passes_its_namespace_and_nsm_wires_it_by_that(sockdir: str) -> None:
    """The proxy's LB connection as NSM's sendfd client: its namespace goes as a descriptor (the
    lab NSM, this process here, wires the pair with it, not with a path or the pid), the answer
    keeps the file:// URL, and a refresh and the Close pass it again."""
    forwarder = NoKernel()
    lb = Lb()
    router_send, router_receive = trio.open_memory_channel[RouterEvent](10)
    settings = MeshSettings(
        name="proxy-a",
        service=LB_SERVICE,
        mtu=1500,
        request_timeout=5.0,
        max_backoff=0.5,
        default_lifetime=3.0,  # the manager's own lifetime rules: refreshed within a second
    )
    async with trio.open_nursery() as nursery:
        nsm_path = await nursery.start(
            partial(serve_nsm, f"{sockdir}/nsm.sock", forwarder=forwarder, default_lifetime=3.0)
        )
        await nursery.start(rpc.Server([lb]).serve_unix, f"{sockdir}/lb.sock")
        nsm = rpc.ReconnectingChannel(
            f"unix://{nsm_path}", name="nsm", backoff=rpc.Backoff(maximum=0.5)
        )
        await nursery.start(nsm.run)
        channel = await nsm.get()
        await registry_grpc.NetworkServiceRegistryStub(channel).Register(
            NetworkService(name=LB_SERVICE, payload="ETHERNET")
        )
        nse = NetworkServiceEndpoint(
            name="lb-a", network_service_names=[LB_SERVICE], url=f"unix://{sockdir}/lb.sock"
        )
        nse.expiration_time.seconds = int(time.time()) + 600
        await registry_grpc.NetworkServiceEndpointRegistryStub(channel).Register(nse)

        shutdown = Shutdown(5.0)
        connection = LbConnection(
            "lb-a",
            settings,
            nsm=nsm,
            addresses=FakeAddresses(),
            router=router_send,
            shutdown=shutdown,
        )
        with trio.fail_after(15):
            async with trio.open_nursery() as mesh:
                mesh.start_soon(connection.run)
                event = await router_receive.receive()
                assert isinstance(event, SetLoadBalancer)
                [wiring] = forwarder.wired.values()
                own = f"/proc/{os.getpid()}/fd/"
                assert wiring.client_netns.startswith(own), wiring.client_netns
                assert wiring.endpoint_netns.startswith(own), wiring.endpoint_netns
                assert same_file(wiring.client_netns, "/proc/thread-self/ns/net")
                first = wiring.client_netns
                assert channel.fds is not None and channel.fds.sent == 1
                # (the router hears of the LB just before the task keeps the answer)
                await eventually(lambda: connection.connection is not None, 5.0, 0.01)
                assert connection.connection is not None
                assert connection.connection.mechanism.parameters["inodeURL"] == (
                    "file:///proc/thread-self/ns/net"
                )
                while connection.requests < 2:  # a refresh: the same descriptor held
                    await router_receive.receive()
                [wiring] = forwarder.wired.values()
                assert wiring.client_netns == first
                assert channel.fds.sent == 2  # once per call (preference and connection alike)
                shutdown.begin()
                mesh.cancel_scope.cancel()
        assert channel.fds.sent == 3  # the Close passed it too
        assert len(lb.closes) == 1 and forwarder.wired == {}
        nursery.cancel_scope.cancel()


async def test_the_mesh_settles_once_the_load_balancers_listed_at_start_are_connected(
    sockdir: str,
) -> None:
    """The proxy stops adopting a previous instance's LB nexthops once every LB registered at
    start is connected again: here well before its fallback (one request timeout, 60 s)."""
    router_send, router_receive = trio.open_memory_channel[RouterEvent](100)
    settings = MeshSettings(
        name="proxy-a", service=LB_SERVICE, mtu=1500, request_timeout=60.0, max_backoff=0.5,
        default_lifetime=60.0,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nsm_path = await nursery.start(
            partial(serve_nsm, f"{sockdir}/nsm.sock", forwarder=NoKernel())
        )
        nsm = rpc.ReconnectingChannel(
            f"unix://{nsm_path}", name="nsm", backoff=rpc.Backoff(maximum=0.5)
        )
        await nursery.start(nsm.run)
        channel = await nsm.get()
        await registry_grpc.NetworkServiceRegistryStub(channel).Register(
            NetworkService(name=LB_SERVICE, payload="ETHERNET")
        )
        lbs = {name: Lb() for name in ("lb-a", "lb-b")}
        for name, servicer in lbs.items():
            await nursery.start(rpc.Server([servicer]).serve_unix, f"{sockdir}/{name}.sock")
            nse = NetworkServiceEndpoint(
                name=name, network_service_names=[LB_SERVICE], url=f"unix://{sockdir}/{name}.sock"
            )
            nse.expiration_time.seconds = int(time.time()) + 600
            await registry_grpc.NetworkServiceEndpointRegistryStub(channel).Register(nse)
        nursery.start_soon(_drain, router_receive)
        shutdown = Shutdown(5.0)
        events, inbox = trio.open_memory_channel[LbEvent](10)
        mesh = Mesh(
            settings, nsm=nsm, addresses=FakeAddresses(), router=router_send, shutdown=shutdown
        )
        discovery = Discovery(
            nsm, LB_SERVICE, events, token_lifetime=600.0, backoff=rpc.Backoff(maximum=0.5)
        )
        started = trio.current_time()
        with trio.fail_after(20):  # (far less than the fallback: it is the listing that counts)
            async with trio.open_nursery() as proxy:
                await proxy.start(mesh.run, inbox)
                await proxy.start(discovery.run)
                await mesh.settled.wait()
                assert all(lb.requests >= 1 for lb, _ in mesh.connections.values())
                assert set(mesh.connections) == {"lb-a", "lb-b"}
                print(f"\nsettled {trio.current_time() - started:.2f}s after start (2 LBs)")
                shutdown.begin()
                proxy.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def _drain(receive: trio.MemoryReceiveChannel[RouterEvent]) -> None:
    async for _ in receive:
        pass
