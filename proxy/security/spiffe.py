"""SPIFFE identities as values: IDs, X.509-SVIDs, trust bundles, and what the Workload API sends.

Pure: parsing and checks only, no I/O. Everything that is wrong raises `IdentityError` with a
message that says what and where, because it ends in a log line an operator has to act on.

* `SpiffeId`: `spiffe://<trust domain>/<path>`, validated as the SPIFFE ID specification says
  (lower-case trust domain of letters, digits, `.`, `-`, `_`; path segments of letters, digits,
  `.`, `-`, `_`, none empty, `.` or `..`; no port, user info, query or fragment).
* `Svid`: the certificate chain (leaf first), its private key and the leaf's SPIFFE ID (its one
  URI SAN), checked to belong together.
* `Bundle`: the CA certificates of one trust domain.
* `Identity`: the default SVID and the bundles to trust (its own trust domain's, and federated
  ones), which is what one Workload API response (or a set of files) gives.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "Bundle",
    "Identity",
    "IdentityError",
    "PrivateKey",
    "SpiffeId",
    "Svid",
    "certificate_spiffe_id",
    "identity_from_response",
    "split_der",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
SCHEME = "spiffe://"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_ID_LENGTH = 2048  # the specification's limit for a SPIFFE ID's URI


class IdentityError(ValueError):
    """An identity, certificate, key or bundle that cannot be used; the message says why."""


@attrs.frozen(order=True)
class SpiffeId:
    trust_domain: str
    path: str = ""  # "" or "/seg/seg"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if len(text) > MAX_ID_LENGTH:
            raise IdentityError(f"SPIFFE ID longer than {MAX_ID_LENGTH} characters")
        if not text.startswith(SCHEME):
            raise IdentityError(f"{text[:80]!r} is not a SPIFFE ID (no spiffe:// scheme)")
        rest = text[len(SCHEME) :]
        domain, slash, path = rest.partition("/")
        if not domain:
            raise IdentityError(f"{text[:80]!r}: no trust domain")
        if not _TRUST_DOMAIN.fullmatch(domain):
            raise IdentityError(
                f"{text[:80]!r}: trust domain {domain[:80]!r} may hold only lower-case letters,"
                " digits, '.', '-' and '_' (no port, user info or upper case)"
            )
        if not slash:
            return cls(domain)
        for segment in path.split("/"):
            if segment in ("", ".", ".."):
                raise IdentityError(f"{text[:80]!r}: empty, '.' or '..' path segment")
            if not _SEGMENT.fullmatch(segment):
                raise IdentityError(
                    f"{text[:80]!r}: path segment {segment[:40]!r} may hold only letters,"
                    " digits, '.', '-' and '_' (no query or fragment)"
                )
        return cls(domain, "/" + path)

    @classmethod
    def of_trust_domain(cls, text: str) -> SpiffeId:
        """A trust domain given as `example.org` or `spiffe://example.org`."""
        parsed = cls.parse(text if text.startswith(SCHEME) else SCHEME + text)
        if parsed.path:
            raise IdentityError(f"{text[:80]!r} is a workload ID, not a trust domain")
        return parsed

    @property
    def trust_domain_id(self) -> str:
        return SCHEME + self.trust_domain

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def split_der(data: bytes, what: str = "certificates") -> list[bytes]:
    """Concatenated ASN.1 DER values (the Workload API's form of chains and bundles), one by
    one: each is a SEQUENCE whose length is in its header."""
    values: list[bytes] = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise IdentityError(f"{what}: not DER at byte {offset}")
        first = data[offset + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or offset + 2 + count > len(data):
                raise IdentityError(f"{what}: bad DER length at byte {offset}")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header = 2 + count
        end = offset + header + length
        if end > len(data):
            raise IdentityError(f"{what}: truncated DER at byte {offset}")
        values.append(data[offset:end])
        offset = end
    return values


def _certificates(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in split_der(data, what))
    except ValueError as exc:
        if isinstance(exc, IdentityError):
            raise
        raise IdentityError(f"{what}: {exc}") from None


def certificate_spiffe_id(certificate: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of an X.509-SVID: its one URI SAN (the SVID specification allows no more)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the certificate has no subject alternative name") from None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise IdentityError(f"the certificate has {len(uris)} URI SANs, an SVID has exactly one")
    return SpiffeId.parse(uris[0])


def _public_bytes(key: Any) -> bytes:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bytes(key.public_bytes(der, spki))


@attrs.frozen
class Svid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # the leaf first
    key: PrivateKey
    hint: str = ""

    @classmethod
    def from_der(cls, chain_der: bytes, key_der: bytes, hint: str = "") -> Svid:
        chain = _certificates(chain_der, "SVID certificate chain")
        if not chain:
            raise IdentityError("SVID certificate chain is empty")
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"SVID private key (PKCS#8 DER): {exc}") from None
        return cls.checked(chain, key, hint)

    @classmethod
    def checked(cls, chain: Iterable[x509.Certificate], key: Any, hint: str = "") -> Svid:
        chain = tuple(chain)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise IdentityError(f"SVID private key of type {type(key).__name__} is not supported")
        leaf = chain[0]
        if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
            raise IdentityError("the SVID private key does not match its certificate")
        spiffe_id = certificate_spiffe_id(leaf)
        if not spiffe_id.path:
            raise IdentityError(f"SVID {spiffe_id} names a trust domain, not a workload")
        return cls(spiffe_id, chain, key, hint)

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@attrs.frozen
class Bundle:
    trust_domain: str
    authorities: tuple[x509.Certificate, ...]

    @classmethod
    def from_der(cls, trust_domain: str, data: bytes) -> Bundle:
        domain = SpiffeId.of_trust_domain(trust_domain).trust_domain
        authorities = _certificates(data, f"bundle of {domain}")
        if not authorities:
            raise IdentityError(f"the bundle of {domain} holds no certificate")
        return cls(domain, authorities)

    def der(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.authorities)


@attrs.frozen
class Identity:
    """Who we are (the default SVID) and whom we trust (bundles by trust domain name)."""

    svid: Svid
    bundles: Mapping[str, Bundle]

    @property
    def spiffe_id(self) -> SpiffeId:
        return self.svid.spiffe_id

    @property
    def own_bundle(self) -> Bundle:
        return self.bundles[self.svid.spiffe_id.trust_domain]

    def describe(self) -> str:
        """For logs: the ID, the leaf's validity, and the trusted domains."""
        leaf = self.svid.leaf
        return (
            f"{self.spiffe_id} (serial {leaf.serial_number:x}, valid"
            f" {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to"
            f" {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}), trusting"
            f" {', '.join(sorted(self.bundles))}"
        )


def identity_from_response(response: Any) -> Identity:
    """The Identity in a Workload API X509SVIDResponse: its first (default) SVID, the bundle of
    that SVID's trust domain, and the federated bundles."""
    if not response.svids:
        raise IdentityError("the Workload API sent no SVID")
    first = response.svids[0]
    svid = Svid.from_der(first.x509_svid, first.x509_svid_key, first.hint)
    if first.spiffe_id and SpiffeId.parse(first.spiffe_id) != svid.spiffe_id:
        raise IdentityError(
            f"the Workload API says {first.spiffe_id[:80]!r} but the certificate is"
            f" {svid.spiffe_id}"
        )
    own = svid.spiffe_id.trust_domain
    bundles = {own: Bundle.from_der(own, first.bundle)}
    for domain, data in response.federated_bundles.items():
        bundle = Bundle.from_der(domain, data)
        bundles.setdefault(bundle.trust_domain, bundle)
    return Identity(svid, bundles)
