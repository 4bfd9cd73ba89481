"""TLS for gRPC: contexts with ALPN h2 on both sides, TLS >= 1.2 and only the trust we are given;
and `Tls`, the settings a channel or server uses for each new connection.

grpcio refuses a TLS peer that does not select ALPN "h2" ("missing selected ALPN property"), and
`ssl.create_default_context` would trust the system's public CAs: both are avoided here. The
builders below take files or PEM text; SPIFFE identities build theirs in `proxy.security.tls`
on `base_context`.

`Tls.context` is asked for at each new connection, so a rotated certificate is used from the
next connection on while the ones in use keep theirs. `Tls.refusal` runs after the handshake
(the chain is verified by then) and returns why the peer is refused, or None: SPIFFE
authorization by ID plugs in there without the RPC layer knowing SPIFFE.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import attrs

from proxy.rpc.connection import Peer

__all__ = ["Tls", "as_tls", "base_context", "client_context", "server_context"]


def base_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context` with what every gRPC TLS context here needs: TLS 1.2 at least, ALPN h2."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def server_context(
    *, certfile: str, keyfile: str, trusted_ca_pem: str | None = None
) -> ssl.SSLContext:
    """A server context; with `trusted_ca_pem`, clients must present a certificate it signed."""
    context = base_context(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(certfile, keyfile)
    if trusted_ca_pem is not None:
        context.load_verify_locations(cadata=trusted_ca_pem)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    *,
    trusted_ca_pem: str,
    certfile: str | None = None,
    keyfile: str | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context trusting only `trusted_ca_pem`, with an optional client certificate.

    `check_hostname=False` is for identities that are not host names (SPIFFE IDs are checked
    on the URI SAN by the caller instead).
    """
    context = base_context(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = check_hostname
    context.load_verify_locations(cadata=trusted_ca_pem)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


def _anyone(_: Peer) -> str | None:
    return None


@attrs.frozen
class Tls:
    context: Callable[[], ssl.SSLContext]  # for the next connection
    refusal: Callable[[Peer], str | None] = _anyone  # after the handshake: why not, or None

    @classmethod
    def fixed(cls, context: ssl.SSLContext) -> Tls:
        return cls(lambda: context)


def as_tls(value: ssl.SSLContext | Tls | None) -> Tls | None:
    """A plain SSLContext (a fixed one, any verified peer) as Tls; Tls and None as they are."""
    if isinstance(value, ssl.SSLContext):
        return Tls.fixed(value)
    if value is not None and not isinstance(value, Tls):
        raise TypeError(f"TLS settings must be an SSLContext or Tls, not {type(value).__name__}")
    return value
