"""Mutual TLS with SPIFFE identities: SSL contexts from an Identity, and who may talk to us.

What go-spiffe's `tlsconfig.MTLSClientConfig`/`MTLSServerConfig` do, on Python's ssl:

* both sides present their X.509-SVID and require the peer's; the peer's chain is verified
  against the trust bundles (only those of the trust domains we authorize: a CA we would
  refuse anyway is not trusted at all); no host name check (a SPIFFE peer is named by the URI
  SAN, not by DNS); ALPN `h2` (grpc-go and grpcio refuse TLS without it); TLS 1.2 at least;
* after the handshake, `Authorizer.refusal` checks the peer's SPIFFE ID: by default any ID in
  our own trust domain (upstream authorizes any ID the bundle vouches for, and the bundle is
  the trust domain's), or a configured list of IDs and trust domains.

Python's ssl loads a certificate chain and key only from files: they are written to an
anonymous memory file (`os.memfd_create`) and loaded through /proc/self/fd, never to disk.
Contexts are built again from each new Identity (rotation); a connection keeps the context it
was made with, so rotation never breaks a connection in use.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import weakref
from collections.abc import Iterable, Iterator

import attrs
from cryptography import x509

from proxy.rpc.connection import Peer
from proxy.rpc.tls import Tls, base_context
from proxy.security.spiffe import Identity, IdentityError, SpiffeId, certificate_spiffe_id
from proxy.watched import Watched

__all__ = ["Authorizer", "SpiffeTls", "client_context", "peer_refusal", "server_context"]


@attrs.frozen
class Authorizer:
    """Which peers we accept: these SPIFFE IDs, and any ID of these trust domains."""

    ids: frozenset[SpiffeId] = frozenset()
    trust_domains: frozenset[str] = frozenset()

    @classmethod
    def trust_domain_of(cls, identity: Identity) -> Authorizer:
        """Upstream's default: any workload of our own trust domain."""
        return cls(trust_domains=frozenset({identity.spiffe_id.trust_domain}))

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Authorizer:
        """`spiffe://domain/path` is one ID; `spiffe://domain` or `domain` a whole domain."""
        ids, domains = set(), set()
        for entry in entries:
            text = entry.strip()
            parsed = SpiffeId.parse(text if text.startswith("spiffe://") else "spiffe://" + text)
            if parsed.path:
                ids.add(parsed)
            else:
                domains.add(parsed.trust_domain)
        if not ids and not domains:
            raise IdentityError("no SPIFFE ID or trust domain to authorize")
        return cls(frozenset(ids), frozenset(domains))

    @property
    def domains(self) -> frozenset[str]:
        """Every trust domain some authorized peer may come from."""
        return self.trust_domains | {spiffe_id.trust_domain for spiffe_id in self.ids}

    def refusal(self, peer: SpiffeId) -> str | None:
        """None when `peer` may talk to us, else why not."""
        if peer in self.ids or peer.trust_domain in self.trust_domains:
            return None
        allowed = sorted([*map(str, self.ids), *(f"spiffe://{d}/*" for d in self.trust_domains)])
        return f"SPIFFE ID {peer} is not authorized (allowed: {', '.join(allowed)})"

    def describe(self) -> str:
        return ", ".join(
            sorted([*map(str, self.ids), *(f"spiffe://{d} (any ID)" for d in self.trust_domains)])
        )


def peer_refusal(certificate_der: bytes | None, authorizer: Authorizer) -> str | None:
    """After the TLS handshake verified the peer's chain: None when its SVID's SPIFFE ID is
    authorized, else why not (no certificate, no or several URI SANs, not authorized)."""
    if not certificate_der:
        return "the peer presented no certificate"
    try:
        peer = certificate_spiffe_id(x509.load_der_x509_certificate(certificate_der))
    except (IdentityError, ValueError) as exc:
        return f"the peer's certificate is not an X.509-SVID: {exc}"
    return authorizer.refusal(peer)


def client_context(identity: Identity, authorizer: Authorizer) -> ssl.SSLContext:
    """For dialing a peer: our SVID presented, the peer's verified and required."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, identity, authorizer)


def server_context(identity: Identity, authorizer: Authorizer) -> ssl.SSLContext:
    """For serving: our SVID presented, a client certificate required and verified."""
    return _context(ssl.PROTOCOL_TLS_SERVER, identity, authorizer)


def _context(protocol: int, identity: Identity, authorizer: Authorizer) -> ssl.SSLContext:
    context = base_context(ssl.SSLContext(protocol))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    trusted = [
        bundle.der() for domain, bundle in identity.bundles.items() if domain in authorizer.domains
    ]
    if not trusted:
        raise IdentityError(
            f"no trust bundle for the authorized trust domains"
            f" ({', '.join(sorted(authorizer.domains))}); bundles held:"
            f" {', '.join(sorted(identity.bundles))}"
        )
    context.load_verify_locations(cadata=b"".join(trusted))
    with (
        _memory_file(identity.svid.chain_pem()) as chain,
        _memory_file(identity.svid.key_pem()) as key,
    ):
        context.load_cert_chain(chain, key)
    return context


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    """A path to `data` that lives in memory only (for ssl's file-only loaders)."""
    fd = os.memfd_create("meridio-proxy-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


class SpiffeTls:
    """`Tls` settings for clients and servers that follow a changing identity: the contexts
    are built once per identity (so a rotation takes effect at the next connection) and every
    peer is checked by `authorizer` (default: any ID of our own trust domain)."""

    def __init__(
        self, identity: Watched[Identity | None], authorizer: Authorizer | None = None
    ) -> None:
        self._identity = identity
        self._authorizer = authorizer
        self._built: tuple[Identity, ssl.SSLContext, ssl.SSLContext] | None = None
        # Which identity each context was built from: a connection keeps its context across
        # rotations, and what is signed for that connection must match its certificate.
        self._sources: weakref.WeakKeyDictionary[ssl.SSLContext, Identity] = (
            weakref.WeakKeyDictionary()
        )

    @property
    def identity(self) -> Watched[Identity | None]:
        """The identity followed (also what NSM's tokens are signed with)."""
        return self._identity

    def identity_of(self, context: ssl.SSLContext | None) -> Identity | None:
        """The identity `context` (one of ours) presents; None for another context."""
        return self._sources.get(context) if context is not None else None

    def authorizer(self) -> Authorizer:
        return self._authorizer or Authorizer.trust_domain_of(self._current())

    def client(self) -> Tls:
        return Tls(lambda: self._contexts()[0], self.refusal)

    def server(self) -> Tls:
        return Tls(lambda: self._contexts()[1], self.refusal)

    def refusal(self, peer: Peer) -> str | None:
        return peer_refusal(peer.certificate_der, self.authorizer())

    def _current(self) -> Identity:
        identity = self._identity.value
        if identity is None:
            raise IdentityError("no identity yet")  # the sources start their users after one
        return identity

    def _contexts(self) -> tuple[ssl.SSLContext, ssl.SSLContext]:
        identity = self._current()
        if self._built is None or self._built[0] is not identity:
            authorizer = self.authorizer()
            client = client_context(identity, authorizer)
            server = server_context(identity, authorizer)
            self._built = (identity, client, server)
            self._sources[client] = self._sources[server] = identity
        return self._built[1], self._built[2]
