"""The target-facing endpoint over a real UNIX socket (and directly, for timers)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from proxy import rpc
from proxy.api.networkservice import connection_grpc, networkservice_grpc
from proxy.api.networkservice.connection_pb2 import (
    Connection,
    ConnectionEventType,
    Mechanism,
    MonitorScopeSelector,
    PathSegment,
)
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.kernel.router import RouterEvent, SetTargetPort
from proxy.nsm.endpoint import TargetEndpoint
from proxy.nsm.wire import interface_name
from proxy.rpc.connection import Peer
from proxy.rpc.fdpass import FdTransceiver
from proxy.watched import Watched

pytestmark = pytest.mark.timeout(30)
SERVICE = "proxy.conduit-a.trench-a.red"
LB_KEYS = "proxy-a-conduit-a.trench-a.red-"  # what the proxy's own LB connection ids start with
GATEWAYS = frozenset(
    {ipaddress.ip_interface("198.18.1.1/24"), ipaddress.ip_interface("2001:db8:1::1/64")}
)


@attrs.frozen
class Pair:
    src: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]
    dst: tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]


class FakeAddresses:
    def __init__(self) -> None:
        self.allocated: list[str] = []
        self.released: list[str] = []

    async def allocate_pair(self, key: str) -> Pair:
        self.allocated.append(key)
        n = 10 + 2 * (sorted(set(self.allocated)).index(key))
        return Pair(
            (
                ipaddress.ip_interface(f"198.18.1.{n}/24"),
                ipaddress.ip_interface(f"2001:db8:1::{n:x}/64"),
            ),
            (
                ipaddress.ip_interface(f"198.18.1.{n + 1}/24"),
                ipaddress.ip_interface(f"2001:db8:1::{n + 1:x}/64"),
            ),
        )

    def release_later(self, key: str) -> None:
        self.released.append(key)


def target_request(name: str = "target-a", mechanism: str = "KERNEL") -> NetworkServiceRequest:
    conn_id = f"{name}-red-0"
    connection = Connection(id=conn_id, network_service=SERVICE, labels={"nodeName": "node-a"})
    connection.path.path_segments.append(PathSegment(name=name, id=conn_id))
    return NetworkServiceRequest(
        connection=connection, mechanism_preferences=[Mechanism(cls="LOCAL", type=mechanism)]
    )


def make_endpoint(
    router: trio.MemorySendChannel[RouterEvent], addresses: FakeAddresses
) -> TargetEndpoint:
    return TargetEndpoint(
        name="proxy-a",
        service_name=SERVICE,
        mtu=1450,
        addresses=addresses,
        gateways=Watched(GATEWAYS),
        router=router,
        default_lifetime=60.0,
        allocation_timeout=5.0,
        reserved_prefix=LB_KEYS,
    )


@attrs.define
class Served:
    endpoint: TargetEndpoint
    addresses: FakeAddresses
    router: trio.MemoryReceiveChannel[RouterEvent]
    stub: networkservice_grpc.NetworkServiceStub
    monitor: connection_grpc.MonitorConnectionStub
    fds: FdTransceiver | None  # the client connection's descriptors


@pytest.fixture
async def served(nursery: trio.Nursery) -> AsyncIterator[Served]:
    directory = tempfile.mkdtemp(dir="/tmp", prefix="mp-nse-")
    send, receive = trio.open_memory_channel[RouterEvent](100)
    addresses = FakeAddresses()
    endpoint = make_endpoint(send, addresses)
    path = f"{directory}/listen.on"
    await nursery.start(rpc.Server(endpoint.servicers()).serve_unix, path)
    nursery.start_soon(endpoint.run)
    try:
        async with rpc.open_channel(f"unix://{path}") as channel:
            yield Served(
                endpoint,
                addresses,
                receive,
                networkservice_grpc.NetworkServiceStub(channel),
                connection_grpc.MonitorConnectionStub(channel),
                channel.fds,
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_kernel_answer_passes_our_namespace_as_a_descriptor(served: Served) -> None:
    """NSM's kernel mechanism and sendfd servers: the answer names the endpoint's namespace
    (ours: this process's) by `inode://`, its descriptor having come with the answer; what the
    endpoint keeps (and monitors see) names it by path."""
    answer = await served.stub.Request(target_request())
    url = answer.mechanism.parameters["inodeURL"]
    assert url.startswith("inode://")
    assert served.fds is not None
    with trio.fail_after(5):
        fd = await served.fds.receive_fd(url)
    try:
        passed, ours = os.fstat(fd), os.stat("/proc/self/ns/net")
        assert (passed.st_dev, passed.st_ino) == (ours.st_dev, ours.st_ino)
    finally:
        os.close(fd)
    [kept] = served.endpoint.connections.values()
    assert kept.connection.mechanism.parameters["inodeURL"] == "file:///proc/thread-self/ns/net"
    noop = await served.stub.Request(target_request("target-b", mechanism="NOOP"))
    assert "inodeURL" not in noop.mechanism.parameters  # no interface, no namespace


async def test_bad_requests_are_refused_with_a_reason(
    served: Served, warnings: list[dict[str, Any]]
) -> None:
    cases = {
        "no connection": NetworkServiceRequest(),
        "no id": target_request(),
        "no network service": target_request(),
        "another network service": target_request(),
        "no supported mechanism": target_request(mechanism="MEMIF"),
        "no path": target_request(),
        "no id in the first segment": target_request(),
        "addresses that are not addresses": target_request(),
        "an LB connection's key": target_request(),
    }
    cases["an LB connection's key"].connection.path.path_segments[0].id = LB_KEYS + "lb-0"
    cases["no id"].connection.id = ""
    cases["no network service"].connection.network_service = ""
    cases["another network service"].connection.network_service = "proxy.conduit-b.trench-a.red"
    del cases["no path"].connection.path.path_segments[:]
    unnamed = cases["no id in the first segment"].connection
    unnamed.path.path_segments[0].id = ""
    unnamed.path.path_segments.add(name="nsmgr", id=unnamed.id)
    unnamed.path.index = 1
    garbage = cases["addresses that are not addresses"].connection.context.ip_context
    garbage.src_ip_addrs.extend(["not-an-ip", "300.1.2.3/32"])
    garbage.extra_prefixes.append("2001:db8::zz/64")
    for words, request in cases.items():
        with pytest.raises(rpc.InvalidArgumentError) as refused:
            await served.stub.Request(request)
        print(f"{words}: {refused.value.status.status_message}")
    assert served.addresses.allocated == []
    with pytest.raises(trio.WouldBlock):
        served.router.receive_nowait()
    refusals = [w for w in warnings if w["message"] == "target request refused"]
    assert len(refusals) == len(cases)
    assert "not served here" in refusals[3]["reason"]
    assert refusals[7]["reason"] == (
        "bad IP context: src_ip_addrs[0] 'not-an-ip' is not an address/length;"
        " src_ip_addrs[1] '300.1.2.3/32' is not an address/length;"
        " extra_prefixes[0] '2001:db8::zz/64' is not an address/length"
    )


async def test_a_close_naming_a_live_targets_key_under_another_id_is_ignored(
    served: Served,
) -> None:
    """Only the target's own segment in the path (no id of ours): a stale or forged Close. The
    key is a live connection's, so its addresses and port stay."""
    answer = await served.stub.Request(target_request())
    port = SetTargetPort(interface_name(SERVICE, "target-a-red-0"))
    assert served.router.receive_nowait() == port
    forged = Connection(id=answer.id, network_service=SERVICE)
    forged.path.path_segments.append(PathSegment(name="target-a", id=answer.id))
    forged.mechanism.type = "KERNEL"
    await served.stub.Close(forged)
    assert served.addresses.released == []
    with pytest.raises(trio.WouldBlock):
        served.router.receive_nowait()
    assert len(served.endpoint.connections) == 1
    await served.stub.Close(answer)  # the real one
    assert served.addresses.released == ["target-a-red-0"]
    assert served.router.receive_nowait() == SetTargetPort(port.name, wanted=False)


async def test_two_connections_of_one_target_release_its_key_after_the_last(
    served: Served,
) -> None:
    """A target that requested afresh (a new path, so a new id at our hop) before its old
    connection was closed: closing the old one must not take the key the new one uses."""
    old = await served.stub.Request(target_request())
    port = SetTargetPort(interface_name(SERVICE, "target-a-red-0"))
    assert served.router.receive_nowait() == port
    new = await served.stub.Request(target_request())
    assert served.router.receive_nowait() == port  # wanted again: the same port, no change
    assert new.path.path_segments[1].id != old.path.path_segments[1].id
    assert new.context.ip_context.src_ip_addrs == old.context.ip_context.src_ip_addrs
    await served.stub.Close(old)
    assert served.addresses.released == []
    with pytest.raises(trio.WouldBlock):
        served.router.receive_nowait()
    await served.stub.Close(new)
    assert served.addresses.released == ["target-a-red-0"]
    assert served.router.receive_nowait() == SetTargetPort(port.name, wanted=False)


async def test_a_close_naming_an_lb_connections_key_is_ignored(
    served: Served, warnings: list[dict[str, Any]]
) -> None:
    """The proxy's own LB connections hold keys in IPAM too; a Close from the target side must
    never release one (a target could cut the node's egress over that LB)."""
    forged = Connection(id=LB_KEYS + "lb-0", network_service=SERVICE)
    forged.path.path_segments.append(PathSegment(name="target-a", id=forged.id))
    forged.mechanism.type = "KERNEL"
    await served.stub.Close(forged)
    assert served.addresses.released == []
    with pytest.raises(trio.WouldBlock):
        served.router.receive_nowait()
    assert [w["key"] for w in warnings] == [LB_KEYS + "lb-0"]


async def test_a_close_without_ids_releases_nothing(served: Served) -> None:
    nameless = Connection(network_service=SERVICE)
    nameless.path.path_segments.append(PathSegment(name="target-a"))
    await served.stub.Close(nameless)
    assert served.addresses.released == []


async def test_a_target_connects_refreshes_and_closes(served: Served) -> None:
    request = target_request()
    with trio.fail_after(5):
        answer = await served.stub.Request(request)
    assert answer.id == "target-a-red-0" and answer.path.index == 0
    assert [s.name for s in answer.path.path_segments] == ["target-a", "proxy-a"]
    ours = answer.path.path_segments[1].id
    assert ours and ours != answer.id
    name = interface_name(SERVICE, "target-a-red-0")
    assert len(name) <= 15
    assert answer.mechanism.type == "KERNEL" and answer.mechanism.parameters["name"] == name
    assert answer.context.MTU == 1450
    ip = answer.context.ip_context
    assert list(ip.src_ip_addrs) == ["198.18.1.10/24", "2001:db8:1::a/64"]
    assert list(ip.dst_ip_addrs) == ["198.18.1.11/24", "2001:db8:1::b/64"]
    assert list(ip.extra_prefixes) == ["198.18.1.1/24", "2001:db8:1::1/64"]
    assert served.router.receive_nowait() == SetTargetPort(name)

    refreshed = await served.stub.Request(NetworkServiceRequest(connection=answer))
    assert refreshed.path.path_segments[1].id == ours
    assert refreshed.context.ip_context.src_ip_addrs == ip.src_ip_addrs
    with pytest.raises(trio.WouldBlock):
        served.router.receive_nowait()  # the port is already wanted

    await served.stub.Close(refreshed)
    assert served.addresses.released == ["target-a-red-0"]
    assert served.router.receive_nowait() == SetTargetPort(name, wanted=False)
    assert served.endpoint.connections == {}
    await served.stub.Close(refreshed)  # twice: still fine


async def test_monitor_reports_initial_state_updates_and_deletes(served: Served) -> None:
    first = await served.stub.Request(target_request("target-a"))
    selector = MonitorScopeSelector(path_segments=[PathSegment(name="target-b")])
    events = []
    monitor = served.monitor.MonitorConnections
    async with (
        rpc.server_stream(monitor, MonitorScopeSelector()) as all_events,
        rpc.server_stream(monitor, selector) as b_only,
    ):
        events.append(await all_events.__anext__())
        assert len(events[0].connections) == 1
        initial_b = await b_only.__anext__()
        assert initial_b.type == ConnectionEventType.INITIAL_STATE_TRANSFER
        assert len(initial_b.connections) == 0
        second = await served.stub.Request(target_request("target-b"))
        update = await all_events.__anext__()
        assert update.type == ConnectionEventType.UPDATE
        assert (await b_only.__anext__()).type == ConnectionEventType.UPDATE
        await served.stub.Close(first)
        delete = await all_events.__anext__()
        assert delete.type == ConnectionEventType.DELETE
        await served.stub.Close(second)
        assert (await b_only.__anext__()).type == ConnectionEventType.DELETE


async def test_noop_mechanism_has_no_interface_and_no_port(served: Served) -> None:
    answer = await served.stub.Request(target_request(mechanism="NOOP"))
    assert answer.mechanism.type == "NOOP"
    assert "name" not in answer.mechanism.parameters
    with pytest.raises(trio.WouldBlock):
        served.router.receive_nowait()


async def test_an_unrefreshed_connection_expires_like_nsm_times_it_out(
    mock_clock: trio.testing.MockClock,
) -> None:
    mock_clock.autojump_threshold = 0
    send, receive = trio.open_memory_channel[RouterEvent](100)
    addresses = FakeAddresses()
    wall = time.time()
    endpoint = TargetEndpoint(
        name="proxy-a",
        service_name=SERVICE,
        mtu=1500,
        addresses=addresses,
        gateways=Watched(GATEWAYS),
        router=send,
        default_lifetime=60.0,
        allocation_timeout=5.0,
        reserved_prefix=LB_KEYS,
        wall_clock=lambda: wall + trio.current_time(),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(endpoint.run)
        request = target_request()
        # The target's segment says its token lasts 10 s (NSM's timeout closes then).
        request.connection.path.path_segments[0].expires.FromSeconds(int(wall) + 10)
        context = rpc.CallContext("s", "m", (), Peer("test"), float("inf"))
        await endpoint.request(request, context)
        assert receive.receive_nowait() == SetTargetPort(interface_name(SERVICE, "target-a-red-0"))
        await trio.sleep(9)
        assert endpoint.connections and addresses.released == []
        await trio.sleep(2)
        assert endpoint.connections == {}
        assert addresses.released == ["target-a-red-0"]
        assert receive.receive_nowait() == SetTargetPort(
            interface_name(SERVICE, "target-a-red-0"), wanted=False
        )
        nursery.cancel_scope.cancel()


async def test_closing_a_connection_of_a_previous_instance_releases_it(served: Served) -> None:
    """The proxy restarted and the target leaves before refreshing: its key is in the path."""
    answer = await served.stub.Request(target_request())
    served.endpoint.connections.clear()  # what a restart forgets
    served.router.receive_nowait()
    await served.stub.Close(answer)
    assert served.addresses.released == ["target-a-red-0"]
    assert served.router.receive_nowait() == SetTargetPort(
        interface_name(SERVICE, "target-a-red-0"), wanted=False
    )
