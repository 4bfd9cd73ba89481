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

import pytest
import trio

from proxy.api.networkservice import networkservice_grpc
from proxy.api.networkservice.connection_pb2 import Connection, PathSegment
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.lab.spiffe_ca import LabCa
from proxy.nsm.hoptoken import Signer, sign_request
from proxy.nsm.path import server_hop
from proxy.rpc import CallContext, RpcFailedError, Server, StatusCode, open_channel
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
        )

    lb, intruder = ca.identity("/load-balancer"), ca.identity("/intruder")
    guard.registered("lb0", call(lb, registered=False))
    assert call(lb, registered=True) == f"spiffe://{DOMAIN}/load-balancer"  # a refresh
    with pytest.raises(PermissionDeniedError, match="client_allowed"):
        call(intruder, registered=True)
    with pytest.raises(PermissionDeniedError, match="caller token"):
        call(lb, registered=True, metadata=())
    guard.unregistered("lb0")
    assert call(intruder, registered=False) == f"spiffe://{DOMAIN}/intruder"  # free again
