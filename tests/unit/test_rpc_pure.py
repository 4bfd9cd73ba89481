"""The pure parts of proxy/rpc: target addresses, grpc-timeout encoding, backoff.

These decide what is dialled, what deadline a peer is told and how fast a lost peer is redialled;
the wire behaviour around them is in tests/integration/test_rpc_interop.py.
"""

from __future__ import annotations

import ipaddress
import math
import re
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rpc import (
    AddressError,
    Backoff,
    CallContext,
    NotFoundError,
    Peer,
    TcpAddress,
    UnixAddress,
    parse_address,
)
from proxy.rpc.server import ResponseHeaders
from proxy.rpc.status import describe_status, encode_timeout

pytestmark = pytest.mark.timeout(30)

# -- addresses ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("unix:///run/nsm/nsm.io.sock", UnixAddress("/run/nsm/nsm.io.sock")),
        ("unix:/run/nsm/nsm.io.sock", UnixAddress("/run/nsm/nsm.io.sock")),
        ("unix:///tmp/a%20b.sock", UnixAddress("/tmp/a b.sock")),  # grpcio's percent-encoding
        ("127.0.0.1:5001", TcpAddress("127.0.0.1", 5001)),
        ("tcp://127.0.0.1:5001", TcpAddress("127.0.0.1", 5001)),  # NSM's URL form
        ("localhost:65535", TcpAddress("localhost", 65535)),
        ("ipam-service:7777", TcpAddress("ipam-service", 7777)),
        ("[::1]:5001", TcpAddress("::1", 5001)),
        ("[2001:db8::1]:1", TcpAddress("2001:db8::1", 1)),
        ("tcp://[2001:db8::1]:80", TcpAddress("2001:db8::1", 80)),
    ],
)
def test_parse_address_accepts_the_grpc_target_forms(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("unix:relative.sock", "absolute"),
        ("unix://relative.sock", "absolute"),
        ("unix:///", "absolute"),
        ("unix:///" + "x" * 107, "too long"),  # sun_path holds 107 bytes
        ("http://host:80", "scheme"),
        ("dns:///host:80", "scheme"),
        ("host", ":port"),
        ("", ":port"),
        (":80", "host"),
        ("::1:80", "brackets"),
        ("2001:db8::1:80", "brackets"),
        ("[::1:80", "[ipv6]:port"),
        ("[::1]80", "[ipv6]:port"),
        ("[]:80", "IPv6"),
        ("[198.18.0.1]:80", "IPv6"),
        ("ho st:80", "host name"),
        ("-host:80", "host name"),
        ("198.18.0.256:80", "IPv4"),
        ("host:0", "port"),
        ("host:65536", "port"),
        ("host:-1", "port"),
        ("host:http", "port"),
        ("host:", "port"),
    ],
)
def test_parse_address_rejects_bad_targets_with_the_reason(text, reason):
    with pytest.raises(AddressError) as caught:
        parse_address(text)
    assert reason.lower() in str(caught.value).lower()
    assert isinstance(caught.value, ValueError)  # configuration code catches ValueError


def test_parse_address_options_restrict_or_widen_what_is_accepted():
    with pytest.raises(AddressError):
        parse_address("unix:///run/x.sock", unix=False)
    with pytest.raises(AddressError):
        parse_address("tcp://198.18.0.1:80", tcp_scheme=False)
    with pytest.raises(AddressError):
        parse_address(":5001")
    assert parse_address(":5001", listen=True) == TcpAddress("", 5001)
    assert parse_address("198.18.0.1:80", unix=False, tcp_scheme=False) == TcpAddress(
        "198.18.0.1", 80
    )


def test_addresses_render_the_authority_grpc_peers_expect():
    assert TcpAddress("::1", 5001).authority == "[::1]:5001"
    assert str(TcpAddress("::1", 5001)) == "[::1]:5001"
    assert TcpAddress("198.18.0.1", 80).authority == "198.18.0.1:80"
    assert UnixAddress("/run/x.sock").authority == "localhost"
    assert str(UnixAddress("/run/x.sock")) == "unix:///run/x.sock"


_hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.from_regex(
        r"[a-z]([a-z0-9-]{0,18}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,8}[a-z0-9])?){0,3}", fullmatch=True
    ),
)


@given(host=_hosts, port=st.integers(1, 65535))
def test_parse_address_round_trips_tcp_addresses(host, port):
    address = TcpAddress(host, port)
    parsed = parse_address(str(address))
    assert parsed == address
    if ":" in host:
        assert isinstance(parsed, TcpAddress)
        assert ipaddress.ip_address(parsed.host) == ipaddress.ip_address(host)


@given(path=st.from_regex(r"(/[A-Za-z0-9._-]{1,12}){1,6}", fullmatch=True))
def test_parse_address_round_trips_unix_paths(path):
    assert parse_address(str(UnixAddress(path))) == UnixAddress(path)
    assert parse_address(f"unix:{path}") == UnixAddress(path)


# -- grpc-timeout ---------------------------------------------------------------------------------

_UNIT_SECONDS = {
    "n": Fraction(1, 10**9),
    "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    "S": Fraction(1),
    "M": Fraction(60),
    "H": Fraction(3600),
}
_ORDER = "numSMH"


def _decode(header: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d{1,8})([numSMH])", header)
    assert match, f"{header!r} is not a valid grpc-timeout (at most 8 digits and a unit)"
    return int(match.group(1)), match.group(2)


@pytest.mark.parametrize(
    ("seconds", "header"),
    [
        (0.0, "1n"),  # never zero: a zero timeout is already expired on arrival
        (1e-9, "1n"),
        (1.5e-9, "2n"),  # rounds up, never down
        (0.099999999, "99999999n"),  # exactly 8 digits still fits
        (0.125, "125000u"),  # 9 digits of ns: the next unit
        (0.1000000001, "100001u"),  # rounded up in the coarser unit too
        (0.5, "500000u"),
        (2.0, "2000000u"),
        (99.999999, "99999999u"),
        (100.0, "100000m"),
        (500.0, "500000m"),
        (99_999.999, "99999999m"),
        (100_000.0, "100000S"),
        (1e6, "1000000S"),
        (99_999_999.0, "99999999S"),
        (1e8, "1666667M"),  # 1666666.67 minutes, rounded up
        (3600.0 * 99_999_999, "99999999H"),
        (1e300, "99999999H"),  # capped at the largest the protocol can say (no OverflowError)
        (1.7976931348623157e308, "99999999H"),
    ],
)
def test_encode_timeout_uses_the_finest_unit_within_8_digits_rounding_up(seconds, header):
    assert encode_timeout(seconds) == header


@pytest.mark.parametrize("seconds", [-0.001, -1.0, math.inf, -math.inf, math.nan])
def test_encode_timeout_rejects_what_is_not_a_time_left(seconds):
    with pytest.raises(ValueError, match="finite and non-negative"):
        encode_timeout(seconds)


_CAP = 99_999_999 * _UNIT_SECONDS["H"]


@given(seconds=st.floats(min_value=0, allow_nan=False, allow_infinity=False))
def test_encode_timeout_never_tells_the_peer_less_time_and_is_as_precise_as_8_digits_allow(
    seconds,
):
    value, unit = _decode(encode_timeout(seconds))
    told = value * _UNIT_SECONDS[unit]
    exact = Fraction(seconds)
    if exact > _CAP:
        assert told == _CAP  # the most the protocol can say
        return
    # Never earlier than our own deadline (the float division may be off by an ulp or so).
    assert told >= exact * (1 - Fraction(1, 10**12))
    # At most one unit later (and 1 unit for zero).
    assert told - exact <= _UNIT_SECONDS[unit] * (1 + Fraction(1, 10**6))
    # A finer unit would have needed more than 8 digits.
    if unit != "n":
        finer = _UNIT_SECONDS[_ORDER[_ORDER.index(unit) - 1]]
        assert exact / finer > 99_999_999 * (1 - Fraction(1, 10**12))


# -- backoff --------------------------------------------------------------------------------------


def _fixed(factor: float):
    calls: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        calls.append((low, high))
        return factor

    return uniform, calls


def test_backoff_grows_exponentially_up_to_the_cap_then_stays_there():
    uniform, _ = _fixed(1.0)
    backoff = Backoff(maximum=10.0, initial=1.0, multiplier=2.0, uniform=uniform)
    assert [backoff.next_delay() for _ in range(7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_backoff_defaults_follow_grpc_connection_backoff_with_a_short_start():
    uniform, calls = _fixed(1.0)
    backoff = Backoff(maximum=5.0, uniform=uniform)
    delays = [backoff.next_delay() for _ in range(4)]
    assert delays == pytest.approx([0.2, 0.32, 0.512, 0.8192])
    assert calls == [(0.8, 1.2)] * 4  # +-20 % jitter


def test_backoff_jitter_spreads_each_delay_but_never_above_the_cap():
    high, _ = _fixed(1.2)
    backoff = Backoff(maximum=1.0, initial=0.5, multiplier=2.0, uniform=high)
    assert [backoff.next_delay() for _ in range(3)] == [pytest.approx(0.6), 1.0, 1.0]
    low, _ = _fixed(0.8)
    backoff = Backoff(maximum=1.0, initial=0.5, multiplier=2.0, uniform=low)
    assert [backoff.next_delay() for _ in range(3)] == [pytest.approx(0.4), 0.8, 0.8]


def test_backoff_jitter_is_asked_for_the_configured_fraction():
    uniform, calls = _fixed(1.0)
    Backoff(maximum=1.0, initial=0.1, jitter=0.5, uniform=uniform).next_delay()
    assert calls == [(0.5, 1.5)]


def test_backoff_reset_starts_again_from_the_initial_delay():
    uniform, _ = _fixed(1.0)
    backoff = Backoff(maximum=10.0, initial=1.0, multiplier=2.0, uniform=uniform)
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert [backoff.next_delay() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_backoff_stays_capped_after_a_very_long_outage():
    uniform, _ = _fixed(1.0)
    backoff = Backoff(maximum=30.0, initial=0.2, uniform=uniform)
    for _ in range(100_000):  # days of retries: no OverflowError, still the cap
        delay = backoff.next_delay()
    assert delay == 30.0


@pytest.mark.parametrize(("initial", "maximum"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_backoff_rejects_an_impossible_configuration(initial, maximum):
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(maximum=maximum, initial=initial)


@given(
    initial=st.floats(0.001, 10),
    extra=st.floats(0, 100),
    multiplier=st.floats(1.0, 4.0),
    jitter=st.floats(0, 0.9),
    draws=st.lists(st.floats(0, 1), min_size=1, max_size=40),
)
def test_backoff_with_the_default_random_source_stays_within_its_band(
    initial, extra, multiplier, jitter, draws
):
    maximum = initial + extra
    position = iter(draws)
    backoff = Backoff(
        maximum=maximum,
        initial=initial,
        multiplier=multiplier,
        jitter=jitter,
        uniform=lambda low, high: low + (high - low) * next(position),
    )
    for attempt in range(len(draws)):
        base = min(maximum, initial * multiplier**attempt)
        delay = backoff.next_delay()
        assert delay <= maximum
        assert delay >= base * (1 - jitter) * (1 - 1e-9)
        assert delay <= base * (1 + jitter) * (1 + 1e-9)


# -- small helpers the handlers and logs rely on -------------------------------------------------


def test_call_context_metadata_returns_the_first_value_of_a_key_or_none():
    context = CallContext(
        service_name="grpc.health.v1.Health",
        method_name="Check",
        custom_metadata=(("x-key", "one"), ("x-key-bin", b"\x00\xff"), ("x-key", "two")),
        peer=Peer(address="unix:/run/x.sock"),
        deadline=math.inf,
    )
    assert context.metadata("x-key") == "one"
    assert context.metadata("x-key-bin") == b"\x00\xff"
    assert context.metadata("absent") is None


def test_describe_status_names_the_code_and_message():
    assert describe_status(NotFoundError("no such service")) == "NOT_FOUND: no such service"
    assert describe_status(NotFoundError()) == "NOT_FOUND"


# -- response header metadata ---------------------------------------------------------------------


def test_response_headers_are_refused_at_the_handlers_line_when_malformed_or_late() -> None:
    headers = ResponseHeaders()
    headers.add("path", '{"Index":0}')
    headers.add("x-blob-bin", b"\x00")
    for key, value in (
        ("x-blob", b"\x00"),  # bytes need a -bin key
        ("x-text-bin", "text"),  # and a -bin key needs bytes
        ("grpc-status", "0"),  # reserved
        ("Path", "x"),  # HTTP/2 header names are lower case
    ):
        with pytest.raises(ValueError, match=repr(key)):
            headers.add(key, value)
    assert headers.items == [("path", '{"Index":0}'), ("x-blob-bin", b"\x00")]
    headers.sent = True
    with pytest.raises(RuntimeError, match="after the response headers went out"):
        headers.add("late", "x")
