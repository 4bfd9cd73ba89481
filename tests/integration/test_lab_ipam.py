"""The lab IPAM over the wire, with grpcio as the client (an implementation nobody here wrote).

The server runs in this trio run (or as the real CLI in a subprocess); grpcio's blocking calls
run in threads through `trio.to_thread`, each with its own timeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from proxy.api.ipam.v1.ipam_pb2 import IPV4, IPV6, Child, IPFamily, Prefix, Subnet
from proxy.api.nsp.v1.model_pb2 import Conduit, Trench
from proxy.lab.ipam import IpamSettings, open_ipam, run_gc, serve_ipam
from proxy.lab.ipam_store import ChildKey, StoreError
from proxy.rpc import UnixAddress
from tests.integration.lab_process import lab_process

pytestmark = pytest.mark.timeout(30)

TRENCH = "trench-a"
CALL_TIMEOUT = 10.0


def child(
    name: str,
    *,
    node: str = "node-1",
    conduit: str = "conduit-a",
    trench: str = TRENCH,
    family: int = IPV4,
) -> Child:
    return Child(
        name=name,
        subnet=Subnet(
            conduit=Conduit(name=conduit, trench=Trench(name=trench)),
            node=node,
            ipFamily=cast(IPFamily, family),  # any number: the server must check
        ),
    )


class Client:
    """grpcio, the generic way: the project's message classes, no generated grpcio stubs."""

    def __init__(self, path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix://{path}")
        self._allocate = self.channel.unary_unary(
            "/ipam.v1.Ipam/Allocate",
            request_serializer=Child.SerializeToString,
            response_deserializer=Prefix.FromString,
        )
        self._release = self.channel.unary_unary(
            "/ipam.v1.Ipam/Release",
            request_serializer=Child.SerializeToString,
            response_deserializer=Empty.FromString,
        )

    async def allocate(self, request: Child) -> Prefix:
        call = partial(self._allocate, request, timeout=CALL_TIMEOUT)
        return await trio.to_thread.run_sync(call)

    async def address(self, request: Child) -> str:
        prefix = await self.allocate(request)
        return f"{prefix.address}/{prefix.prefixLength}"

    async def release(self, request: Child) -> Empty:
        return await trio.to_thread.run_sync(partial(self._release, request, timeout=CALL_TIMEOUT))

    async def error(self, method: str, request: Child) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            await (self.allocate(request) if method == "Allocate" else self.release(request))
        return caught.value


@asynccontextmanager
async def ipam_server(path: str, **settings: Any) -> AsyncIterator[Client]:
    """The IPAM serving on `path` in this run, and a grpcio client to it."""
    settings.setdefault("trench", TRENCH)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_ipam, UnixAddress(path), IpamSettings(**settings))
        client = Client(path)
        try:
            yield client
        finally:
            client.channel.close()
            nursery.cancel_scope.cancel()


# -- Allocate / Release --------------------------------------------------------------------------


async def test_allocate_is_idempotent_per_child(sockdir: str) -> None:
    async with ipam_server(f"{sockdir}/ipam.sock") as ipam:
        bridge = await ipam.address(child("bridge"))
        assert bridge == "198.18.0.1/24"  # lowest address of the first node prefix, not .0
        assert await ipam.address(child("bridge")) == bridge
        other = await ipam.address(child("conn-1-src"))
        assert other == "198.18.0.2/24"
        assert await ipam.address(child("bridge")) == bridge
        v6 = await ipam.address(child("bridge", family=IPV6))
        assert v6 == "2001:db8:100::1/64"


async def test_nodes_and_conduits_get_their_own_prefixes(sockdir: str) -> None:
    trench_v4 = ipaddress.ip_network("198.18.0.0/16")
    trench_v6 = ipaddress.ip_network("2001:db8:100::/48")
    async with ipam_server(f"{sockdir}/ipam.sock") as ipam:
        seen: dict[tuple[str, str, int], ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
        for conduit in ("conduit-a", "conduit-b"):
            for node in ("node-1", "node-2", "node-3"):
                for family in (IPV4, IPV6):
                    text = await ipam.address(
                        child("bridge", node=node, conduit=conduit, family=family)
                    )
                    interface = ipaddress.ip_interface(text)
                    assert interface.ip != interface.network.network_address
                    seen[(conduit, node, family)] = interface.network
        v4 = [net for (_, _, family), net in seen.items() if family == IPV4]
        v6 = [net for (_, _, family), net in seen.items() if family == IPV6]
        assert all(net.prefixlen == 24 and net.subnet_of(trench_v4) for net in v4)  # type: ignore[arg-type]
        assert all(net.prefixlen == 64 and net.subnet_of(trench_v6) for net in v6)  # type: ignore[arg-type]
        assert len(set(v4)) == len(v4) == 6 and len(set(v6)) == len(v6) == 6
        # conduits are carved first: each conduit's nodes are inside its own /20 (/56)
        assert seen[("conduit-a", "node-1", IPV4)] == ipaddress.ip_network("198.18.0.0/24")
        assert seen[("conduit-a", "node-2", IPV4)] == ipaddress.ip_network("198.18.1.0/24")
        assert seen[("conduit-b", "node-1", IPV4)] == ipaddress.ip_network("198.18.16.0/24")
        assert seen[("conduit-b", "node-1", IPV6)] == ipaddress.ip_network("2001:db8:100:100::/64")


async def test_release_frees_the_address_and_unknown_releases_succeed(sockdir: str) -> None:
    async with ipam_server(f"{sockdir}/ipam.sock") as ipam:
        first = await ipam.address(child("c1"))
        second = await ipam.address(child("c2"))
        assert await ipam.release(child("c1")) == Empty()
        assert await ipam.address(child("c3")) == first  # the lowest free address again
        assert await ipam.address(child("c2")) == second
        # unknown child, node, conduit or trench: success, as upstream
        assert await ipam.release(child("never-allocated")) == Empty()
        assert await ipam.release(child("c2", node="unknown-node")) == Empty()
        assert await ipam.release(child("c2", conduit="unknown-conduit")) == Empty()
        assert await ipam.release(child("c2", trench="another-trench")) == Empty()
        assert await ipam.address(child("c2")) == second


async def test_allocations_survive_a_restart_with_the_same_database(
    sockdir: str, tmp_path: Path
) -> None:
    db = str(tmp_path / "ipam.db")
    names = [("bridge", IPV4), ("bridge", IPV6), ("a-src", IPV4), ("a-dst", IPV4)]
    async with ipam_server(f"{sockdir}/ipam.sock", db=db) as ipam:
        before = {n: await ipam.address(child(n[0], family=n[1])) for n in names}
        other_node = await ipam.address(child("bridge", node="node-2"))
        await ipam.release(child("a-src"))
    assert not await trio.Path(f"{sockdir}/ipam.sock").exists()
    async with ipam_server(f"{sockdir}/ipam.sock", db=db) as ipam:
        assert await ipam.address(child("bridge", node="node-2")) == other_node
        for name, family in reversed(names[:2] + names[3:]):
            assert await ipam.address(child(name, family=family)) == before[(name, family)]
        # the released address is free again, the kept ones are not handed out twice
        assert await ipam.address(child("b-src")) == before[("a-src", IPV4)]
        assert await ipam.address(child("c-src")) == "198.18.0.4/24"


async def test_a_database_refuses_other_settings(sockdir: str, tmp_path: Path) -> None:
    db = str(tmp_path / "ipam.db")
    async with ipam_server(f"{sockdir}/ipam.sock", db=db) as ipam:
        await ipam.address(child("bridge"))
    settings = IpamSettings(trench=TRENCH, db=db, node_prefix_length={4: 26, 6: 64})
    async with trio.open_nursery() as nursery:
        with pytest.raises(StoreError, match="use the same settings or another database"):
            await nursery.start(serve_ipam, UnixAddress(f"{sockdir}/ipam.sock"), settings)


# -- errors ----------------------------------------------------------------------------------------


async def test_a_full_node_prefix_is_resource_exhausted(sockdir: str) -> None:
    async with ipam_server(f"{sockdir}/ipam.sock", node_prefix_length={4: 29, 6: 64}) as ipam:
        addresses = [await ipam.address(child(f"c{i}")) for i in range(6)]
        assert addresses == [f"198.18.0.{i}/29" for i in range(1, 7)]  # not .0, not .7
        error = await ipam.error("Allocate", child("c6"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "198.18.0.0/29 of node node-1" in error.details()
        assert "full" in error.details()
        assert await ipam.address(child("c0")) == addresses[0]  # existing ones still refresh
        await ipam.release(child("c3"))
        assert await ipam.address(child("c6")) == addresses[3]


async def test_no_free_node_or_conduit_prefix_is_resource_exhausted(sockdir: str) -> None:
    # one /24 conduit in the /24 trench, two /25 nodes in it
    async with ipam_server(
        f"{sockdir}/ipam.sock",
        prefixes=(ipaddress.ip_network("198.18.5.0/24"),),
        conduit_prefix_length={4: 24, 6: 56},
        node_prefix_length={4: 25, 6: 64},
    ) as ipam:
        assert await ipam.address(child("bridge", node="n1")) == "198.18.5.1/25"
        assert await ipam.address(child("bridge", node="n2")) == "198.18.5.129/25"
        error = await ipam.error("Allocate", child("bridge", node="n3"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no free /25 node prefix" in error.details()
        error = await ipam.error("Allocate", child("bridge", conduit="conduit-b"))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "no free /24 conduit prefix" in error.details()
        error = await ipam.error("Allocate", child("bridge", family=IPV6))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no IPv6 prefix" in error.details()


def _without_subnet() -> Child:
    return Child(name="bridge")


BAD_REQUESTS = [
    (child(""), "child name is empty"),
    (_without_subnet(), "child has no subnet"),
    (child("bridge", family=7), "unknown ipFamily 7 (IPV4 = 0, IPV6 = 1)"),
    (child("bridge", node=""), "subnet node is empty"),
    (child("bridge", conduit=""), "subnet conduit name is empty"),
    (child("bridge", trench=""), "subnet conduit trench name is empty"),
]


@pytest.mark.parametrize("method", ["Allocate", "Release"])
async def test_malformed_requests_are_invalid_argument(sockdir: str, method: str) -> None:
    async with ipam_server(f"{sockdir}/ipam.sock") as ipam:
        for request, message in BAD_REQUESTS:
            error = await ipam.error(method, request)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert error.details() == message
        assert await ipam.address(child("bridge")) == "198.18.0.1/24"  # still serving


async def test_another_trench_is_not_found(sockdir: str) -> None:
    async with ipam_server(f"{sockdir}/ipam.sock") as ipam:
        error = await ipam.error("Allocate", child("bridge", trench="trench-b"))
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "trench trench-b not found: this IPAM serves trench trench-a"


# -- garbage collection, with a clock the test drives ----------------------------------------------


async def test_gc_collects_stale_records_and_keeps_refreshed_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    minute = 60.0
    settings = IpamSettings(trench=TRENCH)

    def key(name: str) -> ChildKey:
        return ChildKey(TRENCH, "conduit-a", "node-1", 4, name)

    with open_ipam(settings, now=trio.current_time) as ipam:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_gc, ipam, 60 * minute, 40 * minute)
            refreshed = ipam.allocate(key("refreshed")).address
            stale = ipam.allocate(key("stale")).address
            await trio.sleep(30 * minute)
            assert not ipam.allocate(key("refreshed")).created  # refreshed at 30 min
            await trio.sleep(29 * minute)
            # 59 min: "stale" is past the threshold, but collection only runs every hour
            assert {r.key.name for r in ipam.store.children()} == {"refreshed", "stale"}
            await trio.sleep(2 * minute)
            # 61 min: collected at 60; "refreshed" was 30 min old then
            assert [(r.key.name, r.address) for r in ipam.store.children()] == [
                ("refreshed", refreshed)
            ]
            assert ipam.allocate(key("newcomer")).address == stale  # its address is free
            await trio.sleep(60 * minute)
            # 121 min: "refreshed" (91 min) and "newcomer" (60 min) are gone too
            assert ipam.store.children() == []
            nursery.cancel_scope.cancel()


# -- the real command ------------------------------------------------------------------------------


async def test_cli_serves_until_sigterm_and_removes_its_socket(sockdir: str) -> None:
    path = f"{sockdir}/ipam.sock"
    args = [
        *("ipam", "--listen", f"unix://{path}", "--db", f"{sockdir}/ipam.db", "--trench", TRENCH),
        *("--prefix", "198.18.64.0/18", "--prefix", "2001:db8:200::/48"),
        *("--node-prefix-length-ipv4", "28", "--gc-interval", "1h", "--log-level", "DEBUG"),
    ]
    async with lab_process(args, b"serving service=ipam") as ipam:
        client = Client(path)
        try:
            assert await client.address(child("bridge")) == "198.18.64.1/28"
            assert await client.address(child("bridge", family=IPV6)) == "2001:db8:200::1/64"
        finally:
            client.channel.close()
        assert await ipam.stop() == 0
        assert not await trio.Path(path).exists()
        assert b"allocated" in ipam.output and b"child=bridge" in ipam.output
        assert b"stopped service=ipam" in ipam.output
