"""The lab NSM manager over the wire: grpcio is the client, fake NSEs (written with
`proxy.rpc.Server`, NSM's updatepath on their side) answer, `NoKernel` records the wiring.

Everything runs in this trio run except the CLI test (a subprocess); grpcio calls run in
threads. Expiry is driven with `trio.testing.MockClock` (rate 1, plus jumps).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import grpc
import pytest
import trio
import trio.testing
from google.protobuf.empty_pb2 import Empty

from proxy.api.networkservice.connection_pb2 import (
    DELETE,
    INITIAL_STATE_TRANSFER,
    RESELECT_REQUESTED,
    UPDATE,
    Connection,
    ConnectionEvent,
    Mechanism,
    MonitorScopeSelector,
    PathSegment,
)
from proxy.api.networkservice.connectioncontext_pb2 import IPContext
from proxy.api.networkservice.networkservice_grpc import NetworkServiceServicer
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    NetworkServiceLabels,
)
from proxy.lab.nsm.forwarding import NoKernel, Wiring
from proxy.lab.nsm.server import serve_nsm
from proxy.nsm.wire import seconds
from proxy.rpc import CallContext, Server, open_channel
from tests.integration.grpcio_stream import pumped
from tests.integration.lab_process import lab_process
from tests.integration.waiting import eventually

pytestmark = pytest.mark.timeout(30)

SERVICE = "proxy.conduit-a.trench-a.default"
NS_API = "/networkservice.NetworkService"
MONITOR = "/connection.MonitorConnection/MonitorConnections"
NSE_REGISTRY = "/registry.NetworkServiceEndpointRegistry"
NS_REGISTRY = "/registry.NetworkServiceRegistry"
OWN_NETNS = f"/proc/{os.getpid()}/ns/net"


# -- a fake NSE -----------------------------------------------------------------------------------


class FakeNse(NetworkServiceServicer):  # type: ignore[misc]
    """Answers as an NSE behind NSM's updatepath: appends (or finds) its own segment, picks the
    first KERNEL preference (or keeps the connection's mechanism), names its interface, echoes
    the IP context, restores the caller's id and index; counts Requests and Closes."""

    def __init__(self, name: str, *, ifname: str = "nse-if0", inode_url: str = "") -> None:
        self.name = name
        self.ifname = ifname
        self.inode_url = inode_url
        self.requests: list[NetworkServiceRequest] = []
        self.closes: list[Connection] = []
        self.gate: trio.Event | None = None  # when set, Requests wait for it

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        self.requests.append(message)
        if self.gate is not None:
            await self.gate.wait()
        connection = Connection()
        connection.CopyFrom(message.connection)
        path = connection.path
        index = path.index
        assert path.path_segments[index].id == connection.id, "updatepath: id mismatch"
        if len(path.path_segments) == index + 1:
            path.path_segments.add(name=self.name, id=str(uuid.uuid4()))
        elif path.path_segments[index + 1].name != self.name:
            path.path_segments[index + 1].name = self.name
            path.path_segments[index + 1].id = str(uuid.uuid4())
        if not connection.HasField("mechanism"):
            chosen = next(m for m in message.mechanism_preferences if m.type == "KERNEL")
            connection.mechanism.CopyFrom(chosen)
        connection.mechanism.parameters.setdefault("name", self.ifname)
        if self.inode_url:
            connection.mechanism.parameters["inodeURL"] = self.inode_url
        connection.id = path.path_segments[index].id
        return connection

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        self.closes.append(message)
        return Empty()


# -- the lab --------------------------------------------------------------------------------------


class Lab:
    def __init__(self, workdir: str, nursery: trio.Nursery, forwarder: Any) -> None:
        self.workdir = workdir
        self.nursery = nursery
        self.forwarder = forwarder
        self.path = f"{workdir}/nsm.sock"
        self.channel: grpc.Channel = None

    async def unary(self, method: str, request: Any, response_type: Any) -> Any:
        call = self.channel.unary_unary(
            method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return await trio.to_thread.run_sync(partial(call, request, timeout=10))

    async def register_service(self, service: NetworkService | None = None) -> None:
        await self.unary(
            f"{NS_REGISTRY}/Register",
            service or NetworkService(name=SERVICE, payload="ETHERNET"),
            NetworkService,
        )

    async def register_nse(
        self, name: str, url: str, *, node: str = "node-a", services: tuple[str, ...] = (SERVICE,)
    ) -> None:
        nse = NetworkServiceEndpoint(
            name=name,
            network_service_names=services,
            network_service_labels={
                service: NetworkServiceLabels(labels={"nodeName": node}) for service in services
            },
            url=url,
        )
        await self.unary(f"{NSE_REGISTRY}/Register", nse, NetworkServiceEndpoint)

    async def add_nse(self, name: str, *, node: str = "node-a", **options: Any) -> FakeNse:
        nse = FakeNse(name, **options)
        socket = f"{self.workdir}/{name}.sock"
        await self.nursery.start(Server([nse]).serve_unix, socket)
        await self.register_nse(name, f"unix://{socket}", node=node)
        return nse

    async def request(self, request: NetworkServiceRequest) -> Connection:
        answer: Connection = await self.unary(f"{NS_API}/Request", request, Connection)
        return answer

    async def close(self, connection: Connection) -> None:
        await self.unary(f"{NS_API}/Close", connection, Empty)

    @property
    def wired(self) -> dict[str, Wiring]:
        return dict(self.forwarder.wired)


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="nsmm-")  # short: sockets live here
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def running_lab(
    workdir: str, forwarder: Any = None, service: NetworkService | None = None, **options: Any
) -> AsyncIterator[Lab]:
    """`serve_nsm` (NoKernel unless told) with the network service registered."""
    async with trio.open_nursery() as nursery:
        lab = Lab(workdir, nursery, forwarder if forwarder is not None else NoKernel())
        await nursery.start(partial(serve_nsm, lab.path, forwarder=lab.forwarder, **options))
        lab.channel = grpc.insecure_channel(f"unix://{lab.path}")
        try:
            await lab.register_service(service)
            yield lab
        finally:
            lab.channel.close()
            nursery.cancel_scope.cancel()


def new_request(
    conn_id: str = "target-a-0",
    *,
    client: str = "target-a",
    service: str = SERVICE,
    labels: dict[str, str] | None = None,
    nse: str = "",
    **parameters: str,
) -> NetworkServiceRequest:
    connection = Connection(
        id=conn_id,
        network_service=service,
        labels=labels or {},
        network_service_endpoint_name=nse,
        payload="ETHERNET",
    )
    connection.path.path_segments.add(name=client, id=conn_id)
    connection.context.ip_context.CopyFrom(
        IPContext(src_ip_addrs=["198.18.0.2/30"], dst_ip_addrs=["198.18.0.1/30"])
    )
    return NetworkServiceRequest(
        connection=connection,
        mechanism_preferences=[Mechanism(cls="LOCAL", type="KERNEL", parameters=parameters)],
    )


def refresh_of(answer: Connection, **changes: Any) -> NetworkServiceRequest:
    """What a client sends to refresh: the connection it got back."""
    connection = Connection()
    connection.CopyFrom(answer)
    for field, value in changes.items():
        setattr(connection, field, value)
    return NetworkServiceRequest(
        connection=connection, mechanism_preferences=[Mechanism(cls="LOCAL", type="KERNEL")]
    )


def manager_id(answer: Connection) -> str:
    return answer.path.path_segments[1].id


async def rpc_error(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        await call
    return failure.value


@asynccontextmanager
async def monitor(
    lab: Lab, selector: MonitorScopeSelector
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    call = lab.channel.unary_stream(
        MONITOR,
        request_serializer=MonitorScopeSelector.SerializeToString,
        response_deserializer=ConnectionEvent.FromString,
    )
    stream = call(selector)  # no grpcio deadline: tests may jump the mock clock
    async with pumped(stream) as events:
        yield events


async def next_event(events: trio.MemoryReceiveChannel[Any]) -> ConnectionEvent:
    with trio.fail_after(5):
        event = await events.receive()
    assert isinstance(event, ConnectionEvent), event
    return event


async def no_event(events: trio.MemoryReceiveChannel[Any], during: float = 0.3) -> None:
    with trio.move_on_after(during):
        event = await events.receive()
        pytest.fail(f"unexpected event: {event}")


# -- Request --------------------------------------------------------------------------------------


async def test_a_request_reaches_the_endpoint_and_is_wired(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        nse = await lab.add_nse("nse-a")
        sent = new_request()
        answer = await lab.request(sent)

        assert answer.id == "target-a-0" and answer.path.index == 0
        segments = answer.path.path_segments
        assert [segment.name for segment in segments] == ["target-a", "nsmgr-lab", "nse-a"]
        assert segments[0].id == "target-a-0"
        assert uuid.UUID(segments[1].id).version == 4
        assert abs(seconds(segments[1].expires) - (time.time() + 60)) < 5
        assert answer.network_service_endpoint_name == "nse-a"
        assert answer.context.ip_context == sent.connection.context.ip_context

        (forwarded,) = nse.requests
        assert forwarded.connection.path.index == 1
        assert forwarded.connection.id == segments[1].id
        assert len(forwarded.connection.path.path_segments) == 2
        assert [(m.cls, m.type) for m in forwarded.mechanism_preferences] == [("LOCAL", "KERNEL")]

        wiring = lab.wired[segments[1].id]
        assert (answer.mechanism.cls, answer.mechanism.type) == ("LOCAL", "KERNEL")
        assert answer.mechanism.parameters["name"] == wiring.client_ifname
        assert len(wiring.client_ifname) == 15 and wiring.client_ifname.startswith("proxy.cond-")
        assert wiring == Wiring(
            connection_id=segments[1].id,
            client_netns=OWN_NETNS,  # the grpcio client: this process
            client_ifname=wiring.client_ifname,
            endpoint_netns=OWN_NETNS,  # the fake NSE's socket: this process too
            endpoint_ifname="nse-if0",
            mtu=1500,
            ip_context=sent.connection.context.ip_context,
        )


async def test_interface_names_and_namespaces_from_the_mechanisms(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        await lab.add_nse("nse-a", ifname="lb-side", inode_url="file:///proc/self/ns/net")
        sent = new_request(name="tgt-if0", inodeURL="file:///run/netns/mp-target")
        sent.connection.context.MTU = 9000
        answer = await lab.request(sent)
        wiring = lab.wired[manager_id(answer)]
        assert (wiring.client_ifname, wiring.client_netns) == ("tgt-if0", "/run/netns/mp-target")
        assert (wiring.endpoint_ifname, wiring.endpoint_netns) == ("lb-side", OWN_NETNS)
        assert wiring.mtu == 9000
        assert answer.mechanism.parameters["name"] == "tgt-if0"
        assert answer.mechanism.parameters["inodeURL"] == "file:///run/netns/mp-target"


async def test_a_refresh_goes_to_the_same_endpoint_and_keeps_the_names(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        nse_b = await lab.add_nse("nse-b")
        answer = await lab.request(new_request())
        assert answer.network_service_endpoint_name == "nse-b"
        nse_a = await lab.add_nse("nse-a")  # a fresh selection would now pick nse-a

        again = await lab.request(refresh_of(answer))
        assert (len(nse_b.requests), len(nse_a.requests)) == (2, 0)
        assert again.path == answer.path or [s.id for s in again.path.path_segments] == [
            s.id for s in answer.path.path_segments
        ]
        refreshed = nse_b.requests[1].connection
        assert refreshed.path.path_segments[2].id == answer.path.path_segments[2].id
        assert refreshed.mechanism.parameters["name"] == "nse-if0"  # its side kept
        assert list(lab.wired) == [manager_id(answer)]
        assert again.mechanism.parameters["name"] == answer.mechanism.parameters["name"]

        other = await lab.request(new_request("target-b-0", client="target-b"))
        assert other.network_service_endpoint_name == "nse-a"
        assert sorted(lab.wired) == sorted([manager_id(answer), manager_id(other)])


async def test_reselect_and_a_vanished_endpoint_select_again(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        nse_b = await lab.add_nse("nse-b")
        answer = await lab.request(new_request())
        nse_a = await lab.add_nse("nse-a")

        # As NSM's heal does: reselect, the endpoint name cleared.
        reselect = refresh_of(answer, state=RESELECT_REQUESTED, network_service_endpoint_name="")
        reselected = await lab.request(reselect)
        assert reselected.network_service_endpoint_name == "nse-a"
        assert len(nse_b.closes) == 1 and len(nse_a.requests) == 1
        assert manager_id(reselected) == manager_id(answer)
        assert list(lab.wired) == [manager_id(answer)]

        await lab.unary(f"{NSE_REGISTRY}/Unregister", NetworkServiceEndpoint(name="nse-a"), Empty)
        failure = await rpc_error(lab.request(refresh_of(reselected)))  # still names nse-a
        assert failure.code() == grpc.StatusCode.NOT_FOUND and "nse-a" in failure.details()
        assert len(nse_a.closes) == 1 and lab.wired == {}  # torn down: its endpoint is gone

        moved = await lab.request(refresh_of(reselected, network_service_endpoint_name=""))
        assert moved.network_service_endpoint_name == "nse-b"
        assert manager_id(moved) == manager_id(answer) and list(lab.wired) == [manager_id(moved)]


async def test_labels_select_the_endpoint_on_the_same_node(workdir: str) -> None:
    service = NetworkService(name=SERVICE, payload="ETHERNET")
    service.matches.add(source_selector={"nodeName": "{{.nodeName}}"}).routes.add(
        destination_selector={"nodeName": "{{.nodeName}}"}
    )
    async with running_lab(workdir, service=service) as lab:
        await lab.add_nse("nse-a", node="node-a")
        nse_b = await lab.add_nse("nse-b", node="node-b")
        answer = await lab.request(new_request(labels={"nodeName": "node-b"}))
        assert answer.network_service_endpoint_name == "nse-b" and len(nse_b.requests) == 1

        failure = await rpc_error(
            lab.request(new_request("target-c-0", labels={"nodeName": "node-c"}))
        )
        assert failure.code() == grpc.StatusCode.NOT_FOUND
        assert "nodeName=node-c" in failure.details()

        unlabelled = await lab.request(new_request("target-d-0"))  # no match applies: any
        assert unlabelled.network_service_endpoint_name == "nse-a"


async def test_a_named_endpoint_is_used_or_not_found(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        await lab.add_nse("nse-a")
        nse_b = await lab.add_nse("nse-b")
        answer = await lab.request(new_request(nse="nse-b"))
        assert answer.network_service_endpoint_name == "nse-b" and len(nse_b.requests) == 1

        failure = await rpc_error(lab.request(new_request("x-0", nse="nse-z")))
        assert failure.code() == grpc.StatusCode.NOT_FOUND and "nse-z" in failure.details()

        await lab.register_nse("nse-other", "unix:///tmp/none.sock", services=("other",))
        failure = await rpc_error(lab.request(new_request("x-1", nse="nse-other")))
        assert failure.code() == grpc.StatusCode.NOT_FOUND and "does not offer" in failure.details()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no connection", "no connection"),
        ("no service", "network_service is empty"),
        ("no mechanism", "no mechanism"),
        ("noop only", "KERNEL only"),
        ("unknown service", "unknown network service"),
        ("bad path", "path.index"),
        ("bad interface name", "not a valid interface name"),
    ],
)
async def test_bad_requests_are_invalid_argument(workdir: str, change: str, message: str) -> None:
    request = new_request()
    if change == "no connection":
        request.ClearField("connection")
    elif change == "no service":
        request.connection.network_service = ""
    elif change == "no mechanism":
        del request.mechanism_preferences[:]
    elif change == "noop only":
        request.mechanism_preferences[0].type = "NOOP"
    elif change == "unknown service":
        request.connection.network_service = "nobody"
    elif change == "bad path":
        request.connection.path.index = 3
    else:
        request.mechanism_preferences[0].parameters["name"] = "much-too-long-name"
    async with running_lab(workdir) as lab:
        nse = await lab.add_nse("nse-a")
        failure = await rpc_error(lab.request(request))
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in failure.details()
        assert nse.requests == [] and lab.wired == {}


# -- Close, expiry --------------------------------------------------------------------------------


async def test_close_is_forwarded_and_disconnected_and_idempotent(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        nse = await lab.add_nse("nse-a")
        answer = await lab.request(new_request())
        await lab.close(answer)
        (closed,) = nse.closes
        assert closed.id == manager_id(answer) and closed.path.index == 1
        assert closed.mechanism.parameters["name"] == "nse-if0"  # the NSE's side
        assert lab.wired == {}

        await lab.close(answer)  # again: nothing to do
        unknown = new_request("never-seen").connection
        await lab.close(unknown)
        assert len(nse.closes) == 1


async def test_a_close_waits_for_the_request_in_flight(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        nse = await lab.add_nse("nse-a")
        first = await lab.request(new_request())
        nse.gate = trio.Event()
        order: list[str] = []

        async def refresh() -> None:
            await lab.request(refresh_of(first))
            order.append("refreshed")

        async def close() -> None:
            await lab.close(first)
            order.append("closed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh)
            await eventually(lambda: len(nse.requests) == 2, within=5.0, interval=0.01)
            nursery.start_soon(close)
            await trio.sleep(0.3)
            assert order == [] and nse.closes == []  # the Close waits its turn
            nse.gate.set()
        assert sorted(order) == ["closed", "refreshed"]
        # Had the Close overtaken the refresh, the refresh would have wired the pair again.
        assert len(nse.closes) == 1 and lab.wired == {}


async def test_a_connection_not_refreshed_expires_on_both_sides(
    workdir: str, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    async with running_lab(workdir) as lab:
        nse = await lab.add_nse("nse-a")
        answer = await lab.request(new_request())
        async with monitor(lab, MonitorScopeSelector()) as events:
            assert (await next_event(events)).type == INITIAL_STATE_TRANSFER
            mock_clock.jump(40)
            answer = await lab.request(refresh_of(answer))  # now expires at 40 + 60
            assert (await next_event(events)).type == UPDATE
            mock_clock.jump(40)
            await no_event(events)
            assert nse.closes == [] and len(lab.wired) == 1
            mock_clock.jump(25)
            event = await next_event(events)
            assert event.type == DELETE and list(event.connections) == [manager_id(answer)]
        await eventually(lambda: len(nse.closes) == 1, within=5.0, interval=0.01)
        assert nse.closes[0].id == manager_id(answer)
        assert lab.wired == {}


# -- MonitorConnections ---------------------------------------------------------------------------


async def test_monitor_sends_the_initial_state_then_updates_and_deletes_it_selects(
    workdir: str,
) -> None:
    async with running_lab(workdir) as lab:
        await lab.add_nse("nse-a")
        only_a = MonitorScopeSelector(path_segments=[PathSegment(name="target-a")])
        async with monitor(lab, only_a) as events:
            initial = await next_event(events)
            assert initial.type == INITIAL_STATE_TRANSFER and not initial.connections

            a = await lab.request(new_request("target-a-0", client="target-a"))
            event = await next_event(events)
            assert event.type == UPDATE and list(event.connections) == [manager_id(a)]
            seen = event.connections[manager_id(a)]
            assert seen.path.index == 1 and seen.id == manager_id(a)
            assert seen.path.path_segments[0].id == "target-a-0"
            assert seen.mechanism.type == "KERNEL"  # what the proxy's recovery checks

            b = await lab.request(new_request("target-b-0", client="target-b"))
            await no_event(events)
            await lab.request(refresh_of(a))
            assert (await next_event(events)).type == UPDATE

            everything = MonitorScopeSelector()
            by_id = MonitorScopeSelector(path_segments=[PathSegment(id="target-b-0")])
            run = MonitorScopeSelector(
                path_segments=[PathSegment(name="nsmgr-lab"), PathSegment(name="nse-a")]
            )
            broken_run = MonitorScopeSelector(
                path_segments=[PathSegment(name="target-a"), PathSegment(name="nse-a")]
            )
            other_service = MonitorScopeSelector(network_services=["other"])
            expected = {
                "everything": (everything, {manager_id(a), manager_id(b)}),
                "by id": (by_id, {manager_id(b)}),
                "run": (run, {manager_id(a), manager_id(b)}),
                "broken run": (broken_run, set()),
                "other service": (other_service, set()),
            }
            for name, (selector, ids) in expected.items():
                async with monitor(lab, selector) as others:
                    assert set((await next_event(others)).connections) == ids, name

            await lab.close(b)
            await no_event(events)
            await lab.close(a)
            event = await next_event(events)
            assert event.type == DELETE and list(event.connections) == [manager_id(a)]


# -- failures -------------------------------------------------------------------------------------


async def test_an_unreachable_endpoint_is_unavailable_to_the_client(workdir: str) -> None:
    async with running_lab(workdir) as lab:
        await lab.register_nse("nse-gone", f"unix://{workdir}/gone.sock")
        failure = await rpc_error(lab.request(new_request()))
        assert failure.code() == grpc.StatusCode.UNAVAILABLE
        assert "nse-gone" in failure.details() and "unreachable" in failure.details()
        assert lab.wired == {}


class BrokenForwarder(NoKernel):
    def __init__(self) -> None:
        super().__init__()
        self.disconnected: list[str] = []

    async def connect(self, wiring: Wiring) -> None:
        raise RuntimeError("no veth today")

    async def disconnect(self, connection_id: str) -> None:
        self.disconnected.append(connection_id)


async def test_a_forwarder_failure_closes_the_endpoint_side_and_fails_the_request(
    workdir: str,
) -> None:
    forwarder = BrokenForwarder()
    async with running_lab(workdir, forwarder=forwarder) as lab:
        nse = await lab.add_nse("nse-a")
        async with monitor(lab, MonitorScopeSelector()) as events:
            await next_event(events)
            failure = await rpc_error(lab.request(new_request()))
            assert failure.code() == grpc.StatusCode.INTERNAL
            assert "no veth today" in failure.details()
            (requested,) = nse.requests
            (closed,) = nse.closes
            assert closed.id == requested.connection.id
            assert forwarder.disconnected == [requested.connection.id]
            await no_event(events)


async def test_a_client_channel_knows_the_server_process(workdir: str) -> None:
    """proxy.rpc's client side reads SO_PEERCRED too: how the manager finds an NSE's netns."""
    async with trio.open_nursery() as nursery:
        socket = f"{workdir}/server.sock"
        await nursery.start(Server([FakeNse("x")]).serve_unix, socket)
        async with open_channel(f"unix://{socket}") as channel:
            peer = channel.connection.peer
            assert (peer.pid, peer.uid, peer.address) == (
                os.getpid(),
                os.getuid(),
                f"unix://{socket}",
            )
        nursery.cancel_scope.cancel()


# -- the command line -----------------------------------------------------------------------------


async def test_cli_serves_until_sigterm_and_removes_its_socket(workdir: str) -> None:
    path = f"{workdir}/nsm.sock"
    args = ["nsm", "--listen", f"unix://{path}", "--no-kernel"]
    async with lab_process(args, b"serving service=nsm") as nsm:
        async with trio.open_nursery() as nursery:
            lab = Lab(workdir, nursery, None)
            lab.channel = grpc.insecure_channel(f"unix://{path}")
            try:
                await lab.register_service()
                nse = await lab.add_nse("nse-a")
                query = NetworkServiceEndpointQuery(
                    network_service_endpoint=NetworkServiceEndpoint(network_service_names=[SERVICE])
                )
                find = lab.channel.unary_stream(
                    f"{NSE_REGISTRY}/Find",
                    request_serializer=NetworkServiceEndpointQuery.SerializeToString,
                    response_deserializer=NetworkServiceEndpointResponse.FromString,
                )
                found = await trio.to_thread.run_sync(lambda: list(find(query, timeout=10)))
                assert [r.network_service_endpoint.name for r in found] == ["nse-a"]
                answer = await lab.request(new_request())
                assert [s.name for s in answer.path.path_segments] == [
                    "target-a",
                    "nsmgr-lab",
                    "nse-a",
                ]
                assert len(nse.requests) == 1
            finally:
                lab.channel.close()
                nursery.cancel_scope.cancel()
        assert await nsm.stop() == 0
        assert not await trio.Path(path).exists()
        assert b"connection established" in nsm.output and b"stopped service=nsm" in nsm.output
