"""TLS contexts for gRPC: ALPN h2 on both sides, TLS >= 1.2, only the trust we are given.

grpcio refuses a TLS peer that does not select ALPN "h2" ("missing selected ALPN property"), and
`ssl.create_default_context` would trust the system's public CAs: both are avoided here. The
SPIFFE identity source and peer authorization by SPIFFE ID come with the security issue; these
builders take files or PEM text.
"""

from __future__ import annotations

import ssl


def _base(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    return context


def server_context(
    *, certfile: str, keyfile: str, trusted_ca_pem: str | None = None
) -> ssl.SSLContext:
    """A server context; with `trusted_ca_pem`, clients must present a certificate it signed."""
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
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
    context = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    context.check_hostname = check_hostname
    context.load_verify_locations(cadata=trusted_ca_pem)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context
