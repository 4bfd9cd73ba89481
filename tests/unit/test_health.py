"""Health aggregation (pure) and the grpc.health.v1 servicer over a real UNIX socket."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import trio

from proxy import rpc
from proxy.api.health.v1 import health_grpc
from proxy.api.health.v1.health_pb2 import (
    HealthCheckRequest,
    HealthCheckResponse,
    HealthListRequest,
)
from proxy.health import (
    EGRESS,
    IPAM_CLIENT,
    NOT_SERVING,
    NSM_ENDPOINT,
    NSP_CLIENT,
    SERVICE_UNKNOWN,
    SERVING,
    SUBSERVICES,
    Health,
    HealthServicer,
)

pytestmark = pytest.mark.timeout(20)


def test_initial_statuses_follow_upstream() -> None:
    health = Health()
    assert health.status("") == SERVING
    for name in (*SUBSERVICES, "Readiness", "Liveness"):
        assert health.status(name) == NOT_SERVING, name
    assert health.status("Startup") is None


def test_readiness_needs_all_four_liveness_only_the_endpoint() -> None:
    health = Health()
    health.set(NSM_ENDPOINT, True)
    assert health.status("Liveness") == SERVING
    assert health.status("Readiness") == NOT_SERVING
    for name in (IPAM_CLIENT, NSP_CLIENT):
        health.set(name, True)
    assert health.status("Readiness") == NOT_SERVING
    health.set(EGRESS, True)
    assert health.status("Readiness") == SERVING
    health.set(IPAM_CLIENT, False)
    assert health.status("Readiness") == NOT_SERVING
    assert health.status("Liveness") == SERVING
    health.set(NSM_ENDPOINT, False)
    assert health.status("Liveness") == NOT_SERVING


def test_unknown_subservice_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        Health().set("Nonsense", True)


@pytest.fixture
async def served(nursery: trio.Nursery):
    health = Health()
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="mp-health-"))
    path = str(directory / "health.sock")
    await nursery.start(rpc.Server([HealthServicer(health)]).serve_unix, path)
    try:
        async with rpc.open_channel(f"unix://{path}") as channel:
            yield health, health_grpc.HealthStub(channel)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_check_answers_status_and_not_found(served) -> None:
    _, stub = served
    reply = await stub.Check(HealthCheckRequest(service=""))
    assert reply.status == SERVING
    reply = await stub.Check(HealthCheckRequest(service="Readiness"))
    assert reply.status == NOT_SERVING
    with pytest.raises(rpc.NotFoundError):
        await stub.Check(HealthCheckRequest(service="Startup"))


async def test_watch_streams_every_change(served) -> None:
    health, stub = served
    seen: list[int] = []
    with trio.fail_after(5):
        async with rpc.server_stream(stub.Watch, HealthCheckRequest(service="Liveness")) as stream:
            async for reply in stream:
                seen.append(reply.status)
                if len(seen) == 1:
                    health.set(NSM_ENDPOINT, True)
                elif len(seen) == 2:
                    health.set(NSM_ENDPOINT, False)
                else:
                    break
    assert seen == [NOT_SERVING, SERVING, NOT_SERVING]


async def test_watch_unknown_service_says_so_and_stays_open(served) -> None:
    _, stub = served
    async with rpc.server_stream(stub.Watch, HealthCheckRequest(service="Startup")) as stream:
        first = await stream.__anext__()
        assert first.status == SERVICE_UNKNOWN
        with trio.move_on_after(0.2) as idle:
            await stream.__anext__()
        assert idle.cancelled_caught, "the stream must stay open after SERVICE_UNKNOWN"


async def test_list_reports_every_service(served) -> None:
    health, stub = served
    health.set(EGRESS, True)
    reply = await stub.List(HealthListRequest())
    statuses = {name: r.status for name, r in reply.statuses.items()}
    assert statuses[""] == SERVING
    assert statuses[EGRESS] == SERVING
    assert statuses["Readiness"] == HealthCheckResponse.NOT_SERVING
    assert set(statuses) == {"", *SUBSERVICES, "Readiness", "Liveness"}
