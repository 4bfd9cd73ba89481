"""NSM's default authorization policies over a path's tokens (pure).

An NSM server (the proxy's endpoint for its targets; nsmgr for the proxy's calls) checks the left
side of the path, segments `0..index`, once the tokens are in place: the caller's token (from
the `nsm-client-token` metadata) in segment `index-1` and its own freshly signed one in segment
`index` (the sdk's `updatetoken` runs before `authorize`). The first policy that fails denies
the call; the caller answers PERMISSION_DENIED with the `Denial`'s text (NSM itself says only
"no sufficient privileges", which nobody can act on).

The policies, as networkservicemesh/sdk writes them in Rego (`pkg/tools/opa/policies/`:
`tokens_valid.rego`, `common/tokens_expired.rego` and `tokens_expired.rego`,
`common/tokens_chained.rego` and `tokens_chained.rego`, `prev_token_signed.rego`;
`pkg/tools/opa/{policies.go,policy.go,opainput.go}`; the servers in
`pkg/networkservice/common/authorize/{server.go,common.go}` and
`pkg/registry/common/authorize/{common.go,nse_server.go,ns_server.go}`):

1. `tokens_valid`: every token decodes as a JWT (`io.jwt.decode`; no signature check). A path
   with no segments passes.
2. `tokens_expired`: every token's `exp` is after now (`now < exp`, now in fractional seconds);
   a token without `exp` fails.
3. `tokens_chained`: for each adjacent pair, `sub` of token i+1 is in `aud` of token i; a path
   of fewer than two segments passes.
4. `prev_token_signed` (server side): `index >= 1` and token `index-1` verifies as ES256 with the
   public key of the TLS peer's leaf certificate; no certificate, no pass.

The registry server applies the same token policies to the `path` metadata's left side and adds
`client_allowed` (`registry/client_allowed.rego`, as its test in `pkg/tools/opa/` shows): a
resource name nobody registered yet is free; one already registered may be refreshed or
unregistered only by a caller whose SPIFFE ID (the `sub` of path token 0) is among the path ids
recorded for it.

Where this deviates, and why:

* The order is valid, expired, chained, signed (decoding first, so later reasons can name
  claims); NSM loads its policy files in directory order (chained, expired, valid, then the
  server's). Only which reason is reported can differ: a path passes or fails all the same.
* An index beyond the segments is denied as `path` (NSM slices `[:index+1]` and panics; its
  `updatepath` runs first and never lets that happen).
* `tokens_chained` asks "is sub among aud" for an `aud` of any length. The 2020 Rego (`contains`)
  says exactly that; the newer `common/` Rego (`r := p1.aud[_] == p2.sub`) gives conflicting
  results, an evaluation error, for an `aud` with a match and a non-match. NSM's tokens carry a
  single audience, where both agree.
* Claims of the wrong JSON type (a string `aud`, a non-number `exp`) fail `tokens_valid` here,
  where OPA would decode them and fail later (or, for a string `exp`, compare across types and
  pass: Rego orders every number before every string).
* `tokens_expired` exists upstream in two forms: the policy NSM has had since 2020 checks every
  segment given to it, which is what wire-api §2.3 records for sdk v1.14.5; the one stored as
  `common/tokens_expired.rego` checks only the segments from `index` on (sdk issue 1512 / PR
  1517: a Close after the client's token expired must still get through). Over the server's
  left side that is its own fresh token alone. `ExpiryScope` picks one; the default is the whole
  left side, the stricter reading, so a caller that wants the lenient one asks for it by name:
  `proxy.nsm.hoptoken` does for a Close, which the manager sends for a vanished client exactly
  when the client's token has expired.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from proxy.api.networkservice.connection_pb2 import Path
from proxy.security.tokens import (
    Claims,
    RegistryPath,
    TokenError,
    decode,
    format_rfc3339nano,
    verify,
)

__all__ = [
    "Denial",
    "ExpiryScope",
    "Policy",
    "authorize_registration",
    "authorize_request",
    "check_tokens",
    "registry_caller_id",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_SECOND = 1_000_000_000


class Policy(enum.Enum):
    """Which policy denied a call (the names of NSM's Rego policies, and ours for `PATH`)."""

    PATH = "path"
    TOKENS_VALID = "tokens_valid"
    TOKENS_EXPIRED = "tokens_expired"
    TOKENS_CHAINED = "tokens_chained"
    PREV_TOKEN_SIGNED = "prev_token_signed"
    CLIENT_ALLOWED = "client_allowed"


class ExpiryScope(enum.Enum):
    """Which tokens `tokens_expired` looks at (NSM has had both forms; see the module text)."""

    LEFT_SIDE = "left_side"  # every segment 0..index
    FROM_INDEX = "from_index"  # segment index only (the right side of the left side)


@attrs.frozen
class Denial:
    """The policy that failed and why, in words an operator can act on."""

    policy: Policy
    reason: str

    def __str__(self) -> str:
        return f"{self.policy.value}: {self.reason}"


def check_tokens(
    tokens: Sequence[str],
    index: int,
    *,
    now: datetime,
    peer_certificate: x509.Certificate | None,
    expiry_scope: ExpiryScope = ExpiryScope.LEFT_SIDE,
) -> Denial | None:
    """The first of NSM's four default policies that the tokens `0..index` fail, or None.

    `tokens` are the path's tokens in segment order (segments after `index` are ignored, as
    NSM passes only the left side); `peer_certificate` is the TLS peer's leaf.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be an aware datetime")
    if index < 0:
        return Denial(Policy.PATH, f"path index {index} is negative")
    if not tokens:
        index = 0  # the sdk's registry takes an empty path as index 0 (getLeftSideOfPath)
    elif index >= len(tokens):
        return Denial(Policy.PATH, f"path index {index} is beyond its {len(tokens)} segments")
    left = tokens[: index + 1]

    claims: list[Claims] = []
    for position, token in enumerate(left):
        try:
            claims.append(decode(token))
        except TokenError as e:
            return Denial(Policy.TOKENS_VALID, f"token {position}: {e}")

    first = index if expiry_scope is ExpiryScope.FROM_INDEX else 0
    now_ns = (now - _EPOCH) // timedelta(microseconds=1) * 1000
    for position in range(first, len(claims)):
        exp = claims[position].exp
        if exp is None:
            return Denial(Policy.TOKENS_EXPIRED, f"token {position} has no exp")
        if not now_ns < exp * _NS_PER_SECOND:
            return Denial(
                Policy.TOKENS_EXPIRED,
                f"token {position} (sub {claims[position].sub!r}) expired at {_instant(exp)},"
                f" now is {format_rfc3339nano(now)}",
            )

    for position in range(len(claims) - 1):
        aud, sub = claims[position].aud, claims[position + 1].sub
        if aud is None:
            return Denial(Policy.TOKENS_CHAINED, f"token {position} has no aud")
        if sub is None:
            return Denial(Policy.TOKENS_CHAINED, f"token {position + 1} has no sub")
        if sub not in aud:
            return Denial(
                Policy.TOKENS_CHAINED,
                f"token {position + 1}'s sub {sub!r} is not in token {position}'s aud {list(aud)}",
            )

    return _prev_token_signed(left, index, peer_certificate)


def _prev_token_signed(
    left: Sequence[str], index: int, peer_certificate: x509.Certificate | None
) -> Denial | None:
    if index < 1:
        return Denial(
            Policy.PREV_TOKEN_SIGNED, "path index is 0: there is no previous token to check"
        )
    if peer_certificate is None:
        return Denial(
            Policy.PREV_TOKEN_SIGNED,
            f"no TLS peer certificate to check token {index - 1}'s signature with",
        )
    try:
        public_key = peer_certificate.public_key()
    except (UnsupportedAlgorithm, ValueError) as e:
        return Denial(Policy.PREV_TOKEN_SIGNED, f"the TLS peer certificate's key: {e}")
    try:
        verify(left[index - 1], public_key)
    except TokenError as e:
        return Denial(Policy.PREV_TOKEN_SIGNED, f"token {index - 1} is not the TLS peer's: {e}")
    return None


def authorize_request(
    path: Path,
    *,
    now: datetime,
    peer_certificate: x509.Certificate | None,
    expiry_scope: ExpiryScope = ExpiryScope.LEFT_SIDE,
) -> Denial | None:
    """NSM's endpoint `authorize` server over a connection's path (Request and Close alike).

    Call it with the path as this hop has it after `updatepath` and the tokens: the caller's
    token in segment `index-1`, our own in segment `index`.
    """
    tokens = [segment.token for segment in path.path_segments]
    if not tokens:
        return Denial(Policy.PATH, "the connection has no path segments")
    return check_tokens(
        tokens,
        path.index,
        now=now,
        peer_certificate=peer_certificate,
        expiry_scope=expiry_scope,
    )


def registry_caller_id(path: RegistryPath) -> str:
    """The caller's SPIFFE ID as the registry's authorize server takes it: `sub` of token 0.

    "" when there is none (the sdk logs a warning and goes on with an empty ID).
    """
    if not path.tokens:
        return ""
    try:
        return decode(path.tokens[0]).sub or ""
    except TokenError:
        return ""


def authorize_registration(
    path: RegistryPath,
    *,
    resource_name: str,
    path_ids: Mapping[str, Sequence[str]],
    now: datetime,
    peer_certificate: x509.Certificate | None,
    expiry_scope: ExpiryScope = ExpiryScope.LEFT_SIDE,
) -> Denial | None:
    """NSM's registry `authorize` server for a Register or Unregister of `resource_name`.

    `path` is the `path` metadata after this server's own updatepath (the caller's token in
    segment `index-1`); `path_ids` maps each registered name to the path ids recorded when it
    was registered. The token policies come first, then `client_allowed`.
    """
    denial = check_tokens(
        path.tokens,
        path.index,
        now=now,
        peer_certificate=peer_certificate,
        expiry_scope=expiry_scope,
    )
    if denial is not None:
        return denial
    owners = path_ids.get(resource_name)
    caller = registry_caller_id(path)
    if owners is not None and caller not in owners:
        return Denial(
            Policy.CLIENT_ALLOWED,
            f"{resource_name!r} is registered by {list(owners)}, not by {caller!r}",
        )
    return None


def _instant(exp: float) -> str:
    """`exp` as RFC 3339 where it is a representable time, else the number itself."""
    try:
        return format_rfc3339nano(int(exp * _NS_PER_SECOND))
    except (ValueError, OverflowError):
        return f"{exp} s after the epoch"
