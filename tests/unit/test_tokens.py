"""NSM's per-hop tokens (pure): form, expiry rules, verification, metadata and the registry path."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given
from hypothesis import strategies as st

from proxy.security import tokens
from proxy.security.tokens import (
    CallerToken,
    Claims,
    RegistryPath,
    TokenError,
    decode,
    format_rfc3339nano,
    generate,
    parse_registry_path,
    parse_rfc3339nano,
    read_token_metadata,
    registry_path_at_server,
    registry_path_json,
    token_metadata,
    verify,
)

OWN = "spiffe://example.org/ns/meridio/sa/proxy"
PEER = "spiffe://example.org/ns/nsm-system/sa/nsmgr"
NOW = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
LIFETIME = timedelta(minutes=10)
FAR = NOW + timedelta(days=30)


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make(key: ec.EllipticCurvePrivateKey, **overrides: object) -> tokens.Token:
    args: dict[str, object] = {
        "own_id": OWN,
        "own_not_after": FAR,
        "now": NOW,
        "max_lifetime": LIFETIME,
        "peer_id": PEER,
        "peer_not_after": FAR,
    }
    args.update(overrides)
    return generate(key, **args)  # type: ignore[arg-type]


# --- form -------------------------------------------------------------------------------------


def test_a_token_round_trips_through_verify_and_decode(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key)
    expected = Claims(sub=OWN, aud=(PEER,), exp=int((NOW + LIFETIME).timestamp()))
    assert token.claims == expected
    assert verify(token.value, key.public_key()) == expected
    assert decode(token.value) == expected


def test_header_and_claims_are_byte_exact_as_golang_jwt_writes_them(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    token = make(key)
    header, payload, signature = token.value.split(".")
    # Written out by hand: golang-jwt v4's header map (sorted keys) and RegisteredClaims order.
    assert header == b64(b'{"alg":"ES256","typ":"JWT"}')
    assert header == "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCJ9"
    exp = 1735787645  # 2025-01-02T03:14:05Z: NOW + 10 min, fraction dropped
    assert unb64(payload) == (
        b'{"sub":"spiffe://example.org/ns/meridio/sa/proxy",'
        b'"aud":["spiffe://example.org/ns/nsm-system/sa/nsmgr"],'
        b'"exp":' + str(exp).encode() + b"}"
    )
    assert "=" not in token.value
    assert len(unb64(signature)) == 64  # raw r‖s, not DER


def test_without_a_tls_peer_there_is_no_aud(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key, peer_id=None, peer_not_after=None)
    assert unb64(token.value.split(".")[1]) == (
        b'{"sub":"spiffe://example.org/ns/meridio/sa/proxy","exp":1735787645}'
    )
    assert token.claims.aud is None
    assert token.expires == NOW + LIFETIME


def test_strings_are_escaped_as_go_escapes_them(key: ec.EllipticCurvePrivateKey) -> None:
    # Not a valid SPIFFE ID (the identity module refuses it), but the encoder must agree with
    # Go's encoding/json for anything it is given.
    token = make(key, own_id="spiffe://x/<a>&\u2028")
    payload = unb64(token.value.split(".")[1])
    assert payload.startswith(b'{"sub":"spiffe://x/\\u003ca\\u003e\\u0026\\u2028"')
    assert decode(token.value).sub == "spiffe://x/<a>&\u2028"


# --- expiry -----------------------------------------------------------------------------------


def test_exp_is_now_plus_lifetime_truncated_to_whole_seconds(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    token = make(key)
    assert token.claims.exp == 1735787645
    assert token.expires == NOW + LIFETIME  # the metadata keeps the fraction


def test_an_own_svid_expiring_earlier_caps_exp_and_expires(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    own_not_after = NOW + timedelta(minutes=3, seconds=0.5)
    token = make(key, own_not_after=own_not_after)
    assert token.claims.exp == int(own_not_after.timestamp())  # truncated
    assert token.expires == own_not_after


def test_a_peer_certificate_expiring_earlier_caps_expires_but_not_exp(
    key: ec.EllipticCurvePrivateKey,
) -> None:
    peer_not_after = NOW + timedelta(minutes=2)
    token = make(key, peer_not_after=peer_not_after)
    assert token.claims.exp == 1735787645  # still now + lifetime: Go caps only `expires`
    assert token.expires == peer_not_after


def test_the_earliest_of_the_three_wins(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(
        key,
        own_not_after=NOW + timedelta(minutes=4),
        peer_not_after=NOW + timedelta(minutes=6),
    )
    assert token.expires == NOW + timedelta(minutes=4)
    assert token.claims.exp == int((NOW + timedelta(minutes=4)).timestamp())


def test_times_in_other_zones_are_the_same_instants(key: ec.EllipticCurvePrivateKey) -> None:
    plus2 = timezone(timedelta(hours=2))
    token = make(key, now=NOW.astimezone(plus2))
    assert token.claims.exp == 1735787645
    assert token.expires.tzinfo is UTC


# --- argument and key refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("signing_key", "reason"),
    [
        (rsa.generate_private_key(65537, 2048), "not an RSA key"),
        (ec.generate_private_key(ec.SECP384R1()), "not an EC secp384r1 key"),
        (ed25519.Ed25519PrivateKey.generate(), "not an Ed25519 key"),
    ],
)
def test_only_p256_keys_sign(signing_key: object, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        make(signing_key)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"own_id": "example.org/proxy"}, "own_id must be a SPIFFE ID"),
        ({"peer_id": ""}, "peer_id must be a SPIFFE ID"),
        ({"now": NOW.replace(tzinfo=None)}, "now must be an aware datetime"),
        ({"max_lifetime": timedelta(0)}, "max_lifetime must be positive"),
        ({"peer_not_after": None}, "go together"),
    ],
)
def test_bad_arguments_are_refused(
    key: ec.EllipticCurvePrivateKey, overrides: dict[str, object], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        make(key, **overrides)


# --- verification failures --------------------------------------------------------------------


def replace_part(token: str, position: int, text: str) -> str:
    parts = token.split(".")
    parts[position] = text
    return ".".join(parts)


def test_a_tampered_payload_does_not_verify(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key).value
    forged = json.loads(unb64(token.split(".")[1]))
    forged["sub"] = "spiffe://example.org/ns/evil"
    tampered = replace_part(token, 1, b64(json.dumps(forged, separators=(",", ":")).encode()))
    assert decode(tampered).sub == "spiffe://example.org/ns/evil"  # decodes, but...
    with pytest.raises(TokenError, match="signature does not verify"):
        verify(tampered, key.public_key())


def test_a_tampered_signature_does_not_verify(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key).value
    signature = bytearray(unb64(token.split(".")[2]))
    signature[10] ^= 0x01
    with pytest.raises(TokenError, match="signature does not verify"):
        verify(replace_part(token, 2, b64(bytes(signature))), key.public_key())


def test_another_key_does_not_verify(key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(TokenError, match="signature does not verify"):
        verify(make(key).value, other)


def test_a_der_signature_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key).value
    signing_input = token.rsplit(".", 1)[0].encode()
    der = key.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(TokenError, match=r"signature is \d+ bytes; ES256 has 64"):
        verify(replace_part(token, 2, b64(der)), key.public_key())


def signed_with(key: ec.EllipticCurvePrivateKey, header: bytes, payload: bytes) -> str:
    """A token with any header and payload, signed correctly (so only its content is wrong)."""
    signing_input = f"{b64(header)}.{b64(payload)}"
    r, s = p256_sign(key.private_numbers().private_value, signing_input.encode())
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


HEADER = b'{"alg":"ES256","typ":"JWT"}'


def with_payload(payload: bytes) -> str:
    """A token with an empty header and no valid signature: what decode sees is the payload."""
    return f"e30.{b64(payload)}.AA"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "the token is empty"),
        ("abc.def", "three dot-separated parts; this token has 2"),
        ("a.b.c.d", "this token has 4"),
        ("e30.e30.!!!", "signature is not base64url"),
        ("eyJ9.e30.AA", "header is not JSON"),
        ("e30=.e30.AA", "header is not base64url without padding"),
        ("e30.W10.AA", "payload is an array, not a JSON object"),
        (with_payload(b'{"exp": NaN}'), "payload is not JSON"),
        (with_payload(b'{"sub": 5}'), "sub claim is a number, not a string"),
        (with_payload(b'{"aud": "spiffe://x/y"}'), "aud claim is a string"),
        (with_payload(b'{"aud": [1]}'), "aud claim holds something other than strings"),
        (with_payload(b'{"aud": {}}'), "aud claim is an object, not an array of strings"),
        (with_payload(b'{"exp": "soon"}'), "exp claim is a string, not a number"),
        (with_payload(b'{"exp": true}'), "exp claim is a boolean"),
        (with_payload(b'{"exp": 1e999}'), "exp claim is not a finite number"),
    ],
)
def test_malformed_tokens_say_what_is_wrong(token: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        decode(token)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b'{"alg":"none","typ":"JWT"}', "alg is 'none', not 'ES256'"),
        (b'{"alg":"HS256","typ":"JWT"}', "alg is 'HS256'"),
        (b'{"typ":"JWT"}', "alg is None"),
    ],
)
def test_verify_wants_es256_in_the_header(
    key: ec.EllipticCurvePrivateKey, header: bytes, reason: str
) -> None:
    token = signed_with(key, header, b'{"sub":"spiffe://x/y"}')
    assert decode(token).sub == "spiffe://x/y"  # decoding does not look at alg
    with pytest.raises(TokenError, match=reason):
        verify(token, key.public_key())


@pytest.mark.parametrize(
    ("public_key", "reason"),
    [
        (rsa.generate_private_key(65537, 2048).public_key(), "verifies with an EC P-256 key"),
        (ec.generate_private_key(ec.SECP384R1()).public_key(), "not an EC secp384r1 key"),
    ],
)
def test_verify_refuses_other_key_types(
    key: ec.EllipticCurvePrivateKey, public_key: object, reason: str
) -> None:
    with pytest.raises(TokenError, match=reason):
        verify(make(key).value, public_key)  # type: ignore[arg-type]


def test_verify_does_not_judge_expiry(key: ec.EllipticCurvePrivateKey) -> None:
    old = make(key, now=NOW - timedelta(days=365))
    assert verify(old.value, key.public_key()).exp == old.claims.exp  # the policy's job


def test_other_claims_are_ignored(key: ec.EllipticCurvePrivateKey) -> None:
    token = signed_with(key, HEADER, b'{"iss":"x","sub":"spiffe://x/y","iat":1,"exp":2.5}')
    assert verify(token, key.public_key()) == Claims(sub="spiffe://x/y", exp=2.5)


# --- interoperability: independent ES256 implementations --------------------------------------

# P-256 (FIPS 186-4 D.1.2.3 / SEC 2), in plain integers: an ECDSA written here from the
# standard's formulas shares no code with `cryptography` (OpenSSL underneath).
P = 2**256 - 2**224 + 2**192 + 2**96 - 1
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)
Point = tuple[int, int] | None


def p256_add(p1: Point, p2: Point) -> Point:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2 and (y1 + y2) % P == 0:
        return None
    if p1 == p2:
        slope = (3 * x1 * x1 - 3) * pow(2 * y1, -1, P) % P
    else:
        slope = (y2 - y1) * pow(x2 - x1, -1, P) % P
    x3 = (slope * slope - x1 - x2) % P
    return x3, (slope * (x1 - x3) - y1) % P


def p256_mul(k: int, point: Point) -> Point:
    result: Point = None
    while k:
        if k & 1:
            result = p256_add(result, point)
        point = p256_add(point, point)
        k >>= 1
    return result


def p256_verify(public: tuple[int, int], message: bytes, r: int, s: int) -> bool:
    if not (0 < r < N and 0 < s < N):
        return False
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    w = pow(s, -1, N)
    point = p256_add(p256_mul(e * w % N, G), p256_mul(r * w % N, public))
    return point is not None and point[0] % N == r


def p256_sign(d: int, message: bytes) -> tuple[int, int]:
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")
    while True:
        k = secrets.randbelow(N - 1) + 1
        point = p256_mul(k, G)
        assert point is not None
        r = point[0] % N
        s = pow(k, -1, N) * (e + r * d) % N
        if r and s:
            return r, s


def test_the_independent_curve_arithmetic_is_right(key: ec.EllipticCurvePrivateKey) -> None:
    x, y = G
    assert (y * y - (x**3 - 3 * x + B)) % P == 0  # G is on the curve
    public = key.public_key().public_numbers()
    assert p256_mul(key.private_numbers().private_value, G) == (public.x, public.y)


def test_our_signature_verifies_with_an_independent_ecdsa(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key).value
    signing_input, signature = token.rsplit(".", 1)
    raw = unb64(signature)
    public = key.public_key().public_numbers()
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    assert p256_verify((public.x, public.y), signing_input.encode(), r, s)
    assert not p256_verify((public.x, public.y), signing_input.encode() + b" ", r, s)


def test_an_independently_signed_token_verifies(key: ec.EllipticCurvePrivateKey) -> None:
    payload = b'{"sub":"spiffe://example.org/nsc","aud":["spiffe://example.org/nsmgr"],"exp":9}'
    token = signed_with(key, HEADER, payload)
    assert verify(token, key.public_key()) == Claims(
        sub="spiffe://example.org/nsc", aud=("spiffe://example.org/nsmgr",), exp=9
    )


def test_the_es256_example_of_rfc_7515_verifies() -> None:
    # RFC 7515 appendix A.3: a JWS made by another implementation, with its published key.
    x = int.from_bytes(unb64("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU"), "big")
    y = int.from_bytes(unb64("x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"), "big")
    public_key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    jws = (
        "eyJhbGciOiJFUzI1NiJ9"
        ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
        ".DtEhU3ljbEg8L38VWAfUAqOyKAM6-Xx-F4GawxaepmXFCgfTjDxw5djxLa8ISlSApmWQxfKTUJqPP3-Kg6NU1Q"
    )
    assert verify(jws, public_key) == Claims(exp=1300819380)


# --- RFC 3339 with nanoseconds ----------------------------------------------------------------

BASE_NS = 1735787045 * 10**9  # 2025-01-02T03:04:05Z


@pytest.mark.parametrize(
    ("when", "text"),
    [
        (BASE_NS, "2025-01-02T03:04:05Z"),  # a whole second: no dot at all
        (BASE_NS + 123456789, "2025-01-02T03:04:05.123456789Z"),
        (BASE_NS + 120000000, "2025-01-02T03:04:05.12Z"),  # trailing zeros go
        (BASE_NS + 1, "2025-01-02T03:04:05.000000001Z"),  # leading zeros stay
        (BASE_NS + 100, "2025-01-02T03:04:05.0000001Z"),
        (0, "1970-01-01T00:00:00Z"),
        (-1, "1969-12-31T23:59:59.999999999Z"),
        (datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC), "2025-01-02T03:04:05Z"),
        (datetime(2025, 1, 2, 3, 4, 5, 500000, tzinfo=UTC), "2025-01-02T03:04:05.5Z"),
        (datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "2025-01-02T03:04:05.678901Z"),
        (
            datetime(2025, 1, 2, 5, 4, 5, 10, tzinfo=timezone(timedelta(hours=2))),
            "2025-01-02T03:04:05.00001Z",
        ),
        (datetime(999, 1, 1, tzinfo=UTC), "0999-01-01T00:00:00Z"),
    ],
)
def test_rfc3339nano_formatting_follows_go(when: datetime | int, text: str) -> None:
    assert format_rfc3339nano(when) == text


def test_formatting_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        format_rfc3339nano(datetime(2025, 1, 2))


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("2025-01-02T03:04:05Z", BASE_NS),
        ("2025-01-02T03:04:05.123456789Z", BASE_NS + 123456789),
        ("2025-01-02T03:04:05.5Z", BASE_NS + 500000000),
        ("2025-01-02T03:04:05.1234567891234Z", BASE_NS + 123456789),  # Go drops digits past 9
        ("2025-01-02T05:04:05.000000001+02:00", BASE_NS + 1),
        ("2025-01-01T23:34:05-03:30", BASE_NS),
    ],
)
def test_rfc3339nano_parsing_follows_go(text: str, ns: int) -> None:
    assert parse_rfc3339nano(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2025-01-02 03:04:05Z",
        "2025-01-02t03:04:05Z",
        "2025-01-02T03:04:05z",
        "2025-01-02T03:04:05",
        "2025-01-02T03:04:05.Z",
        "2025-01-02T03:04:05+0200",
        "2025-01-02T03:04:05+24:00",
        "2025-13-02T03:04:05Z",
        "2025-02-30T03:04:05Z",
        "2025-01-02T03:04:60Z",
        "0000-01-01T00:00:00Z",
        "2025-01-02T03:04:05Z ",
    ],
)
def test_rfc3339nano_parsing_refuses_what_go_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339nano(text)


@given(st.integers(min_value=-(10**18), max_value=253402300799 * 10**9))
def test_rfc3339nano_round_trips(ns: int) -> None:
    assert parse_rfc3339nano(format_rfc3339nano(ns)) == ns


# --- per-RPC metadata -------------------------------------------------------------------------


def test_token_metadata_round_trips(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key)
    metadata = token_metadata(token)
    assert metadata == (
        ("nsm-client-token", token.value),
        ("nsm-client-token-expires", "2025-01-02T03:14:05.678901Z"),
    )
    caller = read_token_metadata([("other", "x"), *metadata])
    assert caller == CallerToken(value=token.value, expires_ns=BASE_NS + 600_678_901_000)
    assert caller.expires == token.expires


def test_token_metadata_may_come_as_bytes_with_any_key_case() -> None:
    caller = read_token_metadata(
        [("NSM-Client-Token", b"a.b.c"), ("nsm-client-token-expires", b"2025-01-02T03:04:05Z")]
    )
    assert caller == CallerToken(value="a.b.c", expires_ns=BASE_NS)


EXPIRES = ("nsm-client-token-expires", "2025-01-02T03:04:05Z")
TOKEN = ("nsm-client-token", "a.b.c")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([EXPIRES], "'nsm-client-token' has 0 values; exactly one is required"),
        ([TOKEN, TOKEN, EXPIRES], "'nsm-client-token' has 2 values"),
        ([TOKEN], "'nsm-client-token-expires' has 0 values"),
        ([TOKEN, EXPIRES, EXPIRES], "'nsm-client-token-expires' has 2 values"),
        ([TOKEN, ("nsm-client-token-expires", "tomorrow")], "nsm-client-token-expires: 'tomorr"),
        ([("nsm-client-token", b"\xff"), EXPIRES], "'nsm-client-token' is not ASCII"),
    ],
)
def test_token_metadata_needs_exactly_one_value_of_each_key(
    metadata: list[tuple[str, str | bytes]], reason: str
) -> None:
    with pytest.raises(TokenError, match=reason):
        read_token_metadata(metadata)


def test_a_token_is_not_in_its_repr(key: ec.EllipticCurvePrivateKey) -> None:
    token = make(key)
    assert token.value not in repr(token)
    assert token.value not in repr(CallerToken(value=token.value, expires_ns=0))


# --- registry path metadata -------------------------------------------------------------------


def test_the_first_registry_path_is_the_go_zero_value() -> None:
    assert registry_path_json(RegistryPath()) == '{"Index":0,"PathSegments":null}'


def test_a_registry_path_with_tokens() -> None:
    path = RegistryPath(index=1, tokens=("a.b.c", "d.e.f"))
    text = registry_path_json(path)
    assert text == '{"Index":1,"PathSegments":[{"token":"a.b.c"},{"token":"d.e.f"}]}'
    assert parse_registry_path(text) == path
    assert parse_registry_path(text.encode()) == path


@pytest.mark.parametrize(
    ("sent", "at_server"),
    [
        # A first Register: the client's segment and ours, whatever index came with no segments.
        (RegistryPath(), RegistryPath(1, ("caller", "own"))),
        (RegistryPath(3), RegistryPath(1, ("caller", "own"))),
        # A refresh with the path the registry answered last time: both tokens replaced.
        (RegistryPath(0, ("old-caller", "old-own")), RegistryPath(1, ("caller", "own"))),
        # A client that is itself a later hop: its segment replaced, ours appended.
        (RegistryPath(1, ("first", "old-caller")), RegistryPath(2, ("first", "caller", "own"))),
        (RegistryPath(0, ("old-caller",)), RegistryPath(1, ("caller", "own"))),
        # Segments after ours (as on a refresh further down a chain) are kept.
        (RegistryPath(0, ("a", "b", "c")), RegistryPath(1, ("caller", "own", "c"))),
    ],
)
def test_registry_updatepath_server(sent: RegistryPath, at_server: RegistryPath) -> None:
    assert registry_path_at_server(sent, "caller", "own") == at_server


def test_registry_updatepath_server_refuses_an_index_past_the_segments() -> None:
    with pytest.raises(TokenError, match="Index 2 points past its 2 segment"):
        registry_path_at_server(RegistryPath(2, ("a", "b")), "caller", "own")


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"Index":0,"PathSegments":null}', RegistryPath()),
        ("{}", RegistryPath()),
        ('{"index":2,"pathsegments":[{"TOKEN":"t"}],"x":1}', RegistryPath(2, ("t",))),
        ('{"Index":0,"PathSegments":[{}]}', RegistryPath(0, ("",))),
        ('{"Index":3,"PathSegments":[]}', RegistryPath(3)),
        # Go's decoder: repeated members, the last wins, exact or folded alike
        ('{"Index":1,"index":2}', RegistryPath(2)),
        ('{"index":2,"Index":1}', RegistryPath(1)),
        ('{"PathSegments":[{"token":"a","Token":"b"}]}', RegistryPath(0, ("b",))),
        ('{"Path\u017fegments":[{"token":"a"}]}', RegistryPath(0, ("a",))),  # long s folds to s
        # null leaves a field as it was; null itself is the empty path
        ('{"Index":1,"index":null,"PathSegments":[{"token":null}]}', RegistryPath(1, ("",))),
        ("null", RegistryPath()),
    ],
)
def test_registry_path_parsing_is_as_lenient_as_go(text: str, path: RegistryPath) -> None:
    assert parse_registry_path(text) == path


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not JSON"),
        ("[]", "is an array, not a JSON object"),
        ('{"Index":{}}', "Index is an object"),
        # An escaped lone surrogate: it could not be sent on again (Go reads U+FFFD).
        ('{"PathSegments":[{"token":"\\ud800"}]}', "token of path segment 0 is not Unicode"),
        ('{"Index":-1}', "Index is -1, not a uint32"),
        ('{"Index":1.5}', "Index is 1.5"),
        ('{"Index":4294967296}', "not a uint32"),
        ('{"Index":true}', "Index is True"),
        ('{"PathSegments":"x"}', "PathSegments is a string"),
        ('{"PathSegments":[null]}', "path segment 0 is null, not an object"),
        ('{"PathSegments":[{"token":1}]}', "token of path segment 0 is a number"),
    ],
)
def test_registry_path_refusals_say_why(text: str, reason: str) -> None:
    with pytest.raises(TokenError, match=reason):
        parse_registry_path(text)


def test_a_registry_path_index_must_be_a_uint32() -> None:
    with pytest.raises(ValueError, match="not a uint32"):
        registry_path_json(RegistryPath(index=-1))
