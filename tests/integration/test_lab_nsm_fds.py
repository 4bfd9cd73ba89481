"""The lab NSM (`lab nsm`, a process, with the kernel forwarder) takes descriptors as nsmgr's
recvfd does: a client's and an endpoint's network namespace passed with their calls decide where
the veth pair goes, and an endpoint's socket passed with its Register is how it is dialled.

The clients and the endpoint run in this process, which is in the host's namespace: had the
manager gone by the peer's pid (SO_PEERCRED), both ends of the pair would be in the host's
namespace. The client's namespace here has no name and no path anywhere (made, opened, its name
deleted): only the descriptor can lead to it. The NSE's socket file is deleted once registered.
Figures (descriptors passed, the manager's descriptor counts) are printed: `pytest -s`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from typing import Any

import attrs
import grpc
import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism, PathSegment
from proxy.api.networkservice.networkservice_grpc import (
    NetworkServiceServicer,
    NetworkServiceStub,
)
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_grpc import (
    NetworkServiceEndpointRegistryStub,
    NetworkServiceRegistryStub,
)
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
)
from proxy.nsm.path import server_hop
from proxy.rpc import CallContext, Channel, Server, open_channel, server_stream
from tests.integration.lab_process import LabProcess, lab_process
from tests.integration.netns import ip, ip_json, namespaces
from tests.integration.waiting import eventually

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]

SERVICE = "conduit-a.trench-a.red"
NSE_IF, NSC_IF = "nse-eth0", "nsc-eth0"


# -- an endpoint that passes its namespace ---------------------------------------------------------


class PassingNse(NetworkServiceServicer):  # type: ignore[misc]
    """An NSE answering as the sdk's do, its namespace (`netns`, a file: not the namespace this
    process is in) passed back as a descriptor (sendfd server)."""

    def __init__(self, name: str, netns: str) -> None:
        self.name = name
        self.netns = netns
        self.requests = 0
        self.closes = 0

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        assert request.fds is not None
        hop = server_hop(message.connection, self.name)
        connection = hop.connection
        connection.mechanism.CopyFrom(
            Mechanism(
                cls="LOCAL",
                type="KERNEL",
                parameters={"name": NSE_IF, "inodeURL": request.fds.send_path(self.netns)},
            )
        )
        self.requests += 1
        return hop.answer(connection)

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        self.closes += 1
        return Empty()


class SilentNse(PassingNse):
    """An NSE whose answer names its namespace by a descriptor it never sends."""

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        hop = server_hop(message.connection, self.name)
        parameters = {"name": NSE_IF, "inodeURL": "inode://1/2"}
        hop.connection.mechanism.CopyFrom(
            Mechanism(cls="LOCAL", type="KERNEL", parameters=parameters)
        )
        self.requests += 1
        return hop.answer(hop.connection)


# -- the lab NSM as a process ----------------------------------------------------------------------


@attrs.define
class Nsm:
    process: LabProcess
    path: str

    @property
    def pid(self) -> int:
        return int(self.process.process.pid)

    @property
    def log(self) -> str:
        return self.process.output.decode(errors="replace")

    def fds(self) -> int:
        """How many descriptors the NSM process has open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))


@asynccontextmanager
async def lab_nsm(sockdir: str, *options: str) -> AsyncIterator[Nsm]:
    """`lab nsm` with the kernel forwarder on `<sockdir>/nsm.sock`; its output read all along
    (a full pipe would stop it)."""
    path = f"{sockdir}/nsm.sock"
    args = ["nsm", "--listen", f"unix://{path}", *options]
    async with (
        lab_process(args, b"serving service=nsm") as process,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_drain, process)
        yield Nsm(process, path)
        nursery.cancel_scope.cancel()


async def _drain(process: LabProcess) -> None:
    assert process.process.stdout is not None
    while chunk := await process.process.stdout.receive_some():
        process.output += chunk


async def settled_fds(nsm: Nsm, within: float = 5.0) -> int:
    """The NSM's descriptor count once it stops changing (connections take a moment to go)."""
    last, stable_since = nsm.fds(), trio.current_time()
    deadline = trio.current_time() + within
    while trio.current_time() - stable_since < 0.5 and trio.current_time() < deadline:
        await trio.sleep(0.05)
        now = nsm.fds()
        if now != last:
            last, stable_since = now, trio.current_time()
    return last


@asynccontextmanager
async def serving_nse(path: str, nse: PassingNse) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(Server([nse]).serve_unix, path)
        yield
        nursery.cancel_scope.cancel()


async def register_by_descriptor(nsm: Nsm, name: str, socket_path: str) -> str:
    """Register the NSE `name` as the sdk's sendfd client does (its socket passed, the url
    naming it inode://); the url sent."""
    async with open_channel(f"unix://{nsm.path}") as channel:
        assert channel.fds is not None
        await NetworkServiceRegistryStub(channel).Register(
            NetworkService(name=SERVICE, payload="ETHERNET")
        )
        url = channel.fds.send_url(f"unix://{socket_path}")
        nse = NetworkServiceEndpoint(name=name, network_service_names=[SERVICE], url=url)
        nse.expiration_time.seconds = int(time.time()) + 3600
        with trio.fail_after(10):
            answer = await NetworkServiceEndpointRegistryStub(channel).Register(nse)
        assert answer.url == url  # as recvfd answers: what was sent, for the sender to map back
    return url


async def unregister(nsm: Nsm, name: str, socket_path: str | None) -> None:
    """Unregister `name`, passing its socket as the sdk does (when there is still a file)."""
    async with open_channel(f"unix://{nsm.path}") as channel:
        assert channel.fds is not None
        nse = NetworkServiceEndpoint(name=name)
        if socket_path is not None:
            nse.url = channel.fds.send_url(f"unix://{socket_path}")
        with trio.fail_after(10):
            await NetworkServiceEndpointRegistryStub(channel).Unregister(nse)


async def registered_url(nsm: Nsm, name: str) -> str:
    query = NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint(name=name))
    async with open_channel(f"unix://{nsm.path}") as channel:
        stub = NetworkServiceEndpointRegistryStub(channel)
        async with server_stream(stub.Find, query) as answers:
            [found] = [answer.network_service_endpoint async for answer in answers]
    return str(found.url)


def client_request(conn_id: str, inode_url: str) -> NetworkServiceRequest:
    connection = Connection(id=conn_id, network_service=SERVICE)
    connection.path.path_segments.append(PathSegment(name="nsc", id=conn_id))
    connection.context.ip_context.src_ip_addrs.append("198.18.9.2/24")
    connection.context.ip_context.dst_ip_addrs.append("198.18.9.3/24")
    mechanism = Mechanism(
        cls="LOCAL", type="KERNEL", parameters={"name": NSC_IF, "inodeURL": inode_url}
    )
    return NetworkServiceRequest(connection=connection, mechanism_preferences=[mechanism])


async def request(channel: Channel, message: NetworkServiceRequest) -> Connection:
    with trio.fail_after(15):
        answer: Connection = await NetworkServiceStub(channel).Request(message)
    return answer


async def close(channel: Channel, connection: Connection) -> None:
    with trio.fail_after(15):
        await NetworkServiceStub(channel).Close(connection)


# -- namespaces ------------------------------------------------------------------------------------


@contextmanager
def nameless_namespace() -> Iterator[int]:
    """A network namespace that no path names: made with `ip netns add`, opened, its name
    deleted at once. The descriptor (closed afterwards) is all that keeps and reaches it."""
    name = f"mp-anon-{secrets.token_hex(3)}"
    ip("netns", "add", name)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        ip("netns", "del", name, check=False)
    try:
        yield fd
    finally:
        os.close(fd)


def links_through(fd: int) -> dict[str, int]:
    """The interfaces (name: index) of the namespace our descriptor `fd` refers to."""
    result = subprocess.run(
        ["nsenter", f"--net=/proc/{os.getpid()}/fd/{fd}", "ip", "-j", "link"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return {link["ifname"]: link["ifindex"] for link in json.loads(result.stdout)}


def links_in(netns: str) -> set[str]:
    return {link["ifname"] for link in ip_json("link", "show", netns=netns)}


def host_links() -> set[str]:
    """The interfaces of this process's namespace (the one its pid would point the manager at)."""
    return {name for _, name in socket.if_nameindex()}


# -- the tests -------------------------------------------------------------------------------------


async def test_passed_descriptors_decide_the_namespaces_and_reach_the_endpoint(
    sockdir: str,
) -> None:
    with namespaces("nse") as names, nameless_namespace() as client_ns:
        nse_netns = f"/run/netns/{names['nse']}"
        nse = PassingNse("nse-a", nse_netns)
        socket_path = f"{sockdir}/nse.sock"
        async with serving_nse(socket_path, nse), lab_nsm(sockdir) as nsm:
            sent = await register_by_descriptor(nsm, "nse-a", socket_path)
            # The manager holds the socket: the file it was registered from is gone now.
            os.unlink(socket_path)
            published = await registered_url(nsm, "nse-a")
            assert published.startswith(f"unix:///proc/{nsm.pid}/fd/"), published

            async with open_channel(f"unix://{nsm.path}") as channel:
                assert channel.fds is not None
                inode_url = channel.fds.send_fd(client_ns)
                answer = await request(channel, client_request("nsc-1", inode_url))
            assert nse.requests == 1
            assert answer.mechanism.parameters["inodeURL"] == inode_url  # (mapped back by us)
            client_links = links_through(client_ns)
            assert NSC_IF in client_links
            assert NSE_IF in links_in(names["nse"])
            assert not {NSC_IF, NSE_IF} & host_links()  # where the pids would have put them
            [established] = [line for line in nsm.log.splitlines() if "established" in line]
            assert f"client_ns=/proc/{nsm.pid}/fd/" in established
            assert f"endpoint_ns=/proc/{nsm.pid}/fd/" in established

            # A refresh on another connection passes the same namespace again: the manager
            # keeps the one it holds, and with it the pair (same interface index).
            refresh = NetworkServiceRequest(connection=answer)
            async with open_channel(f"unix://{nsm.path}") as channel:
                assert channel.fds is not None
                refresh.connection.mechanism.parameters["inodeURL"] = channel.fds.send_fd(client_ns)
                again = await request(channel, refresh)
                assert again.path.path_segments[1].id == answer.path.path_segments[1].id
                assert links_through(client_ns)[NSC_IF] == client_links[NSC_IF]
                await close(channel, again)
            assert nse.closes == 1
            assert NSC_IF not in links_through(client_ns)
            assert links_in(names["nse"]) == {"lo"}
            await unregister(nsm, "nse-a", None)
    print(
        f"\nnamespaces by descriptor: the client's (nameless) and the endpoint's ({nse_netns});"
        f" the endpoint registered as {sent}, published as {published}"
    )


async def test_the_manager_keeps_no_descriptor_after_its_connections_and_registrations(
    sockdir: str,
) -> None:
    cycles, registrations = 40, 10
    with namespaces("nsc", "nse") as names:
        nse = PassingNse("nse-a", f"/run/netns/{names['nse']}")
        other = PassingNse("nse-b", f"/run/netns/{names['nse']}")
        async with (
            serving_nse(f"{sockdir}/nse-a.sock", nse),
            serving_nse(f"{sockdir}/nse-b.sock", other),
            lab_nsm(sockdir, "--lifetime", "3s") as nsm,
        ):
            await register_by_descriptor(nsm, "nse-a", f"{sockdir}/nse-a.sock")
            before = await settled_fds(nsm)
            peak = before
            for cycle in range(cycles):  # a target coming and going, each on its own connection
                async with open_channel(f"unix://{nsm.path}") as channel:
                    assert channel.fds is not None
                    url = channel.fds.send_path(f"/run/netns/{names['nsc']}")
                    answer = await request(channel, client_request(f"nsc-{cycle}", url))
                    peak = max(peak, nsm.fds())
                    await close(channel, answer)
            for _ in range(registrations):  # an endpoint coming and going
                await register_by_descriptor(nsm, "nse-b", f"{sockdir}/nse-b.sock")
                await unregister(nsm, "nse-b", f"{sockdir}/nse-b.sock")
            after_closes = await settled_fds(nsm)
            assert nse.requests == nse.closes == cycles
            assert links_in(names["nsc"]) == {"lo"}

            # One left to expire (no refresh, no Close): its descriptors go with it.
            async with open_channel(f"unix://{nsm.path}") as channel:
                assert channel.fds is not None
                url = channel.fds.send_path(f"/run/netns/{names['nsc']}")
                await request(channel, client_request("nsc-expiring", url))
            held = await settled_fds(nsm)
            await eventually(lambda: nse.closes == cycles + 1, within=15.0, interval=0.1)
            after_expiry = await settled_fds(nsm)
            assert links_in(names["nsc"]) == {"lo"}
    passed = 2 * (cycles + 1) + 2 * registrations + 1
    print(
        f"\n{passed} descriptors passed to the NSM ({cycles} connect/close cycles, each a client"
        f" and an endpoint namespace; {registrations} registrations of an endpoint socket, and"
        f" their unregistrations); its open descriptors: {before} before, at most {peak} during,"
        f" {after_closes} after; {held} with a connection left to expire, {after_expiry} after"
        " it expired"
    )
    assert after_closes == before, (before, after_closes)
    assert held == before + 2  # the connection's two namespaces
    assert after_expiry == before, (before, after_expiry)


async def test_a_descriptor_that_never_comes_is_a_deadline_and_nothing_is_wired(
    sockdir: str,
) -> None:
    """grpcio cannot pass descriptors: its `inode://` URLs name ones that never come. The
    manager waits within the call's deadline, says why in its log, and wires nothing; the
    registry stores nothing."""
    with namespaces("nse") as names:
        nse = PassingNse("nse-a", f"/run/netns/{names['nse']}")
        async with serving_nse(f"{sockdir}/nse.sock", nse), lab_nsm(sockdir) as nsm:
            await register_by_descriptor(nsm, "nse-a", f"{sockdir}/nse.sock")

            def call(method: str, message: Any, reply: Any) -> grpc.StatusCode:
                with grpc.insecure_channel(f"unix://{nsm.path}") as channel:
                    stub = channel.unary_unary(
                        method,
                        request_serializer=type(message).SerializeToString,
                        response_deserializer=reply.FromString,
                    )
                    with pytest.raises(grpc.RpcError) as failure:
                        stub(message, timeout=2)
                    return failure.value.code()

            started = time.monotonic()
            code = await trio.to_thread.run_sync(
                partial(
                    call,
                    "/networkservice.NetworkService/Request",
                    client_request("nsc-1", "inode://1/2"),
                    Connection,
                )
            )
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 5
            assert nse.requests == 0  # the client's namespace first: the endpoint not asked

            bogus = NetworkServiceEndpoint(
                name="nse-x", network_service_names=[SERVICE], url="inode://1/3"
            )
            code = await trio.to_thread.run_sync(
                partial(
                    call,
                    "/registry.NetworkServiceEndpointRegistry/Register",
                    bogus,
                    NetworkServiceEndpoint,
                )
            )
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            query = NetworkServiceEndpointQuery(
                network_service_endpoint=NetworkServiceEndpoint(name="nse-x")
            )
            async with open_channel(f"unix://{nsm.path}") as channel:
                stub = NetworkServiceEndpointRegistryStub(channel)
                async with server_stream(stub.Find, query) as answers:
                    assert [a async for a in answers] == []
            await eventually(
                lambda: nsm.log.count("descriptor never came") >= 2,
                within=5.0,
                interval=0.05,
            )


async def test_an_endpoint_whose_namespace_never_comes_is_closed_again(sockdir: str) -> None:
    """The NSE answered (it holds a connection now) but its namespace never arrives: the
    Request fails at the deadline, and the NSE is told with a Close at once rather than left
    with a connection nobody refreshes."""
    with namespaces("nse") as names, nameless_namespace() as client_ns:
        nse = SilentNse("nse-a", f"/run/netns/{names['nse']}")
        socket_path = f"{sockdir}/nse.sock"
        async with serving_nse(socket_path, nse), lab_nsm(sockdir) as nsm:
            await register_by_descriptor(nsm, "nse-a", socket_path)
            async with open_channel(f"unix://{nsm.path}") as channel:
                assert channel.fds is not None
                message = client_request("nsc-1", channel.fds.send_fd(client_ns))
                with pytest.raises(trio.TooSlowError), trio.fail_after(2):  # sent as grpc-timeout
                    await NetworkServiceStub(channel).Request(message)
            assert nse.requests == 1
            await eventually(lambda: nse.closes == 1, within=5.0, interval=0.05)
            assert "endpoint connection closed again" in nsm.log
            assert NSC_IF not in links_through(client_ns)
            assert links_in(names["nse"]) == {"lo"}
            await unregister(nsm, "nse-a", None)
