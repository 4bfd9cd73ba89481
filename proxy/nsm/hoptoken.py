"""NSM's per-hop tokens on the proxy's calls and on its endpoint: the sdk's `updatetoken`
(client and server) and `authorize` (server), from the identity the process holds.

* A **client** (the proxy towards nsmgr; a lab target or manager towards the next hop) signs,
  for each call, a token for the TLS peer it reached (`aud` = the peer's SPIFFE ID): it goes
  into the client's own path segment (`token`, `expires`) and into the call's metadata
  (`nsm-client-token`, `nsm-client-token-expires`), as the sdk's updatetoken client and its
  per-RPC credentials do.
* A **server** (the proxy's endpoint; the lab's manager and LBs) puts the caller's metadata
  token into the previous segment, signs its own segment for the caller, and then applies NSM's
  default policies (`proxy.security.policy`): a denial is PERMISSION_DENIED with its reason.

Plain text (no identity) has no tokens: there is no SPIFFE ID to sign for or check against;
`Signer` is then not made at all and callers skip it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta

import attrs
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp
from loguru import logger

from proxy.api.networkservice.connection_pb2 import Connection, PathSegment
from proxy.rpc import Channel, Peer, PermissionDeniedError, RpcFailedError, Status, StatusCode
from proxy.security.policy import (
    Denial,
    ExpiryScope,
    authorize_registration,
    authorize_request,
    registry_caller_id,
)
from proxy.security.spiffe import Identity, IdentityError, certificate_spiffe_id
from proxy.security.tls import SpiffeTls
from proxy.security.tokens import (
    PATH_KEY,
    RegistryPath,
    Token,
    TokenError,
    generate,
    parse_registry_path,
    read_token_metadata,
    registry_path_at_server,
    token_metadata,
)
from proxy.watched import Watched

__all__ = [
    "Admission",
    "RegistryGuard",
    "Signer",
    "call_metadata",
    "peer_certificate",
    "sign_request",
]

Metadata = tuple[tuple[str, str], ...]


def _now() -> datetime:
    return datetime.now(UTC)


def peer_certificate(peer: Peer) -> x509.Certificate | None:
    if not peer.certificate_der:
        return None
    return x509.load_der_x509_certificate(peer.certificate_der)


def _stamp(when: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


@attrs.frozen
class Signer:
    """Signs tokens with an SVID's key, valid at most `max_lifetime` seconds: for a connection,
    the SVID its TLS context presents (`sources`: a token the peer checks against our
    certificate must be signed by that certificate's key, also after a rotation); else the
    current one (`identity`)."""

    identity: Watched[Identity | None]
    max_lifetime: float
    sources: Callable[[ssl.SSLContext | None], Identity | None] = lambda _: None
    clock: Callable[[], datetime] = _now

    @classmethod
    def of(cls, tls: SpiffeTls, max_lifetime: float) -> Signer:
        return cls(tls.identity, max_lifetime, tls.identity_of)

    def token_for(
        self, certificate: x509.Certificate | None, local: ssl.SSLContext | None = None
    ) -> Token:
        """A token for the TLS peer whose leaf is `certificate` (its SPIFFE ID as the
        audience; none without one), signed with the SVID of our end's context `local` when it
        is one of ours."""
        identity = self.sources(local) or self.identity.value
        if identity is None:
            raise IdentityError("no identity to sign with")
        peer_id = peer_not_after = None
        if certificate is not None:
            peer_id = str(certificate_spiffe_id(certificate))
            peer_not_after = certificate.not_valid_after_utc
        return generate(
            identity.svid.key,
            own_id=str(identity.spiffe_id),
            own_not_after=identity.svid.not_after,
            now=self.clock(),
            max_lifetime=timedelta(seconds=self.max_lifetime),
            peer_id=peer_id,
            peer_not_after=peer_not_after,
        )

    # -- client ----------------------------------------------------------------------------------

    def client_call(self, connection: Connection, channel: Channel) -> Metadata:
        """updatetoken client: sign our segment (at `path.index`) for the peer of `channel`;
        the metadata for the call (the same token)."""
        token = self._token_on(channel)
        _set(connection.path.path_segments[connection.path.index], token)
        return token_metadata(token)

    def metadata_for(self, channel: Channel) -> Metadata:
        """The per-RPC token metadata alone (registry calls, MonitorConnections)."""
        return token_metadata(self._token_on(channel))

    def _token_on(self, channel: Channel) -> Token:
        connection = channel.connection
        return self.token_for(peer_certificate(connection.peer), connection.tls_context)

    # -- server ----------------------------------------------------------------------------------

    def server_check(
        self,
        connection: Connection,
        metadata: Iterable[tuple[str, str | bytes]],
        peer: Peer,
        *,
        closing: bool = False,
    ) -> None:
        """updatetoken server, then authorize: `connection` is at our hop (after updatepath);
        the previous segment gets the caller's metadata token, ours a fresh one for the caller;
        PermissionDeniedError with the reason when NSM's policies deny it.

        A Close (`closing`) is checked for expiry from our segment on, as NSM's newer
        `tokens_expired` does (sdk issue 1512): a connection is closed for a client that is
        gone exactly when the client's token has expired (the manager's timeout), and refusing
        that Close would leave its interface and addresses until our own expiry. The caller is
        still authenticated (its token valid, chained and signed by the TLS peer).

        Stricter than the sdk on purpose: a call without exactly one token and one expiry in
        its metadata is refused here, where the sdk's updatetoken server warns and lets the
        path's own token stand (every sdk client sends them, once)."""
        path = connection.path
        if path.index < 1:
            raise PermissionDeniedError("no previous path segment: nobody to authorize")
        try:
            caller = read_token_metadata(metadata)
        except TokenError as exc:
            raise PermissionDeniedError(f"caller token: {exc}") from None
        previous = path.path_segments[path.index - 1]
        previous.token = caller.value
        # To the nanosecond, as sent (a datetime would stop at microseconds).
        previous.expires.CopyFrom(Timestamp(seconds=caller.expires_ns // 1_000_000_000,
                                            nanos=caller.expires_ns % 1_000_000_000))  # fmt: skip
        certificate = peer_certificate(peer)
        _set(path.path_segments[path.index], self.token_for(certificate))
        denial: Denial | None = authorize_request(
            path,
            now=self.clock(),
            peer_certificate=certificate,
            expiry_scope=ExpiryScope.FROM_INDEX if closing else ExpiryScope.LEFT_SIDE,
        )
        if denial is not None:
            logger.warning("close denied" if closing else "request denied",
                           policy=denial.policy.value, reason=denial.reason)  # fmt: skip
            raise PermissionDeniedError(str(denial))


@attrs.frozen
class Admission:
    """A registry call the guard lets through."""

    caller: str  # the caller's SPIFFE ID: `sub` of the path's first token
    # To answer in the `path` header once the call succeeds (at the caller's index); None when
    # the caller sent no usable path (the sdk's grpcmetadata server then answers none).
    path: RegistryPath | None


class RegistryGuard:
    """NSM's registry `updatepath` and `authorize` servers, for registrations (a registry's
    side; the lab NSM uses it).

    The `path` metadata the caller sent (none, or one that does not parse: a warning and a
    fresh path, as nsmgr goes on) gets the caller's metadata token and ours at our hop; the
    tokens must then be valid, unexpired, chained and the caller's signed by the TLS peer; and
    a name registered by one SPIFFE ID (as `registered` records it) may be refreshed or
    unregistered only by that ID (`client_allowed`)."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self.owners: dict[str, tuple[str, ...]] = {}  # name -> SPIFFE IDs that registered it

    def check(
        self,
        name: str,
        metadata: Iterable[tuple[str, str | bytes]],
        peer: Peer,
        *,
        registered: bool,
    ) -> Admission:
        """Whether the caller may register or unregister `name` (`registered`: the registry
        holds it now, kept to its first registrant); PermissionDeniedError
        with the reason when not, UNKNOWN for a path that points past its segments (as the
        sdk's updatepath errs)."""
        metadata = tuple(metadata)
        try:
            caller = read_token_metadata(metadata)
        except TokenError as exc:
            raise PermissionDeniedError(f"caller token: {exc}") from None
        certificate = peer_certificate(peer)
        own = self._signer.token_for(certificate)
        sent = _sent_path(name, metadata)
        try:
            path = registry_path_at_server(sent or RegistryPath(), caller.value, own.value)
        except TokenError as exc:
            raise RpcFailedError(Status(StatusCode.UNKNOWN, f"path metadata: {exc}")) from None
        owners = {name: self.owners[name]} if registered and name in self.owners else {}
        denial = authorize_registration(
            path,
            resource_name=name,
            path_ids=owners,
            now=self._signer.clock(),
            peer_certificate=certificate,
        )
        if denial is not None:
            logger.warning("registration denied", name=name, policy=denial.policy.value,
                           reason=denial.reason)  # fmt: skip
            raise PermissionDeniedError(str(denial))
        answer = attrs.evolve(path, index=path.index - 1) if sent is not None else None
        return Admission(registry_caller_id(path), answer)

    def registered(self, name: str, caller: str) -> None:
        self.owners.setdefault(name, (caller,))

    def unregistered(self, name: str) -> None:
        self.owners.pop(name, None)


def _sent_path(name: str, metadata: Iterable[tuple[str, str | bytes]]) -> RegistryPath | None:
    """The `path` the caller sent (the last value, as the sdk reads it); None, with a warning,
    for none or one that does not parse: the call goes on with a fresh path, as nsmgr's."""
    values = [value for key, value in metadata if key.lower() == PATH_KEY]
    if not values:
        logger.warning("registration without path metadata", name=name)
        return None
    try:
        return parse_registry_path(values[-1])
    except TokenError as exc:
        logger.warning("registration path metadata ignored", name=name, reason=str(exc))
        return None


def _set(segment: PathSegment, token: Token) -> None:
    segment.token = token.value
    segment.expires.CopyFrom(_stamp(token.expires))


def sign_request(signer: Signer | None, connection: Connection, channel: Channel) -> Metadata:
    """Client side of a Request or Close on `channel`: `connection`'s own segment signed and
    the call's metadata; nothing in plain text (`signer` None)."""
    if signer is None:
        return ()
    return signer.client_call(connection, channel)


def call_metadata(signer: Signer | None, channel: Channel) -> Metadata:
    """The token metadata of any other NSM call on `channel` (registry, monitor)."""
    if signer is None:
        return ()
    return signer.metadata_for(channel)
