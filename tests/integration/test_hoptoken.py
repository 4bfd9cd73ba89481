"""NSM's per-hop tokens over real mutual-TLS sockets (proxy.nsm.hoptoken): a client signs its
segment and the call's metadata for the peer it reached; a server puts the caller's token in
place, signs its own, and applies NSM's policies. Good calls pass; a missing, tampered,
expired or mis-chained token, or one signed by someone else than the TLS peer, is
PERMISSION_DENIED with the policy that failed."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Literal

import pytest
import trio
from google.protobuf.empty_pb2 import Empty

from proxy.api.networkservice import networkservice_grpc
from proxy.api.networkservice.connection_pb2 import Connection, PathSegment
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.lab.spiffe_ca import LabCa
from proxy.nsm.hoptoken import Signer, sign_request
from proxy.nsm.path import server_hop
from proxy.rpc import CallContext, RpcFailedError, Server, StatusCode, open_channel, unary_call
from proxy.security.spiffe import Identity
from proxy.security.tls import SpiffeTls
from proxy.security.tokens import Token, generate, token_metadata
from proxy.watched import Watched

pytestmark = pytest.mark.timeout(30)
DOMAIN = "lab.example"
SERVICE = "proxy.conduit-a.trench-a.red"


class CheckingEndpoint(networkservice_grpc.NetworkServiceServicer):  # type: ignore[misc]
    """updatepath, then the tokens; answers with the connection as this hop has it."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        hop = server_hop(message.connection, "endpoint")
        self.signer.server_check(hop.connection, request.custom_metadata, request.peer)
        return hop.answer(hop.connection)

    async def Close(self, message: Connection, request: CallContext) -> Empty:
        hop = server_hop(message, "endpoint")
        self.signer.server_check(
            hop.connection, request.custom_metadata, request.peer, closing=True
        )
        return Empty()


def token(key_of: Identity, claims_of: Identity, peer_id: str, now: datetime.datetime) -> Token:
    """A token claiming to be `claims_of`'s, for `peer_id`, signed with `key_of`'s key."""
    return generate(
        key_of.svid.key,
        own_id=str(claims_of.spiffe_id),
        own_not_after=claims_of.svid.not_after,
        now=now,
        max_lifetime=datetime.timedelta(minutes=1),
        peer_id=peer_id,
        peer_not_after=claims_of.svid.not_after,
    )


def signer(identity: Identity, lifetime: float = 60.0, **kwargs: object) -> Signer:
    return Signer(Watched(identity), lifetime, **kwargs)  # type: ignore[arg-type]


@asynccontextmanager
async def endpoint(path: str, identity: Identity) -> AsyncIterator[None]:
    tls = SpiffeTls(Watched(identity))
    servicer = CheckingEndpoint(signer(identity))
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(Server([servicer]).serve_unix, path, ssl_context=tls.server()))
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


def request() -> NetworkServiceRequest:
    connection = Connection(id="tg0-red-0", network_service=SERVICE)
    connection.path.path_segments.append(PathSegment(name="tg0", id="tg0-red-0"))
    return NetworkServiceRequest(connection=connection)


async def call(
    path: str, identity: Identity, metadata: object = None, sign: Signer | None = None
) -> Connection:
    tls = SpiffeTls(Watched(identity))
    async with open_channel(f"unix://{path}", ssl_context=tls.client()) as channel:
        message = request()
        signed = sign_request(sign or signer(identity), message.connection, channel)
        with trio.fail_after(5):
            stub = networkservice_grpc.NetworkServiceStub(channel)
            answer: Connection = await stub.Request(
                message, metadata=signed if metadata is None else metadata
            )
        return answer


async def denied(*args: object, **kwargs: object) -> str:
    with pytest.raises(RpcFailedError) as refused:
        await call(*args, **kwargs)  # type: ignore[arg-type]
    assert refused.value.status.status_code == StatusCode.PERMISSION_DENIED
    message = str(refused.value.status.status_message)
    print(message)
    return message


async def test_a_signed_call_passes_and_carries_a_chained_path(sockdir: str) -> None:
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/endpoint.sock"
    async with endpoint(path, ca.identity("/proxy")):
        answer = await call(path, ca.identity("/target"))
    tokens = [segment.token for segment in answer.path.path_segments]
    assert len(tokens) == 2 and all(tokens)
    assert answer.path.path_segments[1].expires.seconds > 0


async def test_bad_tokens_are_permission_denied_with_the_policy(sockdir: str) -> None:
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/endpoint.sock"
    client = ca.identity("/target")
    now = datetime.datetime.now(datetime.UTC)
    async with endpoint(path, ca.identity("/proxy")):
        assert "caller token" in await denied(path, client, metadata=())
        proxy_id = f"spiffe://{DOMAIN}/proxy"
        good = token(client, client, proxy_id, now)
        (key, value), expires = token_metadata(good)
        header, payload, signature = value.split(".")
        tampered = ((key, f"{header}.{payload[:-2]}AA.{signature}"), expires)
        assert "tokens_valid" in await denied(path, client, metadata=tampered)
        past = signer(client, clock=lambda: now - datetime.timedelta(hours=1))
        assert "tokens_expired" in await denied(path, client, sign=past)
        elsewhere = token(client, client, f"spiffe://{DOMAIN}/someone-else", now)
        assert "tokens_chained" in await denied(path, client, metadata=token_metadata(elsewhere))
        # Signed by another workload than the TLS peer (a token passed on by a third party).
        stolen = token_metadata(token(ca.identity("/thief"), client, proxy_id, now))
        assert "prev_token_signed" in await denied(path, client, metadata=stolen)


async def test_a_close_for_a_client_whose_token_expired_passes_a_request_does_not(
    sockdir: str,
) -> None:
    """The manager closes a vanished client's connection when the client's token expires
    (segment 0 here): the Close must get through (sdk issue 1512), a Request with that path
    must not. The manager itself (the caller) signs afresh either way."""
    ca = LabCa.create(DOMAIN)
    path = f"{sockdir}/endpoint.sock"
    target, nsmgr = ca.identity("/target"), ca.identity("/nsmgr")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    expired = token(target, target, str(nsmgr.spiffe_id), long_ago)

    def connection() -> Connection:
        conn = Connection(id="nsmgr-0", network_service=SERVICE)
        conn.path.index = 1
        conn.path.path_segments.append(PathSegment(name="tg0", id="tg0-red-0", token=expired.value))
        conn.path.path_segments.append(PathSegment(name="nsmgr", id="nsmgr-0"))
        return conn

    async with endpoint(path, ca.identity("/proxy")):
        tls = SpiffeTls(Watched(nsmgr))
        async with open_channel(f"unix://{path}", ssl_context=tls.client()) as channel:
            stub = networkservice_grpc.NetworkServiceStub(channel)
            with trio.fail_after(5):
                closing = connection()
                await stub.Close(closing, metadata=sign_request(signer(nsmgr), closing, channel))
                requesting = NetworkServiceRequest(connection=connection())
                metadata = sign_request(signer(nsmgr), requesting.connection, channel)
                with pytest.raises(RpcFailedError, match="tokens_expired") as refused:
                    await stub.Request(requesting, metadata=metadata)
    assert refused.value.status.status_code == StatusCode.PERMISSION_DENIED


def test_registry_guard_keeps_a_name_to_the_id_that_registered_it() -> None:
    """The registry's side (the lab NSM uses it): a valid token signed by the TLS peer, and
    an endpoint name registered by one SPIFFE ID is refreshed and unregistered by it only."""
    from cryptography.hazmat.primitives import serialization

    from proxy.nsm.hoptoken import RegistryGuard
    from proxy.rpc import Peer, PermissionDeniedError

    ca = LabCa.create(DOMAIN)
    registry = ca.identity("/nsmgr")
    guard = RegistryGuard(signer(registry))
    now = datetime.datetime.now(datetime.UTC)

    def call(
        identity: Identity,
        *,
        registered: bool,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> str:
        der = identity.svid.leaf.public_bytes(serialization.Encoding.DER)
        peer = Peer("unix:///x", certificate_der=der)
        sent = token_metadata(token(identity, identity, str(registry.spiffe_id), now))
        return guard.check(
            "lb0",
            sent if metadata is None else metadata,
            peer,
            registered=registered,
        ).caller

    lb, intruder = ca.identity("/load-balancer"), ca.identity("/intruder")
    guard.registered("lb0", call(lb, registered=False))
    assert call(lb, registered=True) == f"spiffe://{DOMAIN}/load-balancer"  # a refresh
    with pytest.raises(PermissionDeniedError, match="client_allowed"):
        call(intruder, registered=True)
    with pytest.raises(PermissionDeniedError, match="caller token"):
        call(lb, registered=True, metadata=())
    guard.unregistered("lb0")
    assert call(intruder, registered=False) == f"spiffe://{DOMAIN}/intruder"  # free again


# -- the registry's path metadata (wire-api §2.5) ------------------------------------------------


async def test_the_registry_path_goes_out_and_comes_back_over_mutual_tls(
    sockdir: str, warnings: list[dict[str, object]]
) -> None:
    """The proxy's registry calls carry the path the registry answered last; the lab registry
    (nsmgr's updatepath and authorize) puts the caller's token and its own in it and answers it
    in the `path` header."""
    from proxy.api.registry import registry_grpc
    from proxy.api.registry.registry_pb2 import NetworkService, NetworkServiceEndpoint
    from proxy.lab.nsm.forwarding import NoKernel
    from proxy.lab.nsm.server import serve_nsm
    from proxy.nsm.registry_client import RegistryClient
    from proxy.security.tokens import RegistryPath, decode

    ca = LabCa.create(DOMAIN)
    proxy, nsmgr = ca.identity("/proxy"), ca.identity("/nsmgr")
    proxy_id, nsmgr_id = str(proxy.spiffe_id), str(nsmgr.spiffe_id)
    socket_path = f"{sockdir}/nsm.sock"
    nse = NetworkServiceEndpoint(name="proxy-a", url="tcp://198.18.0.1:5001")
    nse.expiration_time.seconds = int(datetime.datetime.now(datetime.UTC).timestamp()) + 60
    key: tuple[Literal["endpoint"], str] = ("endpoint", "proxy-a")
    async with trio.open_nursery() as nursery:
        serve = partial(serve_nsm, socket_path, forwarder=NoKernel(), tls=SpiffeTls(Watched(nsmgr)))
        await nursery.start(serve)
        tls = SpiffeTls(Watched(proxy)).client()
        async with open_channel(f"unix://{socket_path}", ssl_context=tls) as channel:
            client = RegistryClient(signer(proxy))
            with trio.fail_after(5):
                await client.register_service(channel, NetworkService(name=SERVICE))
                await client.register_endpoint(channel, nse)
                first = client.paths[key]
                await client.register_endpoint(channel, nse)  # a refresh, with `first`
                second = client.paths[key]
            assert client.paths[("service", SERVICE)].index == 0
            for path in (first, second):
                assert path.index == 0  # at our hop, as the client sees it
                ours, theirs = (decode(token) for token in path.tokens)
                assert (ours.sub, ours.aud) == (proxy_id, (nsmgr_id,))
                assert (theirs.sub, theirs.aud) == (nsmgr_id, (proxy_id,))
            # ECDSA signatures are randomised: both tokens were made again for the refresh.
            assert set(first.tokens).isdisjoint(second.tokens)
            assert warnings == []

            # The path really goes out: one pointing past its segments is refused (UNKNOWN, as
            # the sdk's updatepath errs); the client drops it and the retry starts afresh.
            client.paths[key] = RegistryPath(index=2, tokens=("a", "b"))
            with pytest.raises(RpcFailedError, match="points past") as refused:
                await client.register_endpoint(channel, nse)
            assert refused.value.status.status_code == StatusCode.UNKNOWN
            assert key not in client.paths
            await client.register_endpoint(channel, nse)
            assert len(client.paths[key].tokens) == 2

            # Without path metadata (optional on the wire), nsmgr warns, goes on, and answers
            # no path (its grpcmetadata server skips itself).
            stub = registry_grpc.NetworkServiceEndpointRegistryStub(channel)
            reply = await unary_call(
                stub.Register, nse, metadata=signer(proxy).metadata_for(channel)
            )
            assert reply.header("path") is None
            assert [w["message"] for w in warnings] == ["registration without path metadata"]

            await client.unregister_endpoint(channel, nse)
            assert key not in client.paths
        nursery.cancel_scope.cancel()
