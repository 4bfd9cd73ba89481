"""The proxy's identity and mutual TLS with SPIFFE SVIDs, over real sockets:

* the Workload API client against the lab's Workload API server (the SPIRE agent stand-in):
  the first SVID, rotations, a server that goes and comes back, the security header;
* the file identity source: read, rotated, a broken rotation;
* mTLS between the project's own client and server, and with grpcio on either side (ALPN h2):
  refused, each with one log line saying why: a certificate from another CA, another trust
  domain, expired, not yet valid, none at all, an ID that is not authorized; a rotated SVID is
  used by new connections while an established one keeps working.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from loguru import logger

from proxy.api.health.v1.health_grpc import HealthStub
from proxy.api.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from proxy.api.workload.workload_grpc import SpiffeWorkloadAPIStub
from proxy.api.workload.workload_pb2 import X509SVIDRequest, X509SVIDResponse
from proxy.health import Health, HealthServicer
from proxy.lab.spiffe_ca import LabCa
from proxy.lab.workload import Issuer, serve_workload_api
from proxy.rpc import InvalidArgumentError, Server, UnavailableError, open_channel, server_stream
from proxy.rpc.tls import base_context
from proxy.security.identity import follow_files, follow_workload_api
from proxy.security.spiffe import Identity, SpiffeId
from proxy.security.tls import Authorizer, SpiffeTls
from proxy.watched import Watched
from tests.integration.test_rpc_interop import GrpcioHealth, grpcio_server

pytestmark = pytest.mark.timeout(60)
DOMAIN = "lab.example"
SERVING = HealthCheckResponse.SERVING
HOUR = datetime.timedelta(hours=1)


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    """Every log record at INFO and above: message plus bound fields."""
    found: list[dict[str, Any]] = []
    sink = logger.add(
        lambda m: found.append({"message": m.record["message"], **m.record["extra"]}),
        level="INFO",
    )
    try:
        yield found
    finally:
        logger.remove(sink)


def serial(identity: Identity | None) -> int:
    assert identity is not None
    return identity.svid.leaf.serial_number


# -- the Workload API ------------------------------------------------------------------------------


@asynccontextmanager
async def workload_api(issuer: Issuer, path: str, workload: str) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_workload_api, issuer, {path: workload}))
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def test_workload_api_first_svid_rotation_and_a_server_that_comes_back(
    sockdir: str, records: list[dict[str, Any]]
) -> None:
    issuer = Issuer(LabCa.create(DOMAIN), ("/proxy",), HOUR)
    socket = f"{sockdir}/agent.sock"
    identity: Watched[Identity | None] = Watched(None)
    async with trio.open_nursery() as nursery:
        async with workload_api(issuer, socket, "/proxy"):
            with trio.fail_after(5):
                await nursery.start(
                    partial(follow_workload_api, f"unix://{socket}", identity, max_backoff=0.2)
                )
            assert identity.value is not None
            assert identity.value.spiffe_id == SpiffeId(DOMAIN, "/proxy")
            assert set(identity.value.bundles) == {DOMAIN}
            first = serial(identity.value)
            issuer.rotate()
            with trio.fail_after(5):
                rotated = await identity.wait_change(identity.value)
            assert serial(rotated) != first
        # The agent is gone: the identity stays; it comes back: rotations arrive again.
        await trio.sleep(0.5)
        assert identity.value is rotated
        async with workload_api(issuer, socket, "/proxy"):
            issuer.rotate()
            with trio.fail_after(5):
                again = await identity.wait_change(rotated)
            assert serial(again) not in (first, serial(rotated))
        nursery.cancel_scope.cancel()
    messages = [r["message"] for r in records]
    assert messages.count("identity") == 1
    assert messages.count("identity rotated") == 2
    # One line per outage (the second: the end of the test), not one per retry.
    assert messages.count("Workload API unavailable") == 2
    assert messages.count("Workload API available again") == 1


async def test_workload_api_refuses_a_call_without_the_security_header(sockdir: str) -> None:
    issuer = Issuer(LabCa.create(DOMAIN), ("/proxy",), HOUR)
    socket = f"{sockdir}/agent.sock"
    async with workload_api(issuer, socket, "/proxy"):
        async with open_channel(f"unix://{socket}") as channel:
            stub = SpiffeWorkloadAPIStub(channel)
            with pytest.raises(InvalidArgumentError, match="security header missing"):
                async with server_stream(stub.FetchX509SVID, X509SVIDRequest()) as responses:
                    async for _ in responses:
                        pass

        # grpcio (what the `spiffe` package and SPIRE's own tooling use) with the header.
        def fetch() -> str:
            with grpc.insecure_channel(f"unix://{socket}") as channel:
                call = channel.unary_stream(
                    "/SpiffeWorkloadAPI/FetchX509SVID",
                    request_serializer=X509SVIDRequest.SerializeToString,
                    response_deserializer=X509SVIDResponse.FromString,
                )
                stream = call(X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),))
                first = next(iter(stream))
                stream.cancel()
                return str(first.svids[0].spiffe_id)

        assert await trio.to_thread.run_sync(fetch) == f"spiffe://{DOMAIN}/proxy"


# -- files -----------------------------------------------------------------------------------------


async def test_file_source_reads_follows_a_rotation_and_keeps_the_last_good(
    sockdir: str, records: list[dict[str, Any]]
) -> None:
    ca = LabCa.create(DOMAIN)
    directory = Path(sockdir)
    chain, key, bundle = ca.write_files(directory, "/proxy")
    identity: Watched[Identity | None] = Watched(None)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(5):
            await nursery.start(partial(follow_files, chain, key, bundle, identity, interval=0.05))
        first = serial(identity.value)
        ca.write_files(directory, "/proxy")  # rotated (cert-manager renews in place)
        with trio.fail_after(5):
            rotated = await identity.wait_change(identity.value)
        assert serial(rotated) != first
        chain.write_text("half written")
        await trio.sleep(0.3)
        assert identity.value is rotated  # kept
        ca.write_files(directory, "/proxy")
        with trio.fail_after(5):
            await identity.wait_change(rotated)
        nursery.cancel_scope.cancel()
    errors = [r for r in records if r["message"].startswith("identity files unusable")]
    assert len(errors) == 1 and "svid.pem" in errors[0]["reason"], errors


# -- mutual TLS ------------------------------------------------------------------------------------


def spiffe_tls(identity: Identity, authorizer: Authorizer | None = None) -> SpiffeTls:
    return SpiffeTls(Watched(identity), authorizer)


@asynccontextmanager
async def health_server(path: str, tls: SpiffeTls) -> AsyncIterator[None]:
    servicer = HealthServicer(Health(probes={}))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(Server([servicer]).serve_unix, path, ssl_context=tls.server()))
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


async def check(path: str, tls: SpiffeTls) -> int:
    async with open_channel(f"unix://{path}", ssl_context=tls.client()) as channel:
        with trio.fail_after(5):
            reply = await HealthStub(channel).Check(HealthCheckRequest())
        assert reply.status == SERVING
        der = channel.connection.peer.certificate_der
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number


async def test_mtls_accepts_the_trust_domain_and_refuses_each_bad_peer_once_with_the_reason(
    sockdir: str, records: list[dict[str, Any]]
) -> None:
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/server.sock"
    now = datetime.datetime.now(datetime.UTC)
    other_ca = LabCa.create(DOMAIN)  # the same trust domain name, another key
    foreign = LabCa.create("other.example")
    async with health_server(path, spiffe_tls(ca.identity("/proxy"))):
        await check(path, spiffe_tls(ca.identity("/nsmgr")))
        bad_clients = {
            # Each presents a bad certificate but trusts ours: the server is the one to refuse.
            "another CA": Identity(other_ca.issue("/nsmgr"), {DOMAIN: ca.bundle}),
            "another trust domain": Identity(
                foreign.issue("/nsmgr"), {DOMAIN: ca.bundle, "other.example": foreign.bundle}
            ),
            "expired": ca.identity("/nsmgr", not_before=now - 2 * HOUR, lifetime=HOUR),
            "not yet valid": ca.identity("/nsmgr", not_before=now + HOUR),
        }
        refusals: dict[str, str] = {}
        for what, client in bad_clients.items():
            del records[:]
            authorizer = Authorizer(trust_domains=frozenset({DOMAIN, "other.example"}))
            with pytest.raises(UnavailableError):
                await check(path, spiffe_tls(client, authorizer))
            await trio.sleep(0.05)  # the server's log line
            refused = [r for r in records if r["message"].startswith("TLS")]
            assert len(refused) == 1, (what, refused)
            refusals[what] = str(refused[0]["reason"])
        # No client certificate at all.
        del records[:]
        bare = _context_without_certificate(ca)
        with pytest.raises(UnavailableError), trio.fail_after(5):
            async with open_channel(f"unix://{path}", ssl_context=bare) as channel:
                await HealthStub(channel).Check(HealthCheckRequest())
        await trio.sleep(0.05)
        refused = [r for r in records if r["message"].startswith("TLS")]
        assert len(refused) == 1, refused
        refusals["no certificate"] = str(refused[0]["reason"])
    for what, reason in refusals.items():
        print(f"{what}: {reason}")
    assert "certificate verify failed" in refusals["another CA"]
    assert "certificate verify failed" in refusals["another trust domain"]
    assert "expired" in refusals["expired"]
    assert "not yet valid" in refusals["not yet valid"]
    assert "certificate" in refusals["no certificate"]


def _context_without_certificate(ca: LabCa) -> ssl.SSLContext:
    context = base_context(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.bundle.der())
    return context


async def test_authorization_by_spiffe_id_on_both_sides(
    sockdir: str, records: list[dict[str, Any]]
) -> None:
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/server.sock"
    only_nsmgr = Authorizer.parse([f"spiffe://{DOMAIN}/nsmgr"])
    async with health_server(path, spiffe_tls(ca.identity("/proxy"), only_nsmgr)):
        await check(path, spiffe_tls(ca.identity("/nsmgr")))
        del records[:]
        with pytest.raises(UnavailableError):
            await check(path, spiffe_tls(ca.identity("/intruder")))
        await trio.sleep(0.05)
        [refused] = [r for r in records if r["message"] == "TLS peer refused"]
        assert "spiffe://lab.example/intruder is not authorized" in refused["reason"]
        # The client side checks the server's ID the same way.
        only_other = Authorizer.parse([f"spiffe://{DOMAIN}/other"])
        with pytest.raises(UnavailableError, match=r"lab\.example/proxy is not authorized"):
            await check(path, spiffe_tls(ca.identity("/nsmgr"), only_other))


async def test_a_rotated_svid_is_used_by_new_connections_and_old_ones_keep_working(
    sockdir: str,
) -> None:
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/server.sock"
    server_identity: Watched[Identity | None] = Watched(ca.identity("/proxy"))
    server = SpiffeTls(server_identity)
    client = spiffe_tls(ca.identity("/nsmgr"))
    async with (
        health_server(path, server),
        open_channel(f"unix://{path}", ssl_context=client.client()) as established,
    ):
        stub = HealthStub(established)
        assert (await stub.Check(HealthCheckRequest())).status == SERVING
        before = established.connection.peer.certificate_der
        server_identity.set(ca.identity("/proxy"))  # rotated
        after = await check(path, client)  # a new connection: the new SVID
        assert before is not None
        assert after != x509.load_der_x509_certificate(before).serial_number
        assert after == serial(server_identity.value)
        with trio.fail_after(5):  # the established one still works
            assert (await stub.Check(HealthCheckRequest())).status == SERVING


# -- grpcio over mTLS with SPIFFE SVIDs ------------------------------------------------------------


def grpcio_credentials(ca: LabCa, identity: Identity) -> Any:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.bundle.authorities[0].public_bytes(serialization.Encoding.PEM),
        private_key=identity.svid.key_pem(),
        certificate_chain=identity.svid.chain_pem(),
    )


async def test_grpcio_client_to_our_server_over_mtls(sockdir: str) -> None:
    """grpcio checks the server's host name: the server SVID carries a DNS SAN beside its URI
    (as SPIRE's dns_names give), the client reaches it as that name."""
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/server.sock"
    server = Identity(ca.issue("/proxy", dns_names=("proxy.lab",)), {DOMAIN: ca.bundle})
    async with health_server(path, spiffe_tls(server)):

        def call(identity: Identity) -> grpc.StatusCode | int:
            options = (("grpc.ssl_target_name_override", "proxy.lab"),)
            credentials = grpcio_credentials(ca, identity)
            with grpc.secure_channel(f"unix://{path}", credentials, options) as channel:
                stub = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=HealthCheckRequest.SerializeToString,
                    response_deserializer=HealthCheckResponse.FromString,
                )
                try:
                    return int(stub(HealthCheckRequest(), timeout=5).status)
                except grpc.RpcError as exc:
                    return exc.code()

        assert await trio.to_thread.run_sync(call, ca.identity("/nsmgr")) == SERVING
        refused = await trio.to_thread.run_sync(call, LabCa.create(DOMAIN).identity("/nsmgr"))
        assert refused == grpc.StatusCode.UNAVAILABLE


async def test_our_client_to_a_grpcio_server_over_mtls(sockdir: str) -> None:
    ca = LabCa.create(DOMAIN)
    server_identity = ca.identity("/nsmgr")
    credentials = grpc.ssl_server_credentials(
        [(server_identity.svid.key_pem(), server_identity.svid.chain_pem())],
        root_certificates=ca.bundle.authorities[0].public_bytes(serialization.Encoding.PEM),
        require_client_auth=True,
    )
    path = f"{sockdir}/grpcio.sock"
    with grpcio_server(GrpcioHealth(), f"unix://{path}", credentials):
        assert await check(path, spiffe_tls(ca.identity("/proxy"))) == serial(server_identity)
        with pytest.raises(UnavailableError):
            await check(path, spiffe_tls(LabCa.create(DOMAIN).identity("/proxy")))
