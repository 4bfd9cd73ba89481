"""NSM's default authorization policies over a path's tokens (pure)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from proxy.api.networkservice.connection_pb2 import Path, PathSegment
from proxy.security.policy import (
    Denial,
    ExpiryScope,
    Policy,
    authorize_registration,
    authorize_request,
    check_tokens,
    registry_caller_id,
)
from proxy.security.tokens import RegistryPath, generate

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
LIFETIME = timedelta(minutes=10)
NSC = "spiffe://example.org/ns/app/sa/target"
NSMGR = "spiffe://example.org/ns/nsm-system/sa/nsmgr"
PROXY = "spiffe://example.org/ns/meridio/sa/proxy"


class Workload:
    """A workload with its SVID: a P-256 key and a certificate naming its SPIFFE ID."""

    def __init__(self, spiffe_id: str, key: CertificateIssuerPrivateKeyTypes | None = None):
        self.spiffe_id = spiffe_id
        self.key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
        self.not_after = NOW + timedelta(hours=1)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(hours=1))
            .not_valid_after(self.not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def token(self, peer: Workload | None, *, now: datetime = NOW) -> str:
        """What this workload signs for a call to `peer` (as NSM's generator)."""
        assert isinstance(self.key, ec.EllipticCurvePrivateKey)
        return generate(
            self.key,
            own_id=self.spiffe_id,
            own_not_after=self.not_after,
            now=now,
            max_lifetime=LIFETIME,
            peer_id=None if peer is None else peer.spiffe_id,
            peer_not_after=None if peer is None else peer.not_after,
        ).value

    def signed(self, payload: bytes) -> str:
        """A token with any payload, correctly signed by this workload."""
        assert isinstance(self.key, ec.EllipticCurvePrivateKey)
        signing_input = b64(b'{"alg":"ES256","typ":"JWT"}') + "." + b64(payload)
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def nsc() -> Workload:
    return Workload(NSC)


@pytest.fixture(scope="module")
def nsmgr() -> Workload:
    return Workload(NSMGR)


@pytest.fixture(scope="module")
def proxy() -> Workload:
    return Workload(PROXY)


def path(*tokens: str, index: int | None = None) -> Path:
    return Path(
        index=len(tokens) - 1 if index is None else index,
        path_segments=[
            PathSegment(name=f"hop-{i}", id=f"id-{i}", token=t) for i, t in enumerate(tokens)
        ],
    )


def good_path(nsc: Workload, nsmgr: Workload, proxy: Workload) -> Path:
    """A target's connection as the proxy's endpoint sees it: nsc -> nsmgr -> proxy (index 2)."""
    return path(nsc.token(nsmgr), nsmgr.token(proxy), proxy.token(nsmgr))


# --- the endpoint's view ----------------------------------------------------------------------


def test_a_well_formed_chain_is_allowed(nsc: Workload, nsmgr: Workload, proxy: Workload) -> None:
    assert (
        authorize_request(good_path(nsc, nsmgr, proxy), now=NOW, peer_certificate=nsmgr.certificate)
        is None
    )


def test_segments_after_the_index_are_not_looked_at(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    connection_path = good_path(nsc, nsmgr, proxy)
    connection_path.path_segments.add(name="forwarder", id="f", token="garbage")
    assert authorize_request(connection_path, now=NOW, peer_certificate=nsmgr.certificate) is None


def test_a_token_that_does_not_decode_fails_tokens_valid(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    denial = authorize_request(
        path(nsc.token(nsmgr), "not-a-jwt", proxy.token(nsmgr)),
        now=NOW,
        peer_certificate=nsmgr.certificate,
    )
    assert denial == Denial(
        Policy.TOKENS_VALID, "token 1: a JWT has three dot-separated parts; this token has 1"
    )
    assert str(denial).startswith("tokens_valid: token 1: ")


def test_an_empty_token_fails_tokens_valid(nsmgr: Workload, proxy: Workload) -> None:
    denial = authorize_request(
        path("", nsmgr.token(proxy), proxy.token(nsmgr)), now=NOW, peer_certificate=None
    )
    assert denial == Denial(Policy.TOKENS_VALID, "token 0: the token is empty")


def test_an_expired_token_fails_tokens_expired(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    stale = nsc.token(nsmgr, now=NOW - timedelta(minutes=30))
    denial = authorize_request(
        path(stale, nsmgr.token(proxy), proxy.token(nsmgr)),
        now=NOW,
        peer_certificate=nsmgr.certificate,
    )
    assert denial == Denial(
        Policy.TOKENS_EXPIRED,
        f"token 0 (sub '{NSC}') expired at 2025-01-02T02:44:05Z, now is 2025-01-02T03:04:05Z",
    )


def test_a_token_expiring_this_very_second_is_expired(nsmgr: Workload, proxy: Workload) -> None:
    # Rego: `now < exp`, so exp == now is no longer alive.
    tokens = [nsmgr.token(proxy, now=NOW - LIFETIME), proxy.token(nsmgr)]
    denial = check_tokens(tokens, 1, now=NOW, peer_certificate=nsmgr.certificate)
    assert denial is not None and denial.policy is Policy.TOKENS_EXPIRED
    just_before = NOW - timedelta(microseconds=1)
    assert check_tokens(tokens, 1, now=just_before, peer_certificate=nsmgr.certificate) is None


def test_a_token_without_exp_fails_tokens_expired(nsmgr: Workload, proxy: Workload) -> None:
    tokens = [nsmgr.signed(f'{{"sub":"{NSMGR}","aud":["{PROXY}"]}}'.encode()), proxy.token(nsmgr)]
    denial = check_tokens(tokens, 1, now=NOW, peer_certificate=nsmgr.certificate)
    assert denial == Denial(Policy.TOKENS_EXPIRED, "token 0 has no exp")


def test_the_lenient_expiry_scope_looks_at_the_own_segment_only(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    stale = nsc.token(nsmgr, now=NOW - timedelta(minutes=30))
    connection_path = path(stale, nsmgr.token(proxy), proxy.token(nsmgr))
    allowed = authorize_request(
        connection_path,
        now=NOW,
        peer_certificate=nsmgr.certificate,
        expiry_scope=ExpiryScope.FROM_INDEX,
    )
    assert allowed is None
    connection_path.path_segments[2].token = proxy.token(nsmgr, now=NOW - timedelta(hours=1))
    denial = authorize_request(
        connection_path,
        now=NOW,
        peer_certificate=nsmgr.certificate,
        expiry_scope=ExpiryScope.FROM_INDEX,
    )
    assert denial is not None and denial.reason.startswith("token 2 ")


def test_a_sub_missing_from_the_previous_aud_fails_tokens_chained(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    # The NSC addressed its token to the proxy, but nsmgr signed the next one.
    denial = authorize_request(
        path(nsc.token(proxy), nsmgr.token(proxy), proxy.token(nsmgr)),
        now=NOW,
        peer_certificate=nsmgr.certificate,
    )
    assert denial == Denial(
        Policy.TOKENS_CHAINED, f"token 1's sub '{NSMGR}' is not in token 0's aud ['{PROXY}']"
    )


def test_a_token_without_aud_fails_tokens_chained(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    denial = authorize_request(
        path(nsc.token(None), nsmgr.token(proxy), proxy.token(nsmgr)),
        now=NOW,
        peer_certificate=nsmgr.certificate,
    )
    assert denial == Denial(Policy.TOKENS_CHAINED, "token 0 has no aud")


def test_a_token_without_sub_fails_tokens_chained(nsmgr: Workload, proxy: Workload) -> None:
    exp = int((NOW + LIFETIME).timestamp())
    tokens = [nsmgr.token(proxy), proxy.signed(f'{{"aud":["{NSMGR}"],"exp":{exp}}}'.encode())]
    denial = check_tokens(tokens, 1, now=NOW, peer_certificate=nsmgr.certificate)
    assert denial == Denial(Policy.TOKENS_CHAINED, "token 1 has no sub")


def test_any_of_several_audiences_chains(nsmgr: Workload, proxy: Workload) -> None:
    exp = int((NOW + LIFETIME).timestamp())
    several = f'{{"sub":"{NSMGR}","aud":["spiffe://x/y","{PROXY}"],"exp":{exp}}}'
    tokens = [nsmgr.signed(several.encode()), proxy.token(nsmgr)]
    assert check_tokens(tokens, 1, now=NOW, peer_certificate=nsmgr.certificate) is None


def test_a_previous_token_not_signed_by_the_tls_peer_fails_prev_token_signed(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    # The chain is right, but the TLS peer is another workload claiming to be nsmgr.
    impostor = Workload(NSMGR)
    denial = authorize_request(
        good_path(nsc, nsmgr, proxy), now=NOW, peer_certificate=impostor.certificate
    )
    assert denial == Denial(
        Policy.PREV_TOKEN_SIGNED,
        "token 1 is not the TLS peer's: the signature does not verify with the given public key",
    )


def test_without_a_tls_peer_certificate_prev_token_signed_fails(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    denial = authorize_request(good_path(nsc, nsmgr, proxy), now=NOW, peer_certificate=None)
    assert denial == Denial(
        Policy.PREV_TOKEN_SIGNED, "no TLS peer certificate to check token 1's signature with"
    )


def test_a_tls_peer_with_an_rsa_key_fails_prev_token_signed(
    nsc: Workload, nsmgr: Workload, proxy: Workload
) -> None:
    rsa_peer = Workload(NSMGR, key=rsa.generate_private_key(65537, 2048))
    denial = authorize_request(
        good_path(nsc, nsmgr, proxy), now=NOW, peer_certificate=rsa_peer.certificate
    )
    assert denial is not None and denial.policy is Policy.PREV_TOKEN_SIGNED
    assert "EC P-256 key, not an RSA key" in denial.reason


def test_index_zero_has_no_previous_token(nsc: Workload, nsmgr: Workload) -> None:
    denial = authorize_request(path(nsc.token(nsmgr)), now=NOW, peer_certificate=nsmgr.certificate)
    assert denial == Denial(
        Policy.PREV_TOKEN_SIGNED, "path index is 0: there is no previous token to check"
    )


@pytest.mark.parametrize(
    ("connection_path", "reason"),
    [
        (Path(), "the connection has no path segments"),
        (path("a", "b", index=2), "path index 2 is beyond its 2 segments"),
    ],
)
def test_an_unusable_path_is_denied(connection_path: Path, reason: str) -> None:
    assert authorize_request(connection_path, now=NOW, peer_certificate=None) == Denial(
        Policy.PATH, reason
    )


def test_decoding_is_judged_before_the_chain(nsc: Workload, proxy: Workload) -> None:
    denial = check_tokens(["x.y.z", proxy.token(nsc)], 1, now=NOW, peer_certificate=None)
    assert denial is not None and denial.policy is Policy.TOKENS_VALID


def test_now_must_be_aware(nsmgr: Workload, proxy: Workload) -> None:
    with pytest.raises(ValueError, match="aware"):
        check_tokens([proxy.token(nsmgr)], 0, now=NOW.replace(tzinfo=None), peer_certificate=None)


# --- the registry's view ----------------------------------------------------------------------


def registry_path(proxy: Workload, nsmgr: Workload) -> RegistryPath:
    """The proxy's Register as nsmgr's registry sees it: [proxy's token, nsmgr's], index 1."""
    return RegistryPath(index=1, tokens=(proxy.token(nsmgr), nsmgr.token(proxy)))


def test_the_registry_caller_is_the_sub_of_token_zero(proxy: Workload, nsmgr: Workload) -> None:
    assert registry_caller_id(registry_path(proxy, nsmgr)) == PROXY
    assert registry_caller_id(RegistryPath()) == ""
    assert registry_caller_id(RegistryPath(tokens=("garbage",))) == ""


def test_a_new_name_may_be_registered(proxy: Workload, nsmgr: Workload) -> None:
    denial = authorize_registration(
        registry_path(proxy, nsmgr),
        resource_name="proxy-a",
        path_ids={"proxy-b": ["spiffe://example.org/other"]},
        now=NOW,
        peer_certificate=proxy.certificate,
    )
    assert denial is None


def test_its_owner_may_refresh_or_unregister_it(proxy: Workload, nsmgr: Workload) -> None:
    denial = authorize_registration(
        registry_path(proxy, nsmgr),
        resource_name="proxy-a",
        path_ids={"proxy-a": [PROXY, NSMGR]},
        now=NOW,
        peer_certificate=proxy.certificate,
    )
    assert denial is None


def test_another_workload_may_not_take_a_registered_name(proxy: Workload, nsmgr: Workload) -> None:
    denial = authorize_registration(
        registry_path(proxy, nsmgr),
        resource_name="proxy-a",
        path_ids={"proxy-a": ["spiffe://example.org/other"]},
        now=NOW,
        peer_certificate=proxy.certificate,
    )
    assert denial == Denial(
        Policy.CLIENT_ALLOWED,
        f"'proxy-a' is registered by ['spiffe://example.org/other'], not by '{PROXY}'",
    )


def test_the_registry_checks_the_tokens_first(proxy: Workload, nsmgr: Workload) -> None:
    # Signed by nsmgr's key, though the TLS peer is the proxy: the token policies deny it
    # before the name is looked at.
    denial = authorize_registration(
        registry_path(proxy, nsmgr),
        resource_name="proxy-a",
        path_ids={},
        now=NOW,
        peer_certificate=nsmgr.certificate,
    )
    assert denial is not None and denial.policy is Policy.PREV_TOKEN_SIGNED


def test_an_empty_registry_path_has_no_previous_token(proxy: Workload) -> None:
    denial = authorize_registration(
        RegistryPath(index=3),
        resource_name="proxy-a",
        path_ids={},
        now=NOW,
        peer_certificate=proxy.certificate,
    )
    assert denial == Denial(
        Policy.PREV_TOKEN_SIGNED, "path index is 0: there is no previous token to check"
    )
