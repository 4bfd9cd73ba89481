"""SPIFFE IDs, SVIDs, bundles and Workload API responses as values (proxy.security.spiffe)."""

from __future__ import annotations

import datetime

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.api.workload.workload_pb2 import X509SVIDResponse
from proxy.lab.spiffe_ca import LabCa
from proxy.lab.workload import svid_message
from proxy.security.spiffe import (
    Bundle,
    IdentityError,
    SpiffeId,
    Svid,
    identity_from_response,
    split_der,
)
from proxy.security.tls import Authorizer


@pytest.mark.parametrize(
    "text",
    ["spiffe://example.org", "spiffe://example.org/ns/red/sa/proxy", "spiffe://a-b_c.d/x.y-z_1"],
)
def test_valid_ids_round_trip(text: str) -> None:
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("http://example.org/a", "no spiffe:// scheme"),
        ("spiffe://", "no trust domain"),
        ("spiffe:///path", "no trust domain"),
        ("spiffe://Example.org/a", "lower-case"),
        ("spiffe://example.org:8443/a", "no port"),
        ("spiffe://user@example.org/a", "user info"),
        ("spiffe://example.org/a//b", "empty"),
        ("spiffe://example.org/a/../b", "'..'"),
        ("spiffe://example.org/a?x=1", "no query"),
        ("spiffe://example.org/a#f", "no query or fragment"),
        ("spiffe://example.org/", "empty"),
    ],
)
def test_invalid_ids_say_why(text: str, reason: str) -> None:
    with pytest.raises(IdentityError, match=reason.replace("?", r"\?")):
        SpiffeId.parse(text)


def test_trust_domain_forms() -> None:
    assert SpiffeId.of_trust_domain("example.org") == SpiffeId("example.org")
    assert SpiffeId.of_trust_domain("spiffe://example.org") == SpiffeId("example.org")
    with pytest.raises(IdentityError, match="not a trust domain"):
        SpiffeId.of_trust_domain("spiffe://example.org/workload")


def test_split_der_takes_concatenated_certificates_apart() -> None:
    ca, other = LabCa.create("a.example"), LabCa.create("b.example")
    both = ca.bundle.der() + other.bundle.der()
    assert split_der(both) == [ca.bundle.der(), other.bundle.der()]
    with pytest.raises(IdentityError, match="truncated"):
        split_der(both[:-1])
    with pytest.raises(IdentityError, match="not DER"):
        split_der(b"\x01\x02")


def test_a_workload_api_response_becomes_an_identity() -> None:
    ca, federated = LabCa.create("lab.example"), LabCa.create("other.example")
    svid = ca.issue("/proxy")
    response = X509SVIDResponse(
        svids=[svid_message(svid, ca.bundle.der())],
        federated_bundles={"spiffe://other.example": federated.bundle.der()},
    )
    identity = identity_from_response(response)
    assert identity.spiffe_id == SpiffeId("lab.example", "/proxy")
    assert identity.svid.leaf == svid.leaf
    assert set(identity.bundles) == {"lab.example", "other.example"}
    assert identity.own_bundle == ca.bundle
    assert "spiffe://lab.example/proxy" in identity.describe()


def test_unusable_responses_say_why() -> None:
    ca = LabCa.create("lab.example")
    svid = ca.issue("/proxy")
    with pytest.raises(IdentityError, match="no SVID"):
        identity_from_response(X509SVIDResponse())
    lying = svid_message(svid, ca.bundle.der())
    lying.spiffe_id = "spiffe://lab.example/someone-else"
    with pytest.raises(IdentityError, match=r"certificate is spiffe://lab\.example/proxy"):
        identity_from_response(X509SVIDResponse(svids=[lying]))
    wrong_key = svid_message(svid, ca.bundle.der())
    wrong_key.x509_svid_key = svid_message(ca.issue("/x"), b"").x509_svid_key
    with pytest.raises(IdentityError, match="does not match"):
        identity_from_response(X509SVIDResponse(svids=[wrong_key]))
    no_bundle = svid_message(svid, b"")
    with pytest.raises(IdentityError, match="holds no certificate"):
        identity_from_response(X509SVIDResponse(svids=[no_bundle]))


def test_an_svid_has_exactly_one_spiffe_uri() -> None:
    ca = LabCa.create("lab.example")
    domain_only = ca.issue("", spiffe_id="spiffe://lab.example")
    with pytest.raises(IdentityError, match="names a trust domain"):
        Svid.checked(domain_only.chain, domain_only.key)
    with pytest.raises(IdentityError, match="not supported"):
        Svid.checked(domain_only.chain, object())
    assert Bundle.from_der("spiffe://lab.example", ca.bundle.der()) == ca.bundle


def test_svid_validity_is_the_leafs() -> None:
    ca = LabCa.create("lab.example")
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    svid = ca.issue("/p", not_before=start, lifetime=datetime.timedelta(hours=2))
    assert svid.not_after == start + datetime.timedelta(hours=2)
    assert isinstance(svid.key, ec.EllipticCurvePrivateKey)
    assert isinstance(svid.key.curve, ec.SECP256R1)


def test_authorizer() -> None:
    default = Authorizer(trust_domains=frozenset({"lab.example"}))
    assert default.refusal(SpiffeId("lab.example", "/anything")) is None
    refused = default.refusal(SpiffeId("other.example", "/proxy"))
    assert refused == (
        "SPIFFE ID spiffe://other.example/proxy is not authorized (allowed: spiffe://lab.example/*)"
    )
    listed = Authorizer.parse(["spiffe://lab.example/nsm", " other.example "])
    assert listed.refusal(SpiffeId("lab.example", "/nsm")) is None
    assert listed.refusal(SpiffeId("other.example", "/x")) is None
    assert listed.refusal(SpiffeId("lab.example", "/proxy")) is not None
    assert listed.domains == {"lab.example", "other.example"}
    with pytest.raises(IdentityError):
        Authorizer.parse([])
