"""The lab NSM manager with the kernel forwarder: grpcio's Request wires a real veth pair between
two namespaces, with the IP context on each side; Close takes it away."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator

import grpc
import pytest
import trio
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message

from proxy import rpc
from proxy.api.networkservice import networkservice_grpc
from proxy.api.networkservice.connection_pb2 import Connection, Mechanism, PathSegment
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry import registry_grpc
from proxy.api.registry.registry_pb2 import NetworkService, NetworkServiceEndpoint
from proxy.lab.nsm.kernel import open_kernel_forwarder
from proxy.lab.nsm.server import serve_nsm
from proxy.nsm.path import server_hop
from tests.integration.netns import ip_json, namespaces

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]
SERVICE = "conduit-a.trench-a.red"


class FakeEndpoint(networkservice_grpc.NetworkServiceServicer):  # type: ignore[misc]
    """An NSE living in `netns`: it answers with its side's interface and the context."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.closed = 0

    async def Request(self, message: NetworkServiceRequest) -> Connection:
        hop = server_hop(message.connection, "lb-a")
        connection = hop.connection
        connection.mechanism.CopyFrom(
            Mechanism(
                cls="LOCAL",
                type="KERNEL",
                parameters={"name": "nse-eth0", "inodeURL": f"file:///run/netns/{self.netns}"},
            )
        )
        return hop.answer(connection)

    async def Close(self, message: Connection) -> Empty:
        self.closed += 1
        return Empty()


@pytest.fixture
async def socket_dir() -> AsyncIterator[str]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="mp-nsmk-")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def request(client_netns: str) -> NetworkServiceRequest:
    connection = Connection(id="proxy-a-conn", network_service=SERVICE)
    connection.path.path_segments.append(PathSegment(name="proxy-a", id="proxy-a-conn"))
    connection.context.MTU = 1400
    connection.context.ip_context.src_ip_addrs.extend(["198.18.7.2/24", "2001:db8:7::2/64"])
    connection.context.ip_context.dst_ip_addrs.extend(["198.18.7.3/24", "2001:db8:7::3/64"])
    mechanism = Mechanism(
        cls="LOCAL",
        type="KERNEL",
        parameters={"name": "nsc-eth0", "inodeURL": f"file:///run/netns/{client_netns}"},
    )
    return NetworkServiceRequest(connection=connection, mechanism_preferences=[mechanism])


def addresses(netns: str, ifname: str) -> set[str]:
    [link] = ip_json("addr", "show", ifname, netns=netns)
    return {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"] if a["scope"] == "global"}


async def test_a_request_wires_a_veth_pair_and_close_removes_it(socket_dir: str) -> None:
    with namespaces("nsc", "nse") as names:
        endpoint = FakeEndpoint(names["nse"])
        async with trio.open_nursery() as nursery, open_kernel_forwarder() as forwarder:
            await nursery.start(rpc.Server([endpoint]).serve_unix, f"{socket_dir}/nse.sock")
            nsm_path = await nursery.start(
                lambda task_status: serve_nsm(
                    f"{socket_dir}/nsm.sock", forwarder=forwarder, task_status=task_status
                )
            )
            async with rpc.open_channel(f"unix://{nsm_path}") as channel:
                await registry_grpc.NetworkServiceRegistryStub(channel).Register(
                    NetworkService(name=SERVICE, payload="ETHERNET")
                )
                nse = NetworkServiceEndpoint(
                    name="lb-a",
                    network_service_names=[SERVICE],
                    url=f"unix://{socket_dir}/nse.sock",
                )
                nse.expiration_time.seconds = 2**40
                await registry_grpc.NetworkServiceEndpointRegistryStub(channel).Register(nse)

            def call(method: str, message: Message, reply: type[Message]) -> object:
                with grpc.insecure_channel(f"unix://{nsm_path}") as grpc_channel:
                    stub = grpc_channel.unary_unary(
                        f"/networkservice.NetworkService/{method}",
                        request_serializer=lambda m: m.SerializeToString(),
                        response_deserializer=reply.FromString,
                    )
                    return stub(message, timeout=20)

            answer = await trio.to_thread.run_sync(
                call, "Request", request(names["nsc"]), Connection
            )
            assert isinstance(answer, Connection)
            assert answer.mechanism.parameters["name"] == "nsc-eth0"
            [client_end] = ip_json("link", "show", "nsc-eth0", netns=names["nsc"])
            [endpoint_end] = ip_json("link", "show", "nse-eth0", netns=names["nse"])
            assert client_end["mtu"] == endpoint_end["mtu"] == 1400
            assert addresses(names["nsc"], "nsc-eth0") == {"198.18.7.2/24", "2001:db8:7::2/64"}
            assert addresses(names["nse"], "nse-eth0") == {"198.18.7.3/24", "2001:db8:7::3/64"}

            await trio.to_thread.run_sync(call, "Close", answer, Empty)
            assert endpoint.closed == 1
            for netns in (names["nsc"], names["nse"]):
                assert [link["ifname"] for link in ip_json("link", "show", netns=netns)] == ["lo"]
            nursery.cancel_scope.cancel()
