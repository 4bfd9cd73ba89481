"""Health: sub-service statuses, the probe services derived from them, and grpc.health.v1.

Upstream semantics (behaviour reference §6.1, wire-api §4.6):

* the overall service "" is SERVING from the start (the startup probe checks it);
* sub-services IPAMCli, NSPCli, NSMEndpoint and Egress start NOT_SERVING and are set by the
  tasks that own what they describe;
* `Readiness` is SERVING when all four are, `Liveness` when NSMEndpoint is;
* Check on an unknown name answers NOT_FOUND; Watch on an unknown name sends SERVICE_UNKNOWN and
  keeps the stream open; Watch sends the current status, then every change.

The sub-services are answerable by name too, which makes `meridio-proxy probe -service IPAMCli`
a debugging tool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import trio
from loguru import logger

from proxy.api.health.v1 import health_grpc
from proxy.api.health.v1.health_pb2 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthListRequest,
    HealthListResponse,
)
from proxy.rpc import ChannelState, NotFoundError, ReconnectingChannel
from proxy.watched import Watched

ServingStatus = HealthCheckResponse.ServingStatus
SERVING = HealthCheckResponse.SERVING
NOT_SERVING = HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = HealthCheckResponse.SERVICE_UNKNOWN

IPAM_CLIENT = "IPAMCli"
NSP_CLIENT = "NSPCli"
NSM_ENDPOINT = "NSMEndpoint"
EGRESS = "Egress"
SUBSERVICES = (IPAM_CLIENT, NSP_CLIENT, NSM_ENDPOINT, EGRESS)
PROBES: Mapping[str, tuple[str, ...]] = {
    "Readiness": SUBSERVICES,
    "Liveness": (NSM_ENDPOINT,),
}


def probe_status(members: tuple[str, ...], serving: Mapping[str, bool]) -> ServingStatus:
    """A probe service is SERVING when every one of its sub-services is."""
    return SERVING if all(serving[name] for name in members) else NOT_SERVING


class Health:
    """Owns every status. Sub-services are set by their owners; probes follow."""

    def __init__(self, probes: Mapping[str, tuple[str, ...]] = PROBES) -> None:
        self._probes = dict(probes)
        self._serving = {name: False for members in probes.values() for name in members}
        self._statuses: dict[str, Watched[ServingStatus]] = {"": Watched(SERVING)}
        for name in self._serving:
            self._statuses[name] = Watched(NOT_SERVING)
        for probe in self._probes:
            self._statuses[probe] = Watched(probe_status(self._probes[probe], self._serving))

    def set(self, subservice: str, serving: bool) -> None:
        """Record a sub-service's state (unknown names are a programming error: KeyError)."""
        if self._serving[subservice] == serving:
            return
        self._serving[subservice] = serving
        self._statuses[subservice].set(SERVING if serving else NOT_SERVING)
        logger.info(
            "health changed", service=subservice, status="SERVING" if serving else "NOT_SERVING"
        )
        for probe, members in self._probes.items():
            if subservice in members:
                self._statuses[probe].set(probe_status(members, self._serving))

    def status(self, service: str) -> ServingStatus | None:
        watched = self._statuses.get(service)
        return None if watched is None else watched.value

    def all_statuses(self) -> dict[str, ServingStatus]:
        return {name: watched.value for name, watched in self._statuses.items()}

    def describe(self, service: str) -> str:
        """`Egress=NOT_SERVING IPAMCli=SERVING ...` for the members of a probe (for logs)."""
        return " ".join(
            f"{name}={'SERVING' if self._serving[name] else 'NOT_SERVING'}"
            for name in self._probes.get(service, ())
        )

    def watched(self, service: str) -> Watched[ServingStatus] | None:
        return self._statuses.get(service)


class HealthServicer(health_grpc.HealthServicer):  # type: ignore[misc]  # untyped generated base
    """grpc.health.v1.Health over a `Health`."""

    def __init__(self, health: Health) -> None:
        self._health = health

    async def Check(self, message: HealthCheckRequest) -> HealthCheckResponse:
        status = self._health.status(message.service)
        if status is None:
            raise NotFoundError(f"unknown service {message.service!r}")
        if status != SERVING and message.service in PROBES:
            logger.debug(
                "probe not serving",
                service=message.service,
                subservices=self._health.describe(message.service),
            )
        return HealthCheckResponse(status=status)

    async def Watch(self, message: HealthCheckRequest) -> AsyncIterator[HealthCheckResponse]:
        watched = self._health.watched(message.service)
        if watched is None:
            yield HealthCheckResponse(status=SERVICE_UNKNOWN)
            await trio.sleep_forever()
            return
        seen = watched.value
        while True:
            yield HealthCheckResponse(status=seen)
            seen = await watched.wait_change(seen)

    async def List(self, message: HealthListRequest) -> HealthListResponse:
        return HealthListResponse(
            statuses={
                name: HealthCheckResponse(status=status)
                for name, status in self._health.all_statuses().items()
            }
        )


async def follow_channel(channel: ReconnectingChannel, health: Health, subservice: str) -> None:
    """Keep `subservice` SERVING exactly while `channel` is READY, until cancelled (§6.3).

    Upstream reads the gRPC connectivity state; `ReconnectingChannel.state` is its equivalent.
    Upstream's 3 s IDLE kick has no counterpart: the channel never idles, it redials on its own.
    Level-triggered: a flap shorter than one scheduling round may not be seen, the final state
    always is. Cancelled (nobody follows the channel any more), the sub-service is NOT_SERVING.
    """
    state = channel.state.value
    try:
        while True:
            health.set(subservice, state is ChannelState.READY)
            state = await channel.state.wait_change(state)
    finally:
        health.set(subservice, False)
