"""A lab certificate authority for one SPIFFE trust domain: issues X.509-SVIDs as SPIRE does
(P-256 keys, the SPIFFE ID as the one URI SAN, digitalSignature and keyEncipherment, both TLS
client and server use, a short life), for the lab's Workload API server and for tests.

Not for production: the CA key lives in memory (or a file the lab writes with mode 0600).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.security.spiffe import Bundle, Identity, SpiffeId, Svid

__all__ = ["LabCa"]

CA_LIFETIME = datetime.timedelta(days=30)
UTC = datetime.UTC


def _now() -> datetime.datetime:
    return datetime.datetime.now(UTC)


@attrs.frozen
class LabCa:
    trust_domain: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, trust_domain: str, *, now: datetime.datetime | None = None) -> LabCa:
        domain = SpiffeId.of_trust_domain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        start = (now or _now()) - datetime.timedelta(minutes=5)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meridio-proxy lab"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"lab CA {domain.trust_domain}"),
            ]
        )
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(domain.trust_domain_id)]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(domain.trust_domain, certificate, key)

    @property
    def bundle(self) -> Bundle:
        return Bundle(self.trust_domain, (self.certificate,))

    def issue(
        self,
        path: str,
        *,
        lifetime: datetime.timedelta = datetime.timedelta(hours=1),
        not_before: datetime.datetime | None = None,
        spiffe_id: str | None = None,
        dns_names: tuple[str, ...] = (),
    ) -> Svid:
        """An SVID for `spiffe://<trust domain><path>` (or `spiffe_id` as given, to make bad
        ones in tests), valid from `not_before` (default: a minute ago) for `lifetime`; with
        `dns_names` as further SANs (SPIRE's dns_names, for clients that check host names)."""
        uri = spiffe_id or f"spiffe://{self.trust_domain}{path}"
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now() - datetime.timedelta(minutes=1)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(uri), *map(x509.DNSName, dns_names)]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA256())
        )
        return Svid(SpiffeId.parse(uri), (certificate,), key)

    def identity(self, path: str, **issue: object) -> Identity:
        """An SVID for `path` with this CA's bundle (what a Workload API response gives)."""
        svid = self.issue(path, **issue)  # type: ignore[arg-type]
        return Identity(svid, {self.trust_domain: self.bundle})

    def write_files(self, directory: Path, path: str, **issue: object) -> tuple[Path, Path, Path]:
        """An SVID for `path` as PEM files (certificate chain, key with mode 0600, bundle), the
        form the proxy's file identity source reads. The paths, in that order."""
        svid = self.issue(path, **issue)  # type: ignore[arg-type]
        chain, key = directory / "svid.pem", directory / "svid.key"
        bundle = directory / "bundle.pem"
        chain.write_bytes(svid.chain_pem())
        key.touch(mode=0o600)
        key.write_bytes(svid.key_pem())
        bundle.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return chain, key, bundle
