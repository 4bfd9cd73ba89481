"""NSM tokens against an independent ES256: the openssl command line signs and verifies.

openssl speaks DER signatures and PEM keys; a JWS wants raw r‖s. The conversion is written
here by hand (a two-INTEGER SEQUENCE), so neither direction goes through our own code twice.
No root needed; skipped only where there is no openssl binary.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from proxy.security.policy import Denial, Policy, check_tokens
from proxy.security.tokens import Claims, TokenError, generate, verify

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="no openssl binary")

NOW = datetime.now(UTC)
OWN = "spiffe://example.org/ns/meridio/sa/proxy"
PEER = "spiffe://example.org/ns/nsm-system/sa/nsmgr"


def openssl(*args: str | Path) -> bytes:
    assert OPENSSL is not None
    done = subprocess.run([OPENSSL, *map(str, args)], capture_output=True, check=False, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def der_integer(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8, "big")  # room for a sign bit
    return b"\x02" + bytes([len(body)]) + body


def raw_to_der(raw: bytes) -> bytes:
    body = der_integer(int.from_bytes(raw[:32], "big")) + der_integer(
        int.from_bytes(raw[32:], "big")
    )
    return b"\x30" + bytes([len(body)]) + body


def der_to_raw(der: bytes) -> bytes:
    assert der[0] == 0x30 and der[1] == len(der) - 2, "a short-form DER SEQUENCE"
    values, rest = [], der[2:]
    for _ in range(2):
        assert rest[0] == 0x02
        length = rest[1]
        values.append(int.from_bytes(rest[2 : 2 + length], "big"))
        rest = rest[2 + length :]
    assert not rest
    return values[0].to_bytes(32, "big") + values[1].to_bytes(32, "big")


def openssl_svid(directory: Path, stem: str) -> tuple[Path, Path]:
    """An openssl-made P-256 key and self-signed certificate with the peer's SPIFFE URI SAN."""
    key, cert = directory / f"{stem}-key.pem", directory / f"{stem}-cert.pem"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", cert, "-days", "1", "-subj", "/O=SPIRE",
        "-addext", f"subjectAltName=URI:{PEER}",
    )  # fmt: skip
    return key, cert


@pytest.fixture
def svid(tmp_path: Path) -> tuple[Path, Path]:
    return openssl_svid(tmp_path, "peer")


def test_openssl_verifies_our_token(svid: tuple[Path, Path], tmp_path: Path) -> None:
    key_pem, cert_pem = svid
    key = load_pem_private_key(key_pem.read_bytes(), password=None)
    token = generate(
        key,
        own_id=OWN,
        own_not_after=NOW + timedelta(hours=1),
        now=NOW,
        max_lifetime=timedelta(minutes=10),
        peer_id=PEER,
        peer_not_after=NOW + timedelta(hours=1),
    ).value
    signing_input, signature = token.rsplit(".", 1)
    (tmp_path / "input").write_bytes(signing_input.encode())
    (tmp_path / "sig.der").write_bytes(raw_to_der(unb64(signature)))
    (tmp_path / "pub.pem").write_bytes(openssl("x509", "-in", cert_pem, "-noout", "-pubkey"))
    verdict = openssl(
        "dgst", "-sha256", "-verify", tmp_path / "pub.pem",
        "-signature", tmp_path / "sig.der", tmp_path / "input",
    )  # fmt: skip
    assert verdict.strip() == b"Verified OK"

    (tmp_path / "input").write_bytes(signing_input.encode() + b"x")
    with pytest.raises(AssertionError, match="dgst failed"):
        openssl(
            "dgst", "-sha256", "-verify", tmp_path / "pub.pem",
            "-signature", tmp_path / "sig.der", tmp_path / "input",
        )  # fmt: skip


def test_we_verify_a_token_openssl_signed(svid: tuple[Path, Path], tmp_path: Path) -> None:
    key_pem, cert_pem = svid
    exp = int((NOW + timedelta(minutes=5)).timestamp())
    header = b64(b'{"alg":"ES256","typ":"JWT"}')
    payload = b64(f'{{"sub":"{PEER}","aud":["{OWN}"],"exp":{exp}}}'.encode())
    (tmp_path / "input").write_bytes(f"{header}.{payload}".encode())
    der = openssl("dgst", "-sha256", "-sign", key_pem, tmp_path / "input")
    token = f"{header}.{payload}.{b64(der_to_raw(der))}"

    public_key = load_pem_public_key(openssl("pkey", "-in", key_pem, "-pubout"))
    assert verify(token, public_key) == Claims(sub=PEER, aud=(OWN,), exp=exp)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TokenError, match="does not verify"):
        verify(token, other)

    # The same token as the previous hop's, with the openssl-made certificate as TLS peer.
    certificate = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    own = generate(
        key,
        own_id=OWN,
        own_not_after=NOW + timedelta(hours=1),
        now=NOW,
        max_lifetime=timedelta(minutes=10),
        peer_id=PEER,
        peer_not_after=NOW + timedelta(hours=1),
    ).value
    assert check_tokens([token, own], 1, now=NOW, peer_certificate=certificate) is None
    _, impostor_pem = openssl_svid(tmp_path, "impostor")  # same SPIFFE ID, another key
    impostor = x509.load_pem_x509_certificate(impostor_pem.read_bytes())
    denial = check_tokens([token, own], 1, now=NOW, peer_certificate=impostor)
    assert denial == Denial(
        Policy.PREV_TOKEN_SIGNED,
        "token 0 is not the TLS peer's: the signature does not verify with the given public key",
    )
