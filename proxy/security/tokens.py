"""NSM's per-hop tokens: ES256 JWTs as the sdk's `spiffejwt.TokenGeneratorFunc` makes them (pure).

Every NSM call carries a token that the caller signs with its own X.509-SVID key (wire-api §2.2,
§2.3), and every hop of a connection writes one into its path segment; the authorization policies
(`proxy.security.policy`) read them back. Nothing here does I/O: times, keys and identities come
in as arguments, so the decisions are tested without a clock or a Workload API.

Byte for byte what a Go peer makes (golang-jwt v4 under the sdk), so a token is never refused
for its form:

* header `{"alg":"ES256","typ":"JWT"}` (a Go map: keys sorted);
* claims in `RegisteredClaims` field order, only `sub`, `aud` (an array, golang-jwt's default;
  left out without a TLS peer) and `exp` (whole seconds, truncated);
* signature: ECDSA P-256 over SHA-256 as JWS wants it, raw r‖s of 32 bytes each (not DER);
* every part base64url without padding.

The per-RPC metadata (`nsm-client-token`, `nsm-client-token-expires`) and the registry's `path`
metadata (wire-api §2.5) are built and read here too. Times on the wire are Go's
`time.RFC3339Nano`, which is why instants at that layer are integer nanoseconds (a `datetime`
stops at microseconds; a Go peer sends nanoseconds).

Where this is stricter than the Go reader (on purpose: refusing early with a reason beats a
token that fails somewhere later): base64 padding is refused (golang-jwt refuses it too; OPA's
`io.jwt.decode` would take it), the payload must be a JSON object, `sub` a string, `aud` an array
of strings (OPA would take a string `aud` and then fail the chain check) and `exp` a number.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

import attrs
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = [
    "ALGORITHM",
    "EXPIRES_KEY",
    "PATH_KEY",
    "TOKEN_KEY",
    "CallerToken",
    "Claims",
    "RegistryPath",
    "Token",
    "TokenError",
    "decode",
    "format_rfc3339nano",
    "generate",
    "parse_registry_path",
    "parse_rfc3339nano",
    "read_token_metadata",
    "registry_path_at_server",
    "registry_path_json",
    "token_metadata",
    "verify",
]

TOKEN_KEY: Final = "nsm-client-token"
EXPIRES_KEY: Final = "nsm-client-token-expires"
PATH_KEY: Final = "path"  # registry Register/Unregister (wire-api §2.5)
ALGORITHM: Final = "ES256"

# golang-jwt v4 marshals the header as a map, so the keys come out sorted.
_HEADER: Final = b'{"alg":"ES256","typ":"JWT"}'
_COORDINATE_BYTES: Final = 32  # r and s of a P-256 signature, each left-padded to this
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_SECOND: Final = timedelta(seconds=1)
_NS_PER_SECOND: Final = 1_000_000_000
_UINT32_MAX: Final = 2**32 - 1
_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]*")
# Go's strict RFC 3339 parser (time.parseRFC3339): upper-case T and Z, any number of fraction
# digits (beyond nine they are dropped), a numeric offset with hours below 24. Go's
# time.Parse(RFC3339Nano) falls back on its general layout parser when that one fails, which
# also takes a comma before the fraction, offsets up to 24:60 and a one-digit hour; Go's own
# Format never writes those, and they are refused here (interop/go/check.py lists them).
_RFC3339: Final = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:(Z)|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
# Go's encoding/json escapes these inside strings; Python's json does not.
_GO_ESCAPES: Final = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_ESCAPE_RE: Final = re.compile("[<>&\u2028\u2029]")


class TokenError(ValueError):
    """A token, key or token metadata that cannot be used; the message says what is wrong."""


@attrs.frozen
class Claims:
    """The claims NSM reads from a token; any other claim is ignored (NSM ignores them too)."""

    sub: str | None = None
    aud: tuple[str, ...] | None = None  # None when the token has no `aud` at all
    exp: float | None = None  # seconds since the epoch; an int in every token NSM makes


@attrs.frozen
class Token:
    """A token this process signed, and until when it is good.

    `expires` is what goes into the `nsm-client-token-expires` metadata and a path segment's
    `expires`: the claim's `exp`, capped further by the peer certificate's NotAfter (the Go
    generator does the same, so `expires` can be earlier than `exp`), at full precision.
    """

    value: str = attrs.field(repr=False)  # a bearer credential: never in a log line
    claims: Claims
    expires: datetime


@attrs.frozen
class CallerToken:
    """The token and expiry a caller sent as per-RPC metadata."""

    value: str = attrs.field(repr=False)
    expires_ns: int  # nanoseconds since the epoch, exactly as sent

    @property
    def expires(self) -> datetime:
        """`expires_ns` as an aware UTC datetime (truncated to microseconds)."""
        return _from_unix_ns(self.expires_ns)


@attrs.frozen
class RegistryPath:
    """The registry's private path (`path` metadata): an index and one token per segment."""

    index: int = 0
    tokens: tuple[str, ...] = ()


# --- generating -------------------------------------------------------------------------------


def generate(
    key: PrivateKeyTypes,
    *,
    own_id: str,
    own_not_after: datetime,
    now: datetime,
    max_lifetime: timedelta,
    peer_id: str | None = None,
    peer_not_after: datetime | None = None,
) -> Token:
    """Sign a token for a call to (or an answer for) the peer `peer_id`, as NSM's generator does.

    `own_id` and `own_not_after` are the own SVID's SPIFFE ID and leaf NotAfter, `key` its
    private key; `peer_id` and `peer_not_after` come from the TLS peer's leaf (both or neither:
    without a TLS peer the token has no `aud`). `exp` = min(now + max_lifetime, own NotAfter),
    truncated to whole seconds; the returned `expires` is also capped by the peer's NotAfter.
    Raises TokenError for a key that is not EC P-256 and ValueError for bad arguments.
    """
    signer = _p256_private_key(key)
    _check_spiffe_id("own_id", own_id)
    _check_aware("own_not_after", own_not_after)
    _check_aware("now", now)
    if max_lifetime <= timedelta(0):
        raise ValueError(f"max_lifetime must be positive, not {max_lifetime}")
    if (peer_id is None) != (peer_not_after is None):
        raise ValueError("peer_id and peer_not_after go together (both from the peer's leaf)")

    expires = min(now + max_lifetime, own_not_after)
    claims = Claims(sub=own_id, exp=_unix_seconds(expires))
    if peer_id is not None and peer_not_after is not None:
        _check_spiffe_id("peer_id", peer_id)
        _check_aware("peer_not_after", peer_not_after)
        claims = attrs.evolve(claims, aud=(peer_id,))
        expires = min(expires, peer_not_after)

    signing_input = _b64encode(_HEADER) + b"." + _b64encode(_claims_json(claims))
    der = signer.sign(signing_input, ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(_COORDINATE_BYTES, "big") + s.to_bytes(_COORDINATE_BYTES, "big")
    value = (signing_input + b"." + _b64encode(raw)).decode("ascii")
    return Token(value=value, claims=claims, expires=expires.astimezone(UTC))


def _claims_json(claims: Claims) -> bytes:
    """The payload exactly as golang-jwt v4 marshals `RegisteredClaims` (field order, no spaces)."""
    fields: dict[str, Any] = {"sub": claims.sub}
    if claims.aud is not None:
        fields["aud"] = list(claims.aud)
    fields["exp"] = claims.exp
    return _go_json(fields)


# --- reading ----------------------------------------------------------------------------------


def decode(token: str) -> Claims:
    """The claims of `token`, without checking its signature (the chain policy's view).

    Raises TokenError saying what is wrong: not three parts, a part that is not base64url, a
    header or payload that is not a JSON object, a claim of the wrong type.
    """
    _header, claims, _signing_input, _signature = _parse(token)
    return claims


def verify(token: str, public_key: PublicKeyTypes) -> Claims:
    """The claims of `token` once its ES256 signature checks out with `public_key`.

    Checks the form (as `decode`), that the header says ES256, and the signature; not `exp`
    (the expiry is a policy of its own, and needs a clock). Raises TokenError with the reason.
    """
    verifier = _p256_public_key(public_key)
    header, claims, signing_input, signature = _parse(token)
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise TokenError(f"the token's alg is {alg!r}, not {ALGORITHM!r}")
    if len(signature) != 2 * _COORDINATE_BYTES:
        raise TokenError(
            f"the signature is {len(signature)} bytes; ES256 has {2 * _COORDINATE_BYTES} (r‖s)"
        )
    r = int.from_bytes(signature[:_COORDINATE_BYTES], "big")
    s = int.from_bytes(signature[_COORDINATE_BYTES:], "big")
    try:
        verifier.verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TokenError("the signature does not verify with the given public key") from None
    return claims


def _parse(token: str) -> tuple[dict[str, Any], Claims, bytes, bytes]:
    """Header, claims, signing input and raw signature of a compact JWS."""
    if not isinstance(token, str):
        raise TokenError(f"a token is a string, not {type(token).__name__}")
    if not token:
        raise TokenError("the token is empty")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError(f"a JWT has three dot-separated parts; this token has {len(parts)}")
    header_b64, payload_b64, signature_b64 = parts
    header = _json_object("header", _b64decode("header", header_b64))
    payload = _json_object("payload", _b64decode("payload", payload_b64))
    signature = _b64decode("signature", signature_b64)
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    return header, _claims(payload), signing_input, signature


def _claims(payload: dict[str, Any]) -> Claims:
    sub = payload.get("sub")
    if sub is not None and not isinstance(sub, str):
        raise TokenError(f"the sub claim is {_a_json_type(sub)}, not a string")
    aud = payload.get("aud")
    if aud is not None:
        if isinstance(aud, str):
            raise TokenError("the aud claim is a string; NSM's tokens carry an array")
        if not isinstance(aud, list):
            raise TokenError(f"the aud claim is {_a_json_type(aud)}, not an array of strings")
        if not all(isinstance(a, str) for a in aud):
            raise TokenError("the aud claim holds something other than strings")
        aud = tuple(aud)
    exp = payload.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        raise TokenError(f"the exp claim is {_a_json_type(exp)}, not a number")
    if isinstance(exp, float) and not math.isfinite(exp):
        raise TokenError("the exp claim is not a finite number")  # 1e999 parses as infinity
    return Claims(sub=sub, aud=aud, exp=exp)


def _json_object(part: str, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise TokenError(f"the token's {part} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenError(f"the token's {part} is {_a_json_type(value)}, not a JSON object")
    return value


# --- per-RPC metadata -------------------------------------------------------------------------


def token_metadata(token: Token) -> tuple[tuple[str, str], tuple[str, str]]:
    """The per-RPC metadata that carries `token` (what the sdk's PerRPCCredentials sends)."""
    return ((TOKEN_KEY, token.value), (EXPIRES_KEY, format_rfc3339nano(token.expires)))


def read_token_metadata(metadata: Iterable[tuple[str, str | bytes]]) -> CallerToken:
    """The caller's token and expiry from request metadata.

    Each key must come exactly once (the sdk's reader refuses zero or several values), and the
    expiry must be RFC 3339. Raises TokenError naming the key. Keys compare case-insensitively,
    as gRPC metadata keys do.
    """
    values: dict[str, list[str | bytes]] = {TOKEN_KEY: [], EXPIRES_KEY: []}
    for name, value in metadata:
        found = values.get(name.lower())
        if found is not None:
            found.append(value)
    token = _single_value(TOKEN_KEY, values[TOKEN_KEY])
    expires = _single_value(EXPIRES_KEY, values[EXPIRES_KEY])
    try:
        expires_ns = parse_rfc3339nano(expires)
    except ValueError as e:
        raise TokenError(f"{EXPIRES_KEY}: {e}") from None
    return CallerToken(value=token, expires_ns=expires_ns)


def _single_value(key: str, values: Sequence[str | bytes]) -> str:
    if len(values) != 1:
        raise TokenError(f"metadata {key!r} has {len(values)} values; exactly one is required")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise TokenError(f"metadata {key!r} is not ASCII") from None
    return value


# --- RFC 3339 with nanoseconds (Go's time.RFC3339Nano) -----------------------------------------


def format_rfc3339nano(when: datetime | int) -> str:
    """`when` (an aware datetime, or nanoseconds since the epoch) as Go's `time.RFC3339Nano`.

    Always UTC with `Z`; the fraction loses its trailing zeros and, when the time is a whole
    second, its dot too (Go's `.999999999` layout), e.g. `2025-01-02T03:04:05.1234Z`,
    `2025-01-02T03:04:05Z`.
    """
    if isinstance(when, bool):
        raise TypeError("a time is a datetime or an int of nanoseconds, not a bool")
    if isinstance(when, int):
        seconds, nanos = divmod(when, _NS_PER_SECOND)
        try:
            moment = _EPOCH + timedelta(seconds=seconds)
        except OverflowError:
            raise ValueError(f"{when} ns since the epoch is beyond years 1-9999") from None
    else:
        _check_aware("when", when)
        moment = when.astimezone(UTC)
        nanos = moment.microsecond * 1000
    fraction = f"{nanos:09d}".rstrip("0")
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        + (f".{fraction}" if fraction else "")
        + "Z"
    )


def parse_rfc3339nano(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time, as Go's `time.Parse(time.RFC3339Nano)`.

    Takes `Z` or a numeric offset and any number of fraction digits (beyond nanoseconds they are
    dropped, as Go drops them). Raises ValueError with the reason.
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise ValueError(f"{text[:64]!r} is not an RFC 3339 time (2006-01-02T15:04:05.999Z07:00)")
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction, zulu, sign, off_hours, off_minutes = match.group(7, 8, 9, 10, 11)
    if zulu:
        zone = UTC
    else:
        hours, minutes = int(off_hours), int(off_minutes)
        if hours > 23 or minutes > 59:
            raise ValueError(f"{text[:64]!r}: offset {sign}{off_hours}:{off_minutes} out of range")
        offset = timedelta(hours=hours, minutes=minutes)
        zone = timezone(-offset if sign == "-" else offset)
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=zone)
    except ValueError as e:
        raise ValueError(f"{text[:64]!r}: {e}") from None
    nanos = int((fraction or "0")[:9].ljust(9, "0"))
    return _unix_seconds(moment) * _NS_PER_SECOND + nanos


# --- registry path metadata -------------------------------------------------------------------


def registry_path_json(path: RegistryPath) -> str:
    """The `path` metadata value, as Go's encoding/json writes the sdk's grpcmetadata.Path.

    A path without segments is `{"Index":0,"PathSegments":null}` (a nil slice in Go), which is
    what a first Register sends.
    """
    if not 0 <= path.index <= _UINT32_MAX:
        raise ValueError(f"path index {path.index} is not a uint32")
    segments = [{"token": token} for token in path.tokens] if path.tokens else None
    return _go_json({"Index": path.index, "PathSegments": segments}).decode("utf-8")


def parse_registry_path(text: str | bytes) -> RegistryPath:
    """A `path` metadata value (as a registry server sends back in its `path` header).

    Read as Go's encoding/json reads it into the sdk's grpcmetadata.Path: field names match
    case-insensitively (Unicode folding), the last of repeated members wins, null leaves a field
    as it was (`null` itself is the empty path), unknown fields are ignored. Refused, with the
    reason (TokenError): what is not JSON or not UTF-8 (Go would put U+FFFD in its place: a
    lone surrogate escaped in a token, say, which could not be sent on again), wrong types and
    a null segment (Go would hold a nil segment that its updatepath cannot use).
    """
    try:
        raw = text.decode("utf-8") if isinstance(text, bytes) else text
        value = json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=_Members)
    except (UnicodeDecodeError, ValueError) as e:
        raise TokenError(f"the path metadata is not JSON: {e}") from None
    if value is None:
        return RegistryPath()
    if not isinstance(value, _Members):
        raise TokenError(f"the path metadata is {_a_json_type(value)}, not a JSON object")
    index = _field(value, "Index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= _UINT32_MAX:
        raise TokenError(f"the path metadata's Index is {_shown(index)}, not a uint32")
    segments = _field(value, "PathSegments", None)
    if segments is None:
        return RegistryPath(index=index)
    if not isinstance(segments, list):
        raise TokenError(f"the path metadata's PathSegments is {_a_json_type(segments)}")
    tokens = []
    for position, segment in enumerate(segments):
        if not isinstance(segment, _Members):
            raise TokenError(f"path segment {position} is {_a_json_type(segment)}, not an object")
        token = _field(segment, "token", "")
        if not isinstance(token, str):
            raise TokenError(f"the token of path segment {position} is {_a_json_type(token)}")
        try:
            token.encode("utf-8")  # (to be sent on again)
        except UnicodeEncodeError:
            raise TokenError(f"the token of path segment {position} is not Unicode text") from None
        tokens.append(token)
    return RegistryPath(index=index, tokens=tuple(tokens))


def registry_path_at_server(path: RegistryPath, caller_token: str, own_token: str) -> RegistryPath:
    """NSM's registry `updatepath` server: the path a client sent, at this server's hop (its
    `index` at our segment, the caller's token just before it).

    * no segments (a first Register): `[caller, own]`;
    * the segment after the client's missing: the client's token replaced, ours appended;
    * both there (a refresh): both tokens replaced, so a stored path never carries stale ones.

    The client gets the result back with its own index (`index - 1`), stores it and sends it
    again on its next call. TokenError when the index points past the segments.
    """
    if not path.tokens:
        return RegistryPath(index=1, tokens=(caller_token, own_token))
    if path.index + 1 > len(path.tokens):
        raise TokenError(
            f"the path's Index {path.index} points past its {len(path.tokens)} segment(s)"
        )
    tokens = list(path.tokens)
    tokens[path.index] = caller_token
    if path.index + 1 == len(tokens):
        tokens.append(own_token)
    else:
        tokens[path.index + 1] = own_token
    return RegistryPath(index=path.index + 1, tokens=tuple(tokens))


@attrs.frozen
class _Members:
    """A JSON object's members in document order, as Go's decoder meets them."""

    pairs: list[tuple[str, Any]]


def _field(obj: _Members, name: str, default: Any) -> Any:
    """Go's encoding/json: every member whose name matches the field's (exactly or folded)
    sets it, in order, so the last wins; a null one leaves it as it was."""
    folded = name.casefold()
    value = default
    for key, member in obj.pairs:
        if key.casefold() == folded and member is not None:
            value = member
    return value


def _shown(value: object) -> str:
    return _a_json_type(value) if isinstance(value, _Members | list) else repr(value)


# --- helpers ----------------------------------------------------------------------------------


def _p256_private_key(key: object) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TokenError(f"ES256 signs with an EC P-256 key, not {_key_kind(key)}")
    if not isinstance(key.curve, ec.SECP256R1):
        raise TokenError(f"ES256 signs with an EC P-256 key, not an EC {key.curve.name} key")
    return key


def _p256_public_key(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TokenError(f"ES256 verifies with an EC P-256 key, not {_key_kind(key)}")
    if not isinstance(key.curve, ec.SECP256R1):
        raise TokenError(f"ES256 verifies with an EC P-256 key, not an EC {key.curve.name} key")
    return key


def _key_kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "an RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "an Ed25519 key"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "an Ed448 key"
    return f"a {type(key).__name__}"


def _check_spiffe_id(name: str, value: object) -> None:
    # The identity module validates SPIFFE IDs fully; this only catches a wrong argument
    # (a SpiffeId object instead of its string, an empty value) before it is signed.
    if not isinstance(value, str) or not value.startswith("spiffe://"):
        raise ValueError(f"{name} must be a SPIFFE ID string (spiffe://...), not {value!r}")


def _check_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime (a naive one has no instant)")


def _unix_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch, rounded down (golang-jwt truncates `exp` to seconds)."""
    return (moment - _EPOCH) // _SECOND


def _from_unix_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1000)


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64decode(part: str, text: str) -> bytes:
    if not _BASE64URL.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError(f"the token's {part} is not base64url without padding")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError(f"the token's {part} is not base64url without padding") from None


def _go_json(value: object) -> bytes:
    """Compact JSON as Go's encoding/json writes it (HTML characters and U+2028/9 escaped)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[m.group()], text).encode("utf-8")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _a_json_type(value: object) -> str:
    """What JSON calls `value`, with its article ("an array", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
