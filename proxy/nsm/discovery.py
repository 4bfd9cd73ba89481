"""Discovery of the conduit's load-balancers: a registry Find with watch (wire-api §4.1).

Each response adds or refreshes an endpoint (deleted=false with an expiration that is set and
not the legacy `-1` marker) or removes it (anything else). The stream is opened again when it
ends (NSM recycles it every 15 s to 1 min), and endpoints whose expiration plus half the token
lifetime has passed are evicted, because NSM can miss a delete (upstream's rule; here also on a
timer while the stream is open, not only when it ends).

Only what changes goes out on the channel: `LbSeen` when an endpoint appears, `LbGone` when it
goes. The mesh owns the connections.

Once, at start, a Find without watch lists the endpoints there are (a watching Find has no mark
where the current ones end and changes begin): `LbListed` follows their `LbSeen`, so the mesh
can tell when every load-balancer known at start is connected again (`Mesh.settled`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs
import trio
from loguru import logger

from proxy.api.registry import registry_grpc
from proxy.api.registry.registry_pb2 import (
    NetworkServiceEndpoint,
    NetworkServiceEndpointQuery,
    NetworkServiceEndpointResponse,
)
from proxy.nsm.hoptoken import Signer, call_metadata
from proxy.nsm.wire import seconds
from proxy.rpc import Backoff, ReconnectingChannel, RpcFailedError, server_stream
from proxy.rpc.status import describe_failure, describe_status

LIST_TIMEOUT = 5.0  # the first listing; the mesh falls back on NSM_REQUEST_TIMEOUT without it


@attrs.frozen
class LbSeen:
    name: str


@attrs.frozen
class LbGone:
    name: str
    reason: str


@attrs.frozen
class LbListed:
    """Every endpoint registered at start has been announced (`LbSeen`): these."""

    names: frozenset[str]


LbEvent = LbSeen | LbGone | LbListed


def is_alive(response: NetworkServiceEndpointResponse) -> bool:
    """Upstream's rule: present, not deleted, with an expiration that is set and not -1."""
    nse = response.network_service_endpoint
    return (
        not response.deleted
        and nse.HasField("expiration_time")
        and nse.expiration_time.seconds != -1
    )


def expiration(nse: NetworkServiceEndpoint) -> float:
    return seconds(nse.expiration_time)


def evictable(expirations: dict[str, float], now: float, grace: float) -> list[str]:
    """Endpoints past their expiration plus the grace (half the token lifetime)."""
    return sorted(name for name, expires in expirations.items() if expires + grace < now)


class Discovery:
    def __init__(
        self,
        nsm: ReconnectingChannel,
        service: str,
        events: trio.MemorySendChannel[LbEvent],
        *,
        token_lifetime: float,
        backoff: Backoff,
        signer: Signer | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._signer = signer
        self._nsm = nsm
        self._service = service
        self._events = events
        self._grace = token_lifetime / 2
        self._backoff = backoff
        self._wall = wall_clock
        self.known: dict[str, float] = {}  # name -> expiration (wall clock)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sweep_periodically)
            await self._list()
            failures = 0
            while True:
                try:
                    await self._watch()
                    failures = 0
                except RpcFailedError as exc:
                    if failures == 0:
                        logger.warning("registry watch lost", reason=describe_status(exc))
                    failures += 1
                await self._sweep()
                await trio.sleep(0.5 if failures == 0 else self._backoff.next_delay())

    async def _list(self) -> None:
        """The endpoints there are now, then `LbListed`. One try: a registry that does not
        answer leaves the mesh to settle by its timeout instead."""
        try:
            with trio.fail_after(LIST_TIMEOUT):
                channel = await self._nsm.get()
                stub = registry_grpc.NetworkServiceEndpointRegistryStub(channel)
                metadata = call_metadata(self._signer, channel)
                async with server_stream(
                    stub.Find, self._query(watch=False), metadata=metadata
                ) as responses:
                    async for response in responses:
                        await self._apply(response)
        except (RpcFailedError, trio.TooSlowError) as exc:
            logger.debug("no first listing of the load-balancers", reason=describe_failure(exc))
            return
        await self._events.send(LbListed(frozenset(self.known)))

    def _query(self, *, watch: bool) -> NetworkServiceEndpointQuery:
        return NetworkServiceEndpointQuery(
            network_service_endpoint=NetworkServiceEndpoint(network_service_names=[self._service]),
            watch=watch,
        )

    async def _watch(self) -> None:
        query = self._query(watch=True)
        channel = await self._nsm.get()
        stub = registry_grpc.NetworkServiceEndpointRegistryStub(channel)
        metadata = call_metadata(self._signer, channel)
        async with server_stream(stub.Find, query, metadata=metadata) as responses:
            self._backoff.reset()
            async for response in responses:
                await self._apply(response)

    async def _apply(self, response: NetworkServiceEndpointResponse) -> None:
        nse = response.network_service_endpoint
        if not nse.name:
            return
        if is_alive(response):
            new = nse.name not in self.known
            self.known[nse.name] = expiration(nse)
            if new:
                logger.info("load-balancer seen", nse=nse.name)
                await self._events.send(LbSeen(nse.name))
        else:
            await self._forget(nse.name, "deleted" if response.deleted else "unregistered")

    async def _forget(self, name: str, reason: str) -> None:
        if self.known.pop(name, None) is not None:
            logger.info("load-balancer gone", nse=name, reason=reason)
            await self._events.send(LbGone(name, reason))

    async def _sweep(self) -> None:
        for name in evictable(self.known, self._wall(), self._grace):
            await self._forget(name, "expired")

    async def _sweep_periodically(self) -> None:
        while True:
            await trio.sleep(max(1.0, min(5.0, self._grace)))
            await self._sweep()
