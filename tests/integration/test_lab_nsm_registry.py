"""The lab NSM registry over the wire, with grpcio as the client.

The server (`serve_nsm`, control plane only) runs in this trio run; each grpcio call runs in a
thread, and a grpcio Find stream is pumped by a thread into a trio channel, so a test can wait
for the next response with a deadline, or check that none comes. Expiry is driven with
`trio.testing.MockClock` (rate 1, plus jumps).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import grpc
import pytest
import trio
import trio.testing
from google.protobuf.empty_pb2 import Empty

from proxy.api.registry.registry_pb2 import (
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
    NetworkServiceLabels,
    NetworkServiceQuery,
    NetworkServiceResponse,
)
from proxy.lab.nsm.forwarding import NoKernel
from proxy.lab.nsm.server import serve_nsm
from proxy.nsm.wire import timestamp
from tests.integration.grpcio_stream import pumped

pytestmark = pytest.mark.timeout(30)

NSE = "/registry.NetworkServiceEndpointRegistry"
NS = "/registry.NetworkServiceRegistry"
SERVICE = "conduit-a.trench-a.default"


@pytest.fixture
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="nsmr-")  # short: the socket lives here
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def registry(workdir: str, **options: Any) -> AsyncIterator[grpc.Channel]:
    """`serve_nsm` on a socket in `workdir`; a grpcio channel to it."""
    path = f"{workdir}/nsm.sock"
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_nsm, path, forwarder=NoKernel(), **options))
        channel = grpc.insecure_channel(f"unix://{path}")
        try:
            yield channel
        finally:
            channel.close()
            nursery.cancel_scope.cancel()


async def unary(channel: grpc.Channel, method: str, request: Any, response_type: Any) -> Any:
    call = channel.unary_unary(
        method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    return await trio.to_thread.run_sync(partial(call, request, timeout=10))


async def register(channel: grpc.Channel, nse: NetworkServiceEndpoint) -> NetworkServiceEndpoint:
    stored: NetworkServiceEndpoint = await unary(
        channel, f"{NSE}/Register", nse, NetworkServiceEndpoint
    )
    return stored


async def unregister(channel: grpc.Channel, nse: NetworkServiceEndpoint) -> None:
    await unary(channel, f"{NSE}/Unregister", nse, Empty)


async def find_all(
    channel: grpc.Channel, query: Any, response_type: Any, service: str
) -> list[Any]:
    call = channel.unary_stream(
        f"{service}/Find",
        request_serializer=type(query).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    return await trio.to_thread.run_sync(lambda: list(call(query, timeout=10)))


@asynccontextmanager
async def watch(
    channel: grpc.Channel, query: Any, response_type: Any, service: str = NSE
) -> AsyncIterator[trio.MemoryReceiveChannel[Any]]:
    """A grpcio Find stream; its responses (or the RpcError ending it) in a trio channel.
    No grpcio deadline: tests jump the mock clock while it is open."""
    call = channel.unary_stream(
        f"{service}/Find",
        request_serializer=type(query).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    stream = call(query)
    async with pumped(stream, buffer=1000) as messages:
        yield messages


async def next_message(messages: trio.MemoryReceiveChannel[Any], within: float = 5.0) -> Any:
    with trio.fail_after(within):
        return await messages.receive()


async def no_message(messages: trio.MemoryReceiveChannel[Any], during: float = 0.3) -> None:
    with trio.move_on_after(during):
        message = await messages.receive()
        pytest.fail(f"unexpected message: {message}")


def endpoint(name: str, *, node: str = "node-a", lifetime: float | None = 60.0, **fields: Any):
    nse = NetworkServiceEndpoint(
        name=name,
        network_service_names=[SERVICE],
        network_service_labels={SERVICE: NetworkServiceLabels(labels={"nodeName": node})},
        url=f"unix:///tmp/{name}/listen.on",
        **fields,
    )
    if lifetime is not None:
        nse.expiration_time.CopyFrom(timestamp(time.time() + lifetime))
    return nse


def by_service(*names: str) -> NetworkServiceEndpointQuery:
    return NetworkServiceEndpointQuery(
        network_service_endpoint=NetworkServiceEndpoint(network_service_names=list(names)),
        watch=True,
    )


def seen(response: NetworkServiceEndpointResponse) -> tuple[str, bool]:
    return response.network_service_endpoint.name, response.deleted


# -- Register -------------------------------------------------------------------------------------


async def test_register_keeps_the_expiration_sent_and_stamps_the_first_registration(
    workdir: str,
) -> None:
    async with registry(workdir) as channel:
        sent = endpoint("lb-a", lifetime=60)
        first = await register(channel, sent)
        assert first.expiration_time == sent.expiration_time
        assert abs(first.initial_registration_time.seconds - time.time()) < 5
        assert first.url == sent.url and list(first.network_service_names) == [SERVICE]

        refreshed = endpoint("lb-a", lifetime=120)
        second = await register(channel, refreshed)
        assert second.expiration_time == refreshed.expiration_time
        assert second.initial_registration_time == first.initial_registration_time


async def test_register_without_expiration_gets_the_default_lifetime(workdir: str) -> None:
    async with registry(workdir, default_lifetime=30.0) as channel:
        stored = await register(channel, endpoint("lb-a", lifetime=None))
        assert abs(stored.expiration_time.seconds - (time.time() + 30)) < 5


async def test_register_without_a_name_is_refused(workdir: str) -> None:
    async with registry(workdir) as channel:
        with pytest.raises(grpc.RpcError) as failure:
            await register(channel, NetworkServiceEndpoint(network_service_names=[SERVICE]))
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "no name" in failure.value.details()


# -- Find -----------------------------------------------------------------------------------------


async def test_find_without_watch_answers_the_current_matches_then_ends(workdir: str) -> None:
    async with registry(workdir) as channel:
        await register(channel, endpoint("lb-a", node="node-a"))
        await register(channel, endpoint("lb-b", node="node-b"))
        other = NetworkServiceEndpoint(name="other", network_service_names=["other-service"])
        other.url = "tcp://198.18.0.9:5000"
        await register(channel, other)

        def names(responses: list[NetworkServiceEndpointResponse]) -> list[str]:
            assert not any(response.deleted for response in responses)
            return sorted(response.network_service_endpoint.name for response in responses)

        async def find(query: NetworkServiceEndpoint) -> list[str]:
            responses = await find_all(
                channel,
                NetworkServiceEndpointQuery(network_service_endpoint=query),
                NetworkServiceEndpointResponse,
                NSE,
            )
            return names(responses)

        assert await find(NetworkServiceEndpoint()) == ["lb-a", "lb-b", "other"]
        assert await find(NetworkServiceEndpoint(network_service_names=[SERVICE])) == [
            "lb-a",
            "lb-b",
        ]
        assert await find(NetworkServiceEndpoint(name="lb-b")) == ["lb-b"]
        assert await find(NetworkServiceEndpoint(name="lb")) == []  # a name is exact
        labelled = NetworkServiceEndpoint(
            network_service_labels={SERVICE: NetworkServiceLabels(labels={"nodeName": "node-b"})}
        )
        assert await find(labelled) == ["lb-b"]
        assert await find(NetworkServiceEndpoint(url="198.18.0.9")) == ["other"]
        both = NetworkServiceEndpoint(network_service_names=[SERVICE, "other-service"])
        assert await find(both) == []


async def test_watch_sends_the_current_list_then_registrations_and_unregistrations(
    workdir: str,
) -> None:
    async with registry(workdir) as channel:
        await register(channel, endpoint("lb-a"))
        await register(channel, NetworkServiceEndpoint(name="x", network_service_names=["x"]))
        async with watch(channel, by_service(SERVICE), NetworkServiceEndpointResponse) as found:
            assert seen(await next_message(found)) == ("lb-a", False)
            await no_message(found)

            await register(channel, endpoint("lb-b"))
            assert seen(await next_message(found)) == ("lb-b", False)
            refreshed = endpoint("lb-a", lifetime=90)
            await register(channel, refreshed)
            response = await next_message(found)
            assert seen(response) == ("lb-a", False)
            assert response.network_service_endpoint.expiration_time == refreshed.expiration_time
            await register(channel, NetworkServiceEndpoint(name="y", network_service_names=["y"]))
            await no_message(found)  # not a match

            await unregister(channel, NetworkServiceEndpoint(name="lb-b"))
            response = await next_message(found)
            assert seen(response) == ("lb-b", True)
            assert response.network_service_endpoint.url == "unix:///tmp/lb-b/listen.on"
            await unregister(channel, NetworkServiceEndpoint(name="lb-b"))  # unknown: fine
            await no_message(found)


async def test_register_with_the_legacy_minus_one_expiration_unregisters(workdir: str) -> None:
    async with registry(workdir) as channel:
        await register(channel, endpoint("lb-a"))
        async with watch(channel, by_service(SERVICE), NetworkServiceEndpointResponse) as found:
            assert seen(await next_message(found)) == ("lb-a", False)
            marker = endpoint("lb-a", lifetime=None)
            marker.expiration_time.seconds = -1
            await register(channel, marker)
            response = await next_message(found)
            assert seen(response) == ("lb-a", True)
            assert response.network_service_endpoint.expiration_time.seconds != -1  # last record
        query = NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint())
        assert await find_all(channel, query, NetworkServiceEndpointResponse, NSE) == []


async def test_an_endpoint_not_refreshed_expires_and_watchers_see_it_deleted(
    workdir: str, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0
    async with registry(workdir) as channel:
        await register(channel, endpoint("lb-a", lifetime=60))
        await register(channel, endpoint("lb-b", lifetime=None))  # default 60 s
        await register(channel, endpoint("lb-c", lifetime=600))
        async with watch(channel, by_service(SERVICE), NetworkServiceEndpointResponse) as found:
            initial = {seen(await next_message(found)) for _ in range(3)}
            assert initial == {("lb-a", False), ("lb-b", False), ("lb-c", False)}

            mock_clock.jump(30)
            await register(channel, endpoint("lb-b", lifetime=None))  # refreshed: +60 s from now
            assert seen(await next_message(found)) == ("lb-b", False)
            mock_clock.jump(35)  # lb-a is past its expiration, lb-b is not
            assert seen(await next_message(found)) == ("lb-a", True)
            await no_message(found)
            mock_clock.jump(30)
            assert seen(await next_message(found)) == ("lb-b", True)
            await no_message(found)
        query = NetworkServiceEndpointQuery(network_service_endpoint=NetworkServiceEndpoint())
        left = await find_all(channel, query, NetworkServiceEndpointResponse, NSE)
        assert [seen(response) for response in left] == [("lb-c", False)]


# -- network services -----------------------------------------------------------------------------


async def test_network_services_register_find_watch_and_unregister(workdir: str) -> None:
    ns = NetworkService(name=f"proxy.{SERVICE}", payload="ETHERNET")
    ns.matches.add(source_selector={"nodeName": "{{.nodeName}}"}).routes.add(
        destination_selector={"nodeName": "{{.nodeName}}"}
    )
    async with registry(workdir) as channel:
        assert await unary(channel, f"{NS}/Register", ns, NetworkService) == ns
        query = NetworkServiceQuery(network_service=NetworkService(name=ns.name), watch=True)
        async with watch(channel, query, NetworkServiceResponse, NS) as found:
            response = await next_message(found)
            assert response.network_service == ns and not response.deleted
            other = NetworkService(name="other", payload="IP")
            await unary(channel, f"{NS}/Register", other, NetworkService)
            await no_message(found)
            await unary(channel, f"{NS}/Unregister", NetworkService(name=ns.name), Empty)
            response = await next_message(found)
            assert response.network_service == ns and response.deleted
        by_payload = NetworkServiceQuery(network_service=NetworkService(payload="IP"))
        listed = await find_all(channel, by_payload, NetworkServiceResponse, NS)
        assert [response.network_service.name for response in listed] == ["other"]
        with pytest.raises(grpc.RpcError) as failure:
            await unary(channel, f"{NS}/Register", NetworkService(payload="IP"), NetworkService)
        assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
