"""What security costs the proxy: NSM token signing and checking, and connecting with mutual
TLS compared with plain text, over a UNIX socket on this machine. `python -m benchmarks.security`.

No root needed: a lab CA in memory, a health server on a temporary socket.
"""

from __future__ import annotations

import datetime
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import trio

from proxy import log
from proxy.api.health.v1.health_grpc import HealthStub
from proxy.api.health.v1.health_pb2 import HealthCheckRequest
from proxy.api.networkservice.connection_pb2 import Path, PathSegment
from proxy.health import Health, HealthServicer
from proxy.lab.spiffe_ca import LabCa
from proxy.rpc import Server, Tls, open_channel
from proxy.security.policy import check_tokens
from proxy.security.tls import SpiffeTls
from proxy.security.tokens import generate
from proxy.watched import Watched

ROUNDS = 2000
CONNECTS = 200


def per_call_us(function: Callable[[], object], rounds: int = ROUNDS) -> tuple[float, float]:
    """p50 and p99 of one call, in microseconds."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        samples.append((time.perf_counter() - started) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99)]


def tokens() -> dict[str, str]:
    ca = LabCa.create("bench.example")
    client, server = ca.identity("/proxy"), ca.identity("/nsmgr")
    now = datetime.datetime.now(datetime.UTC)

    def sign(peer: str = "spiffe://bench.example/nsmgr") -> str:
        token = generate(
            client.svid.key,
            own_id=str(client.spiffe_id),
            own_not_after=client.svid.not_after,
            now=now,
            max_lifetime=datetime.timedelta(minutes=10),
            peer_id=peer,
            peer_not_after=server.svid.not_after,
        )
        return token.value

    first = sign()
    second = generate(
        server.svid.key,
        own_id=str(server.spiffe_id),
        own_not_after=server.svid.not_after,
        now=now,
        max_lifetime=datetime.timedelta(minutes=10),
        peer_id=str(client.spiffe_id),
        peer_not_after=client.svid.not_after,
    ).value
    path = Path(index=1, path_segments=[PathSegment(token=first), PathSegment(token=second)])
    tokens_ = [s.token for s in path.path_segments]
    check = partial(check_tokens, tokens_, 1, now=now, peer_certificate=client.svid.leaf)
    assert check() is None
    sign_p50, sign_p99 = per_call_us(sign)
    check_p50, check_p99 = per_call_us(check)
    return {
        "sign one token (ES256), p50 / p99": f"{sign_p50:.0f} / {sign_p99:.0f} us",
        "check a 2-segment path (4 policies), p50 / p99": f"{check_p50:.0f} / {check_p99:.0f} us",
    }


async def connects(directory: str) -> dict[str, str]:
    ca = LabCa.create("bench.example")
    server_tls = SpiffeTls(Watched(ca.identity("/proxy")))
    client_tls = SpiffeTls(Watched(ca.identity("/nsmgr")))
    results: dict[str, str] = {}
    for label, server_side, client_side in (
        ("plain text", None, None),
        ("mutual TLS", server_tls.server(), client_tls.client()),
    ):
        path = f"{directory}/{label.replace(' ', '-')}.sock"
        servicer = HealthServicer(Health(probes={}))
        async with trio.open_nursery() as nursery:
            serve = partial(Server([servicer]).serve_unix, path, ssl_context=server_side)
            await nursery.start(serve)
            samples = [await _connect_and_call(path, client_side) for _ in range(CONNECTS)]
            async with open_channel(f"unix://{path}", ssl_context=client_side) as channel:
                stub = HealthStub(channel)
                calls = []
                for _ in range(ROUNDS // 4):
                    started = time.perf_counter()
                    await stub.Check(HealthCheckRequest())
                    calls.append((time.perf_counter() - started) * 1e3)
            nursery.cancel_scope.cancel()
        samples.sort()
        calls.sort()
        results[f"{label}: connect + first call, p50 / p99"] = (
            f"{statistics.median(samples):.2f} / {samples[int(len(samples) * 0.99)]:.2f} ms"
        )
        call_p50 = statistics.median(calls)
        results[f"{label}: a call on an open connection, p50"] = f"{call_p50:.3f} ms"
    return results


async def _connect_and_call(path: str, tls: Tls | None) -> float:
    started = time.perf_counter()
    async with open_channel(f"unix://{path}", ssl_context=tls) as channel:
        await HealthStub(channel).Check(HealthCheckRequest())
    return (time.perf_counter() - started) * 1e3


def main() -> int:
    log.setup("WARNING", "text")
    directory = tempfile.mkdtemp(dir="/tmp", prefix="mp-bench-sec-")
    try:
        results = {**tokens(), **trio.run(connects, directory)}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("security costs (one process, UNIX socket, EC P-256 SVIDs)")
    width = max(map(len, results))
    for name, value in results.items():
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
