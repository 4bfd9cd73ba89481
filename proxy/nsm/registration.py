"""The proxy's own registration in NSM: its network service (once) and its endpoint (kept alive).

* NS `proxy.<conduit>.<trench>.<namespace>`, payload ETHERNET, matching `nodeName` so that NSM
  routes each target to the proxy of its own node (behaviour reference §5.1);
* NSE `<NSM_NAME>` offering it with the label `nodeName=<NSM_HOST>`, at the endpoint socket's
  URL, lifetime 1 minute, re-registered at 2/3 of what is left (§5.2-5.3); on NSM's UNIX socket
  the socket file goes as a descriptor with each Register and Unregister and the message names
  it `inode://dev/ino` (NSM's sendfd, `nsm.sendfd`): nsmgr dials us through it, whatever our
  mount namespace; each call carries the token and the `path` the registry answered last
  (`registry_client`);
* when the connection to NSM is lost, both are registered again as soon as it is back, not at
  the next refresh: a restarted registry that kept them in memory has forgotten them, and for up
  to 40 s no target could find this proxy;
* on stop, the NSE is unregistered (expiration `{seconds: -1}`) within 3 s of the budget.

Every attempt has a deadline and failures are retried with backoff, and all of it ends at once
on cancellation: upstream's registration ignored SIGTERM (§11.13).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import trio
from google.protobuf.timestamp_pb2 import Timestamp
from loguru import logger

from proxy.api.registry.registry_pb2 import (
    Destination,
    Match,
    NetworkService,
    NetworkServiceEndpoint,
    NetworkServiceLabels,
)
from proxy.nsm.hoptoken import Signer
from proxy.nsm.registry_client import FdPassError, RegistryClient
from proxy.nsm.wire import seconds, timestamp
from proxy.rpc import Backoff, Channel, ReconnectingChannel, RpcFailedError
from proxy.rpc.status import describe_failure, describe_status
from proxy.shutdown import Shutdown

LIFETIME = 60.0  # Meridio forces one minute
UNREGISTER_LIMIT = 3.0
NODE_TEMPLATE = "{{.nodeName}}"


def network_service(name: str) -> NetworkService:
    return NetworkService(
        name=name,
        payload="ETHERNET",
        matches=[
            Match(
                source_selector={"nodeName": NODE_TEMPLATE},
                routes=[Destination(destination_selector={"nodeName": NODE_TEMPLATE})],
            )
        ],
    )


def endpoint(
    name: str, service: str, host: str, url: str, expires: float
) -> NetworkServiceEndpoint:
    return NetworkServiceEndpoint(
        name=name,
        network_service_names=[service],
        network_service_labels={service: NetworkServiceLabels(labels={"nodeName": host})},
        url=url,
        expiration_time=timestamp(expires),
    )


def refresh_after(expiration: Timestamp, now: float) -> float:
    """Seconds until the next registration: 2/3 of the lifetime left (at least 0.2 s)."""
    left = seconds(expiration) - now
    return max(0.2, left * 2 / 3)


class Registration:
    def __init__(
        self,
        nsm: ReconnectingChannel,
        *,
        name: str,
        service: str,
        host: str,
        url: str,
        call_timeout: float,
        backoff: Backoff,
        shutdown: Shutdown,
        signer: Signer | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = RegistryClient(signer)
        self._nsm = nsm
        self._name = name
        self._service = service
        self._host = host
        self._url = url
        self._call_timeout = call_timeout
        self._backoff = backoff
        self._shutdown = shutdown
        self._wall = wall_clock
        self.registrations = 0
        self._service_registered_on: Channel | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, keep registered; `started` once the endpoint is registered."""
        try:
            channel, expiration = await self._until_done("register", self._register)
            logger.info(
                "endpoint registered", name=self._name, service=self._service, url=self._url
            )
            task_status.started()
            while True:
                with trio.move_on_after(refresh_after(expiration, self._wall())):
                    await channel.wait_unusable()
                    logger.info("NSM connection lost; registering again once it is back")
                channel, expiration = await self._until_done("refresh", self._register)
        finally:
            with self._shutdown.cleanup(UNREGISTER_LIMIT) as scope:
                await self._unregister()
            if scope.cancelled_caught:
                logger.warning("endpoint not unregistered in time", name=self._name)

    async def _until_done(
        self, what: str, attempt: Callable[[], Awaitable[tuple[Channel, Timestamp]]]
    ) -> tuple[Channel, Timestamp]:
        failures = 0
        while True:
            try:
                with trio.fail_after(self._call_timeout):
                    result = await attempt()
                self._backoff.reset()
                return result
            except (RpcFailedError, trio.TooSlowError, FdPassError) as exc:
                reason = describe_failure(exc)
                if failures == 0:
                    logger.warning("registration failed, retrying", step=what, reason=reason)
                failures += 1
            await trio.sleep(self._backoff.next_delay())

    async def _register(self) -> tuple[Channel, Timestamp]:
        """The service (again on each new channel: NSM may have restarted), then the endpoint."""
        channel = await self._nsm.get()
        if channel is not self._service_registered_on:
            await self._registry.register_service(channel, network_service(self._service))
            self._service_registered_on = channel
        nse = endpoint(self._name, self._service, self._host, self._url, self._wall() + LIFETIME)
        answer = await self._registry.register_endpoint(channel, nse)
        self.registrations += 1
        if answer.HasField("expiration_time"):
            return channel, answer.expiration_time
        return channel, nse.expiration_time

    async def _unregister(self) -> None:
        nse = endpoint(self._name, self._service, self._host, self._url, 0)
        nse.expiration_time.seconds = -1
        nse.expiration_time.nanos = 0
        try:
            channel = await self._nsm.get()
            await self._registry.unregister_endpoint(channel, nse)
            logger.info("endpoint unregistered", name=self._name)
        except RpcFailedError as exc:
            logger.warning(
                "endpoint not unregistered", name=self._name, reason=describe_status(exc)
            )
