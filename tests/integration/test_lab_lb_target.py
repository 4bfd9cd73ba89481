"""The lab's LB and target stand-ins, against small fakes of the NSM registry and manager.

The fakes are `proxy.rpc.Server`s in this trio run that record what they are sent; the LB and the
target run in throw-away namespaces (`mp-lb-*`, `mp-tg-*`, ...), where what they did to the kernel
is checked with `ip -j` and ping. The CLI commands run as real processes at the end.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.connection_pb2 import Path as NsmPath
from proxy.api.networkservice.connectioncontext_pb2 import ConnectionContext, IPContext
from proxy.api.networkservice.networkservice_grpc import (
    NetworkServiceServicer,
    NetworkServiceStub,
)
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.api.registry.registry_grpc import (
    NetworkServiceEndpointRegistryServicer,
    NetworkServiceRegistryServicer,
)
from proxy.api.registry.registry_pb2 import NetworkService, NetworkServiceEndpoint
from proxy.lab.lb import (
    LbSettings,
    LoadBalancer,
    interface_name,
    run_lb,
)
from proxy.lab.target import MIN_REFRESH, Target, TargetSettings, refresh_delay, run_target
from proxy.nsm.wire import seconds, timestamp
from proxy.rpc import CallContext, InvalidArgumentError, Server, UnixAddress, open_channel
from proxy.rpc.fdpass import FdTransceiver, inode_url_of_path
from tests.integration.netns import ip, ip_json, namespaces, veth
from tests.integration.waiting import eventually

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
SERVICE = "conduit-a.trench-a.red"
PROXY_SERVICE = f"proxy.{SERVICE}"
VIP4, VIP6 = "198.19.0.1", "2001:db8:ff::1"


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="lbt-")  # short: unix socket paths
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- fakes -----------------------------------------------------------------------------------------


async def passed_inode(fds: FdTransceiver | None, url: str) -> tuple[int, int] | None:
    """(dev, ino) of the file a message named by `url`, when it came as a descriptor with it."""
    if fds is None or not url.startswith("inode://"):
        return None
    with trio.fail_after(5):
        fd = await fds.receive_fd(url)
    try:
        stat = os.fstat(fd)
        return stat.st_dev, stat.st_ino
    finally:
        os.close(fd)


def inode_of(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


class FakeRegistry:
    """Records what the registry servicers below are sent; grants registrations for `grant`
    seconds (less than asked: the LB must follow the answer)."""

    def __init__(self, grant: float) -> None:
        self.grant = grant
        self.services: list[NetworkService] = []
        self.registers: list[NetworkServiceEndpoint] = []
        self.sockets: list[tuple[int, int] | None] = []  # passed with each Register
        self.unregisters: list[NetworkServiceEndpoint] = []
        self.changed = trio.Event()

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def Register(self, message: Any, request: CallContext) -> Any:
        if isinstance(message, NetworkService):
            self.services.append(message)
            self._note()
            return message
        self.sockets.append(await passed_inode(request.fds, message.url))
        self.registers.append(message)
        self._note()
        granted = NetworkServiceEndpoint()
        granted.CopyFrom(message)
        granted.expiration_time.CopyFrom(timestamp(time.time() + self.grant))
        return granted

    async def Unregister(self, message: NetworkServiceEndpoint, request: CallContext) -> Empty:
        self.unregisters.append(message)
        self._note()
        return Empty()


class _NsRegistry(NetworkServiceRegistryServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeRegistry) -> None:
        self.Register = fake.Register


class _NseRegistry(NetworkServiceEndpointRegistryServicer):  # type: ignore[misc]
    def __init__(self, fake: FakeRegistry) -> None:
        self.Register = fake.Register
        self.Unregister = fake.Unregister


class FakeManager(NetworkServiceServicer):  # type: ignore[misc]
    """Answers a target as nsmgr + proxy would: its own path segment expiring in `lifetime`
    seconds, the IP context the proxy sets, the mechanism with the target's name."""

    def __init__(self, lifetime: float, gateways: list[str]) -> None:
        self.lifetime = lifetime
        self.gateways = gateways
        self.requests: list[NetworkServiceRequest] = []
        self.namespaces: list[tuple[int, int] | None] = []  # passed with each Request
        self.closes: list[Connection] = []
        self.changed = trio.Event()

    def _note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        url = message.mechanism_preferences[0].parameters.get("inodeURL", "")
        self.namespaces.append(await passed_inode(request.fds, url))
        self.requests.append(message)
        self._note()
        answer = Connection()
        answer.CopyFrom(message.connection)
        if len(answer.path.path_segments) == 1:
            answer.path.path_segments.add(name="nsmgr", id="mgr-1")
        answer.path.path_segments[1].expires.CopyFrom(timestamp(time.time() + self.lifetime))
        if not answer.HasField("mechanism"):
            answer.mechanism.CopyFrom(message.mechanism_preferences[0])
        context = answer.context.ip_context
        del context.src_ip_addrs[:], context.extra_prefixes[:]
        context.src_ip_addrs.extend(["198.18.0.2/24", "2001:db8::2/64"])
        context.extra_prefixes.extend(self.gateways)
        answer.context.MTU = 1500
        return answer

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        self.closes.append(message)
        self._note()
        return Empty()


async def wait_for(event_source: Any, condition: Any, limit: float = 10) -> None:
    """Wait until `condition()` holds, re-checking whenever the fake notes a call."""
    with trio.fail_after(limit):
        while not condition():
            await event_source.changed.wait()


@asynccontextmanager
async def serving(servicers: list[Any], path: str) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(Server(servicers).serve_unix, path)
        yield
        nursery.cancel_scope.cancel()


# -- pure pieces -----------------------------------------------------------------------------------


def path_of(*segments: tuple[str, str], index: int) -> NsmPath:
    path = NsmPath(index=index)
    for name, segment_id in segments:
        path.path_segments.add(name=name, id=segment_id)
    return path


def test_refresh_comes_at_a_third_of_the_earliest_expiry() -> None:
    answer = Connection(path=path_of(("t", "1"), ("m", "2"), ("p", "3"), index=0))
    answer.path.path_segments[1].expires.CopyFrom(timestamp(1000.0 + 90))
    answer.path.path_segments[2].expires.CopyFrom(timestamp(1000.0 + 30))
    assert refresh_delay(answer, 1000.0, fallback=60) == pytest.approx(10)
    assert refresh_delay(Connection(), 1000.0, fallback=60) == 60
    assert refresh_delay(answer, 2000.0, fallback=60) == MIN_REFRESH  # expired: soon, no spin


# -- the LB ----------------------------------------------------------------------------------------


def request_for_lb(lb_name_seen: bool = False) -> NetworkServiceRequest:
    """What the manager sends the LB for a proxy: the proxy's segment, then the manager's."""
    request = NetworkServiceRequest(
        connection=Connection(
            id="mgr-conn-1",
            network_service=SERVICE,
            payload="ETHERNET",
            path=NsmPath(index=1),
            context=ConnectionContext(
                MTU=1400,
                ip_context=IPContext(
                    src_ip_addrs=["198.18.0.3/24"], dst_ip_addrs=["198.18.0.4/24"]
                ),
            ),
        ),
        mechanism_preferences=[Mechanism(cls="LOCAL", type="KERNEL")],
    )
    request.connection.path.path_segments.add(name="proxy-a", id="proxy-conn-1")
    request.connection.path.path_segments.add(name="nsmgr", id="mgr-conn-1")
    return request


async def test_lb_registers_answers_and_unregisters(sockdir: str) -> None:
    registry = FakeRegistry(grant=0.6)  # refreshed every 0.4 s
    nsm, listen = f"{sockdir}/nsm.sock", f"{sockdir}/lb.sock"
    with namespaces("lb") as ns:
        settings = LbSettings(
            name="lb-a",
            service=SERVICE,
            nsm=UnixAddress(nsm),
            listen=UnixAddress(listen),
            netns=ns["lb"],
        )
        async with serving([_NsRegistry(registry), _NseRegistry(registry)], nsm):
            async with trio.open_nursery() as nursery:
                lb: LoadBalancer = await nursery.start(run_lb, settings)
                await wait_for(registry, lambda: len(registry.registers) >= 3)
                assert [(s.name, s.payload) for s in registry.services] == [(SERVICE, "ETHERNET")]
                first = registry.registers[0]
                assert first.name == "lb-a"
                assert list(first.network_service_names) == [SERVICE]
                # its socket passed as a descriptor (sendfd), the url naming it inode://
                assert first.url == inode_url_of_path(listen)
                assert registry.sockets[0] == inode_of(listen)
                assert dict(first.network_service_labels[SERVICE].labels) == dict(settings.labels)
                assert seconds(first.expiration_time) > time.time() + 30  # asks for 60 s
                assert lb.registrations.value >= 2  # the third answer may be on its way

                async with open_channel(f"unix://{listen}") as channel:
                    stub = NetworkServiceStub(channel)
                    with trio.fail_after(5):
                        answer = await stub.Request(request_for_lb())
                    assert answer.id == "mgr-conn-1"  # the caller's, restored
                    assert answer.path.index == 1
                    segments = answer.path.path_segments
                    assert [s.name for s in segments] == ["proxy-a", "nsmgr", "lb-a"]
                    own = segments[2]
                    assert own.id not in ("", "mgr-conn-1")
                    assert seconds(own.expires) > time.time()
                    assert answer.network_service_endpoint_name == "lb-a"
                    assert answer.mechanism.type == "KERNEL"
                    name = answer.mechanism.parameters["name"]
                    assert name == interface_name("mgr-conn-1") and len(name) <= 15
                    # its namespace passed back as a descriptor, named inode://
                    assert channel.fds is not None
                    namespace = answer.mechanism.parameters["inodeURL"]
                    assert namespace == inode_url_of_path(f"/run/netns/{ns['lb']}")
                    assert await passed_inode(channel.fds, namespace) == inode_of(
                        f"/run/netns/{ns['lb']}"
                    )
                    assert answer.context.MTU == 1400
                    assert list(answer.context.ip_context.dst_ip_addrs) == ["198.18.0.4/24"]

                    # a refresh sends the answer back: the same segment and name, nothing added
                    refresh = NetworkServiceRequest(connection=answer)
                    again = await stub.Request(refresh)
                    assert [s.id for s in again.path.path_segments] == [s.id for s in segments]
                    assert again.mechanism.parameters["name"] == name
                    assert set(lb.connections) == {"mgr-conn-1"}

                    wrong = request_for_lb()
                    wrong.mechanism_preferences[0].type = "VFIO"
                    with pytest.raises(InvalidArgumentError, match="no KERNEL mechanism"):
                        await stub.Request(wrong)
                    wrong = request_for_lb()
                    wrong.connection.network_service = "other.trench-a.red"
                    with pytest.raises(InvalidArgumentError, match="serves"):
                        await stub.Request(wrong)
                    wrong = request_for_lb()
                    wrong.connection.id = "not-the-segment-id"
                    with pytest.raises(InvalidArgumentError, match="path segment 1"):
                        await stub.Request(wrong)

                    await stub.Close(answer)
                    assert lb.connections == {}
                nursery.cancel_scope.cancel()
            assert [u.expiration_time.seconds for u in registry.unregisters] == [-1]
            assert registry.unregisters[0].name == "lb-a"
    assert not await trio.Path(listen).exists()


async def test_lb_registers_again_as_soon_as_a_restarted_registry_is_back(sockdir: str) -> None:
    nsm, listen = f"{sockdir}/nsm.sock", f"{sockdir}/lb.sock"
    first, second = FakeRegistry(grant=60.0), FakeRegistry(grant=60.0)  # refresh after 40 s
    with namespaces("lbr") as ns:
        settings = LbSettings(
            name="lb-a",
            service=SERVICE,
            nsm=UnixAddress(nsm),
            listen=UnixAddress(listen),
            netns=ns["lbr"],
            max_backoff=0.2,
        )
        async with trio.open_nursery() as nursery:
            async with serving([_NsRegistry(first), _NseRegistry(first)], nsm):
                await nursery.start(run_lb, settings)
                await wait_for(first, lambda: len(first.registers) == 1)
            async with serving([_NsRegistry(second), _NseRegistry(second)], nsm):
                await wait_for(second, lambda: len(second.registers) == 1, limit=5)
                assert [s.name for s in second.services] == [SERVICE]
                nursery.cancel_scope.cancel()


async def test_lb_forwards_and_keeps_its_routes() -> None:
    with namespaces("lb", "lbout", "lbin") as ns:
        lb_ns, outside, inside = ns["lb"], ns["lbout"], ns["lbin"]
        veth(lb_ns, "ext0", outside, "up0")
        ip("link", "set", "ext0", "down", netns=lb_ns)  # the LB brings it up
        ip("addr", "add", "198.18.200.1/24", "dev", "ext0", netns=lb_ns)
        ip("addr", "add", "198.18.200.2/24", "dev", "up0", netns=outside)
        ip("addr", "add", "198.19.50.1/32", "dev", "lo", netns=outside)  # "the internet"
        ip("route", "add", "198.18.201.0/24", "via", "198.18.200.1", netns=outside)
        gateway4 = ipaddress.ip_address("198.18.200.2")
        later = ipaddress.ip_address("198.18.201.2")
        routes = {
            ipaddress.ip_network("198.19.50.0/24"): frozenset({gateway4}),
            ipaddress.ip_network("198.19.60.0/24"): frozenset({later}),  # not reachable yet
        }
        with tempfile.TemporaryDirectory(dir="/tmp", prefix="lbf-") as tmp:
            settings = LbSettings(
                name="lb-b",
                service=SERVICE,
                nsm=UnixAddress(f"{tmp}/absent.sock"),  # no registry: it keeps retrying
                listen=UnixAddress(f"{tmp}/lb.sock"),
                netns=lb_ns,
                outside="ext0",
                routes=routes,
                route_interval=0.1,
            )
            async with trio.open_nursery() as nursery:
                lb: LoadBalancer = await nursery.start(run_lb, settings)
                with trio.fail_after(10):
                    seen = await lb.routes_installed.wait_change(frozenset())
                assert seen == {ipaddress.ip_network("198.19.50.0/24")}
                for name, value in (
                    ("net.ipv4.conf.all.forwarding", "1"),
                    ("net.ipv6.conf.all.forwarding", "1"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                ):
                    assert sysctl(lb_ns, name) == value
                assert "UP" in ip_json("link", "show", "ext0", netns=lb_ns)[0]["flags"]
                assert {(r["dst"], r.get("gateway")) for r in ip_json("route", netns=lb_ns)} >= {
                    ("198.19.50.0/24", "198.18.200.2")
                }
                # a conduit interface appears: the waiting route goes in, and traffic from the
                # inside reaches the outside through the LB
                veth(lb_ns, "nsm-1", inside, "tgt0")
                ip("addr", "add", "198.18.201.1/24", "dev", "nsm-1", netns=lb_ns)
                ip("addr", "add", "198.18.201.2/24", "dev", "tgt0", netns=inside)
                ip("route", "add", "default", "via", "198.18.201.1", netns=inside)
                with trio.fail_after(10):
                    await lb.routes_installed.wait_for(frozenset(routes))
                assert ping(inside, "198.19.50.1")
                nursery.cancel_scope.cancel()
        left = {r["dst"] for r in ip_json("route", netns=lb_ns)}
        assert not left & {"198.19.50.0/24", "198.19.60.0/24"}


def sysctl(netns: str, name: str) -> str:
    command = ["ip", "netns", "exec", netns, "sysctl", "-n", name]
    return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip()


def ping(netns: str, target: str, *options: str) -> bool:
    command = ["ip", "netns", "exec", netns, "ping", "-c", "1", "-W", "2", *options, target]
    return subprocess.run(command, capture_output=True, timeout=10).returncode == 0


# -- the target ------------------------------------------------------------------------------------


def target_settings(nsm: str, netns: str) -> TargetSettings:
    return TargetSettings(
        name="target-a",
        node="node-1",
        service=PROXY_SERVICE,
        nsm=UnixAddress(nsm),
        interface="tgt0",
        vips=(ipaddress.ip_interface(f"{VIP4}/32"), ipaddress.ip_interface(f"{VIP6}/128")),
        netns=netns,
    )


def table_routes(netns: str, table: int) -> set[tuple[str, str, str]]:
    found = ip_json("-4", "route", "show", "table", str(table), netns=netns) + ip_json(
        "-6", "route", "show", "table", str(table), netns=netns
    )
    return {(r["dst"], r.get("gateway", ""), r["dev"]) for r in found}


def rules(netns: str, table: int) -> set[tuple[str, int]]:
    found = ip_json("-4", "rule", netns=netns) + ip_json("-6", "rule", netns=netns)
    return {(r["src"], r["priority"]) for r in found if r.get("table") == str(table)}


def addresses(netns: str, name: str) -> set[str]:
    found = ip_json("addr", "show", "dev", name, netns=netns)
    return {
        f"{a['local']}/{a['prefixlen']}" for a in found[0]["addr_info"] if a["scope"] == "global"
    }


async def test_target_requests_installs_refreshes_and_cleans_up(sockdir: str) -> None:
    manager = FakeManager(lifetime=1.2, gateways=["198.18.0.1/24", "2001:db8::1/64"])
    nsm = f"{sockdir}/nsm.sock"
    with namespaces("tg", "tgp") as ns:
        target_ns, proxy_ns = ns["tg"], ns["tgp"]
        # what the forwarder would have made: the pair, the context's addresses
        veth(target_ns, "tgt0", proxy_ns, "prx0")
        for address in ("198.18.0.2/24", "2001:db8::2/64"):
            ip("addr", "add", address, "dev", "tgt0", "nodad", netns=target_ns)
        for address in ("198.18.0.1/24", "2001:db8::1/64", "198.18.0.254/24"):
            ip("addr", "add", address, "dev", "prx0", "nodad", netns=proxy_ns)
        ip("addr", "add", "198.19.200.1/32", "dev", "lo", netns=proxy_ns)
        ip("route", "add", f"{VIP4}/32", "via", "198.18.0.2", netns=proxy_ns)
        settings = target_settings(nsm, target_ns)
        table = settings.table
        async with serving([manager], nsm), trio.open_nursery() as nursery:
            target: Target = await nursery.start(run_target, settings)
            with trio.fail_after(10):
                await target.applied.wait_change(0)
            first = manager.requests[0]
            connection = first.connection
            assert connection.id == "target-a-red-0"
            assert connection.network_service == PROXY_SERVICE
            assert dict(connection.labels) == {"nodeName": "node-1"}
            assert connection.payload == "ETHERNET"
            assert connection.path.index == 0
            assert [(s.name, s.id) for s in connection.path.path_segments] == [
                ("target-a", "target-a-red-0")
            ]
            (mechanism,) = first.mechanism_preferences
            assert (mechanism.cls, mechanism.type) == ("LOCAL", "KERNEL")
            # its namespace passed as a descriptor (sendfd), the message naming it inode://
            assert dict(mechanism.parameters) == {
                "name": "tgt0",
                "inodeURL": inode_url_of_path(f"/run/netns/{target_ns}"),
            }
            assert manager.namespaces[0] == inode_of(f"/run/netns/{target_ns}")
            assert target.connection is not None  # the answer's URL mapped back
            assert target.connection.mechanism.parameters["inodeURL"] == (
                f"file:///run/netns/{target_ns}"
            )
            assert not connection.context.ip_context.policies  # it routes its VIPs itself

            assert {f"{VIP4}/32", f"{VIP6}/128"} <= addresses(target_ns, "tgt0")
            assert rules(target_ns, table) == {(VIP4, 1000), (VIP6, 1000)}
            assert table_routes(target_ns, table) == {
                ("default", "198.18.0.1", "tgt0"),
                ("default", "2001:db8::1", "tgt0"),
            }
            # the VIP's egress takes the table: 198.19.200.1 is not in the main table
            assert ping(target_ns, "198.19.200.1", "-I", VIP4)
            assert not ping(target_ns, "198.19.200.1", "-I", "198.18.0.2")

            # refreshes: at 1/3 of 1.2 s, the last answer sent back
            await wait_for(manager, lambda: len(manager.requests) >= 3)
            refresh = manager.requests[2].connection
            assert refresh.id == "target-a-red-0"
            assert [s.name for s in refresh.path.path_segments] == ["target-a", "nsmgr"]
            assert refresh.mechanism.parameters["name"] == "tgt0"
            assert refresh.mechanism.parameters["inodeURL"] == mechanism.parameters["inodeURL"]
            assert manager.namespaces[2] == manager.namespaces[0]  # sent again each time

            # a new gateway in an answer moves the route
            manager.gateways = ["198.18.0.254/24", "2001:db8::1/64"]
            seen = target.applied.value
            with trio.fail_after(10):
                while ("default", "198.18.0.254", "tgt0") not in table_routes(target_ns, table):
                    seen = await target.applied.wait_change(seen)
            assert ("default", "198.18.0.1", "tgt0") not in table_routes(target_ns, table)
            nursery.cancel_scope.cancel()
        assert [c.id for c in manager.closes] == ["target-a-red-0"]
        assert rules(target_ns, table) == set()
        assert table_routes(target_ns, table) == set()
        assert addresses(target_ns, "tgt0") == {"198.18.0.2/24", "2001:db8::2/64"}


async def test_target_retries_until_the_manager_answers(sockdir: str) -> None:
    manager = FakeManager(lifetime=60, gateways=["198.18.0.1/24"])
    nsm = f"{sockdir}/nsm.sock"
    with namespaces("tg") as ns:
        veth(ns["tg"], "tgt0", ns["tg"], "peer0")
        async with trio.open_nursery() as nursery:
            target: Target = await nursery.start(run_target, target_settings(nsm, ns["tg"]))
            await trio.sleep(0.5)
            assert target.requests.value == 0
            async with serving([manager], nsm):
                with trio.fail_after(15):
                    await target.applied.wait_change(0)
                # the IPv6 VIP has no gateway of its family: an address, no rule
                assert rules(ns["tg"], 1000) == {(VIP4, 1000)}
                assert f"{VIP6}/128" in addresses(ns["tg"], "tgt0")
                nursery.cancel_scope.cancel()
        assert rules(ns["tg"], 1000) == set()


# -- the commands ----------------------------------------------------------------------------------


async def run_command(*args: str) -> tuple[int, str]:
    argv = [sys.executable, "-m", "proxy", "lab", *args]
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    return result.returncode, (result.stdout + result.stderr).decode()


@pytest.mark.parametrize(
    "args",
    [
        ["lb", "--nsm", "unix:///tmp/x.sock", "--listen", "unix:///tmp/y.sock", "--name", "l"],
        ["lb", "--nsm", "unix:///x", "--listen", "unix:///y", "--name", "l", "--service", "c.t",
         "--route", "198.19.0.0/24=198.18.0.1"],
        ["lb", "--nsm", "unix:///x", "--listen", "unix:///y", "--name", "l", "--service", "c.t.n",
         "--route", "198.19.0.0/24=2001:db8::1"],
        ["lb", "--nsm", "unix:///x", "--listen", "unix:///y", "--name", "l", "--service", "c.t.n",
         "--netns", "mp-no-such-namespace"],
        ["lb", "--nsm", "unix:///x", "--listen", "unix:///y", "--name", "l", "--service", "c.t.n",
         "--outside", "no-such-if0"],
        ["target", "--nsm", "unix:///x", "--name", "t", "--node", "n", "--service",
         "proxy.c.t.n", "--interface", "sixteen-chars-xx", "--vip", "198.19.0.1/32"],
        ["target", "--nsm", "unix:///x", "--name", "t", "--node", "n", "--service", "c.t.n",
         "--interface", "tgt0", "--vip", "198.19.0.1/32"],
        ["target", "--nsm", "unix:///x", "--name", "t", "--node", "n", "--service",
         "proxy.c.t.n", "--interface", "tgt0", "--vip", "198.19.0.300/32"],
    ],
)  # fmt: skip
async def test_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    status, output = await run_command(*args)
    assert status == 2, output
    assert output.count("\n") == 1 and "error:" in output, output


@pytest.mark.parametrize("command", ["lb", "target"])
async def test_help_describes_every_flag(command: str) -> None:
    status, output = await run_command(command, "--help")
    assert status == 0
    for flag in ("--nsm", "--name", "--service", "--netns"):
        assert flag in output
    extra = ["--listen", "--outside", "--route"] if command == "lb" else ["--node", "--vip"]
    assert all(flag in output for flag in extra)


async def test_lb_command_registers_and_stops_cleanly_on_sigterm(sockdir: str) -> None:
    registry = FakeRegistry(grant=60)
    nsm, listen = f"{sockdir}/nsm.sock", f"{sockdir}/lb.sock"
    with namespaces("lbc") as ns:
        async with serving([_NsRegistry(registry), _NseRegistry(registry)], nsm):
            argv = [
                *(sys.executable, "-m", "proxy", "lab", "lb", "--nsm", f"unix://{nsm}"),
                *("--listen", f"unix://{listen}", "--name", "lb-c", "--service", SERVICE),
                *("--netns", ns["lbc"], "--route", "198.19.0.0/24=198.18.0.1"),
            ]
            process = await trio.lowlevel.open_process(
                argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                await wait_for(registry, lambda: len(registry.registers) >= 1, limit=20)
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await process.wait() == 0
                assert [u.name for u in registry.unregisters] == ["lb-c"]
                assert not await trio.Path(listen).exists()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()


async def test_target_command_stops_cleanly_on_sigterm(sockdir: str) -> None:
    manager = FakeManager(lifetime=60, gateways=["198.18.0.1/24"])
    nsm = f"{sockdir}/nsm.sock"
    with namespaces("tgc") as ns:
        veth(ns["tgc"], "tgt0", ns["tgc"], "peer0")
        async with serving([manager], nsm):
            argv = [
                *(sys.executable, "-m", "proxy", "lab", "target", "--nsm", f"unix://{nsm}"),
                *("--name", "target-c", "--node", "node-1", "--service", PROXY_SERVICE),
                *("--interface", "tgt0", "--vip", f"{VIP4}/32", "--netns", ns["tgc"]),
            ]
            process = await trio.lowlevel.open_process(
                argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                # another process's kernel work: nothing to await
                await eventually(
                    lambda: rules(ns["tgc"], 1000) == {(VIP4, 1000)}, within=20, interval=0.1
                )
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await process.wait() == 0
                assert [c.id for c in manager.closes] == ["target-c-red-0"]
                assert rules(ns["tgc"], 1000) == set()
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()
