"""Configuration: Go durations, upstream defaults, validation and its one-line problems."""

import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy import config
from proxy.config import (
    Config,
    ConfigError,
    IdentitySource,
    IpFamily,
    LogFormat,
    LogLevel,
    describe,
    format_duration,
    format_duration_ns,
    load,
    parse_duration,
    parse_duration_ns,
    unknown_variables,
)

NS = 1
US = 1_000
MS = 1_000_000
S = 1_000_000_000
M = 60 * S
H = 60 * M

# ---------------------------------------------------------------------------------------------
# Durations: the examples of Go's time.ParseDuration tests


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0", 0),
        ("-0", 0),
        ("+0", 0),
        ("5s", 5 * S),
        ("30s", 30 * S),
        ("1478s", 1478 * S),
        ("-5s", -5 * S),
        ("+5s", 5 * S),
        ("-0s", 0),
        ("5.0s", 5 * S),
        ("5.6s", 5 * S + 600 * MS),
        ("5.s", 5 * S),
        (".5s", 500 * MS),
        ("1.0s", 1 * S),
        ("1.00s", 1 * S),
        ("1.004s", 1 * S + 4 * MS),
        ("1.0040s", 1 * S + 4 * MS),
        ("100.00100s", 100 * S + 1 * MS),
        ("10ns", 10 * NS),
        ("11us", 11 * US),
        ("12\u00b5s", 12 * US),
        ("12\u03bcs", 12 * US),
        ("13ms", 13 * MS),
        ("300ms", 300 * MS),
        ("14s", 14 * S),
        ("15m", 15 * M),
        ("16h", 16 * H),
        ("24h", 24 * H),
        ("1.5h", 90 * M),
        ("3h30m", 3 * H + 30 * M),
        ("1m30s", 90 * S),
        ("10.5s4m", 4 * M + 10 * S + 500 * MS),
        ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
        ("1h2m3s4ms5us6ns", H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
        ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
        ("52763797000ns", 52763797000 * NS),
        ("0.3333333333333333333h", 20 * M),
        ("9007199254740993ns", (1 << 53) + 1),
        ("9223372036854775807ns", (1 << 63) - 1),
        ("9223372036854775.807us", (1 << 63) - 1),
        ("9223372036s854ms775us807ns", (1 << 63) - 1),
        ("-9223372036854775808ns", -(1 << 63)),
        ("0.100000000000000000000h", 6 * M),
        ("0.830103483285477580700h", 49 * M + 48 * S + 372539827 * NS),
        ("1.5ns", 1),  # fractions of a nanosecond are truncated, as in Go
    ],
)
def test_parse_go_durations(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns
    assert parse_duration(text) == ns / S


@pytest.mark.parametrize(
    "text",
    [
        "",
        "3",
        "-",
        "+",
        "s",
        ".",
        "-.",
        ".s",
        "+.s",
        "1d",
        "1S",
        "1e3s",
        " 5s",
        "5s ",
        "5 s",
        "1h-1m",
        "1.5.5s",
        "5sec",
        "00",
        "1.5h2x",
        "9223372036854775808ns",
        "9223372036854775.808us",
        "9223372036854ms775us808ns",
        "-9223372036854775809ns",
        "99999999999999999999999h",
    ],
)
def test_parse_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration_ns(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1 * NS, "1ns"),
        (1100 * NS, "1.1\u00b5s"),
        (2200 * US, "2.2ms"),
        (3300 * MS, "3.3s"),
        (-(4 * M + 5 * S), "-4m5s"),
        (4 * M + 5001 * MS, "4m5.001s"),
        (5 * H + 6 * M + 7001 * MS, "5h6m7.001s"),
        (8 * M + 1 * NS, "8m0.000000001s"),
        (24 * H, "24h0m0s"),
        (5 * M, "5m0s"),
        ((1 << 63) - 1, "2562047h47m16.854775807s"),
        (-(1 << 63), "-2562047h47m16.854775808s"),
    ],
)
def test_format_like_go(ns: int, text: str) -> None:
    assert format_duration_ns(ns) == text


int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@given(int64)
def test_format_then_parse_is_exact_in_nanoseconds(ns: int) -> None:
    text = format_duration_ns(ns)
    assert re.fullmatch(r"-?(\d+h)?(\d+m)?\d+(\.\d+)?(s|ms|\u00b5s|ns)", text)
    assert parse_duration_ns(text) == ns


@given(st.integers(min_value=-(1 << 52), max_value=1 << 52))
def test_format_then_parse_round_trips_float_seconds(ns: int) -> None:
    seconds = ns / S
    assert parse_duration(format_duration(seconds)) == seconds


@given(
    st.lists(
        st.tuples(st.integers(0, 10**5), st.sampled_from(["h", "m", "s", "ms", "us", "ns"])),
        min_size=1,
        max_size=4,
    )
)
def test_parse_then_format_then_parse_is_stable(parts: list[tuple[int, str]]) -> None:
    ns = parse_duration_ns("".join(f"{n}{unit}" for n, unit in parts))
    assert parse_duration_ns(format_duration_ns(ns)) == ns


# ---------------------------------------------------------------------------------------------
# Defaults

UPSTREAM_DEFAULTS = {
    "NSM_NAME": "proxy",
    "NSM_SERVICE_NAME": "proxy",
    "NSM_CONNECT_TO": "unix:///var/lib/networkservicemesh/nsm.io.sock",
    "NSM_DIAL_TIMEOUT": 5.0,
    "NSM_REQUEST_TIMEOUT": 15.0,
    "NSM_MAX_TOKEN_LIFETIME": 24 * 3600.0,
    "NSM_IPAM_SERVICE": "ipam-service:7777",
    "NSM_HOST": "node-a",  # upstream "", which this project refuses (§11.23)
    "NSM_NETWORK_SERVICE_NAME": "load-balancer",
    "NSM_NAMESPACE": "default",
    "NSM_TRENCH": "default",
    "NSM_CONDUIT": "load-balancer",
    "NSM_NSP_SERVICE_NAME": "nsp-service",
    "NSM_NSP_SERVICE_PORT": 7778,
    "NSM_IP_FAMILY": IpFamily.DUALSTACK,
    "NSM_LOG_LEVEL": LogLevel.DEBUG,
    "NSM_MTU": 1500,
    "NSM_GRPC_KEEPALIVE_TIME": 30.0,
    "NSM_GRPC_PROBE_RPC_TIMEOUT": 1.0,
    "NSM_GRPC_MAX_BACKOFF": 5.0,
    "NSM_IP_RELEASE_DELAY": 20.0,
    "NSM_BRIDGE_IP_RENEW_INTERVAL": 300.0,
}
NEW_DEFAULTS = {
    "NSM_HEALTH_ADDRESS": "unix:///tmp/health.sock",
    "NSM_HEALTH_TCP_ADDRESS": "",
    "NSM_STATE_DIR": "/tmp",
    "NSM_LOG_FORMAT": LogFormat.JSON,
    "NSM_SHUTDOWN_TIMEOUT": 20.0,
    "NSM_CONFIG_FILE": "",
    "NSM_NSP_SERVICE": "",
    "NSM_ROUTING_TABLE": 4096,
    "NSM_RULE_PRIORITY": 30000,
    "NSM_RECONCILE_INTERVAL": 30.0,
    "NSM_EGRESS_MODE": "auto",
    "NSM_ECMP_BUCKETS": 128,
    "NSM_ECMP_IDLE_TIMER": 5.0,
    "NSM_ECMP_UNBALANCED_TIMER": 60.0,
    "NSM_IDENTITY": "spiffe",
    "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/sockets/agent.sock",  # go-spiffe reads it so
    "NSM_TLS_CERT_FILE": "",
    "NSM_TLS_KEY_FILE": "",
    "NSM_TLS_BUNDLE_FILE": "",
    "NSM_AUTHORIZED_IDS": "",
}


def _by_env(cfg: Config) -> dict[str, object]:
    return {
        field.metadata[config.METADATA_KEY].env: getattr(cfg, field.name)
        for field in attrs.fields(Config)
    }


def test_defaults_are_upstream_defaults() -> None:
    assert len(UPSTREAM_DEFAULTS) == 22
    assert _by_env(load({"NSM_HOST": "node-a"})) == UPSTREAM_DEFAULTS | NEW_DEFAULTS


def test_constructor_defaults_equal_loaded_defaults() -> None:
    assert Config(host="node-a") == load({"NSM_HOST": "node-a"})


def test_metadata_defaults_are_the_field_defaults() -> None:
    for field in attrs.fields(Config):
        var = field.metadata[config.METADATA_KEY]
        if not var.required:
            assert load({"NSM_HOST": "n", var.env: var.default or ""}) == Config(host="n")


def test_variables_are_unique_and_documented() -> None:
    names = [var.env for var in config.variables()]
    assert len(names) == len(set(names)) == len(attrs.fields(Config))
    for var in config.variables():
        assert var.env.startswith("NSM_") or var.env == "SPIFFE_ENDPOINT_SOCKET"
        assert var.help.endswith(".")
        assert "\n" not in var.help
    reloadable = {var.env for var in config.variables() if var.reloadable}
    assert reloadable == {"NSM_LOG_LEVEL", "NSM_LOG_FORMAT"}


def test_derived_values() -> None:
    cfg = load({"NSM_HOST": "n", "NSM_TRENCH": "red", "NSM_NAMESPACE": "ns1"})
    assert cfg.nsp_address == "nsp-service-red.ns1:7778"
    assert cfg.ip_families == (IpFamily.IPV4, IpFamily.IPV6)
    assert load({"NSM_HOST": "n", "NSM_IP_FAMILY": "IPv6"}).ip_families == (IpFamily.IPV6,)
    assert load({"NSM_HOST": "n", "NSM_IP_FAMILY": "ipv4"}).ip_families == (IpFamily.IPV4,)


def test_values_are_structured() -> None:
    cfg = load(
        {
            "NSM_HOST": "worker-1",
            "NSM_DIAL_TIMEOUT": "1m30s",
            "NSM_IP_RELEASE_DELAY": "0",
            "NSM_MTU": "9000",
            "NSM_NSP_SERVICE_PORT": "65535",
            "NSM_LOG_LEVEL": "trace",
            "NSM_LOG_FORMAT": "TEXT",
            "NSM_CONNECT_TO": "tcp://[2001:db8::1]:5001",
            "NSM_IPAM_SERVICE": "unix:///run/ipam.sock",
            "NSM_HEALTH_TCP_ADDRESS": ":5005",
            "NSM_SHUTDOWN_TIMEOUT": "29.999s",
        }
    )
    assert cfg.dial_timeout == 90.0
    assert cfg.ip_release_delay == 0.0
    assert (cfg.mtu, cfg.nsp_service_port) == (9000, 65535)
    assert (cfg.log_level, cfg.log_format) == (LogLevel.TRACE, LogFormat.TEXT)
    assert cfg.connect_to == "tcp://[2001:db8::1]:5001"
    assert cfg.health_tcp_address == ":5005"
    assert cfg.shutdown_timeout == 29.999


@pytest.mark.parametrize(
    ("given", "level"),
    [
        ("TRACE", LogLevel.TRACE),
        ("debug", LogLevel.DEBUG),
        ("Info", LogLevel.INFO),
        ("WARNING", LogLevel.WARNING),
        ("warn", LogLevel.WARNING),
        ("error", LogLevel.ERROR),
        ("fatal", LogLevel.ERROR),
        ("PANIC", LogLevel.ERROR),
        ("critical", LogLevel.ERROR),
    ],
)
def test_log_level_spellings(given: str, level: LogLevel) -> None:
    assert load({"NSM_HOST": "n", "NSM_LOG_LEVEL": given}).log_level is level


def test_describe_gives_values_as_written_and_loads_back() -> None:
    cfg = load({"NSM_HOST": "n", "NSM_DIAL_TIMEOUT": "1.5s", "NSM_HEALTH_TCP_ADDRESS": ":5005"})
    described = describe(cfg)
    assert list(described) == [var.env for var in config.variables()]
    assert described["NSM_DIAL_TIMEOUT"] == "1.5s"
    assert described["NSM_MAX_TOKEN_LIFETIME"] == "24h0m0s"
    assert described["NSM_IP_FAMILY"] == "dualstack"
    assert described["NSM_MTU"] == "1500"
    assert load(described) == cfg


# ---------------------------------------------------------------------------------------------
# Alternative names


def test_alt_name_is_read_when_the_nsm_name_is_absent() -> None:
    cfg = load({"NSM_HOST": "n", "IP_FAMILY": "ipv4", "IP_RELEASE_DELAY": "1s"})
    assert cfg.ip_family is IpFamily.IPV4
    assert cfg.ip_release_delay == 1.0


def test_nsm_name_wins_over_alt_name() -> None:
    cfg = load({"NSM_HOST": "n", "NSM_IP_FAMILY": "ipv6", "IP_FAMILY": "ipv4"})
    assert cfg.ip_family is IpFamily.IPV6
    # Present but empty still counts as set, so the alt name is not consulted.
    with pytest.raises(ConfigError) as err:
        load({"NSM_HOST": "n", "NSM_GRPC_MAX_BACKOFF": "", "GRPC_MAX_BACKOFF": "1s"})
    assert err.value.problems == [
        "NSM_GRPC_MAX_BACKOFF='': set but empty; unset it to use the default 5s"
    ]


def test_problem_names_the_alt_name_that_was_read() -> None:
    with pytest.raises(ConfigError) as err:
        load({"NSM_HOST": "n", "GRPC_KEEPALIVE_TIME": "soon"})
    assert err.value.problems == [
        "GRPC_KEEPALIVE_TIME='soon': not a duration; "
        "expected a duration greater than 0 such as 300ms, 5s, 1m30s or 24h"
    ]


def test_unprefixed_names_without_alt_and_other_variables_are_ignored() -> None:
    cfg = load({"NSM_HOST": "n", "MTU": "abc", "TRENCH": "", "PATH": "/bin", "HOME": ""})
    assert cfg == Config(host="n")


def test_unknown_nsm_variables_are_listed_not_rejected() -> None:
    env = {"NSM_HOST": "n", "NSM_TRENCHE": "red", "NSM_MTU": "1500", "IP_FAMILY": "ipv4"}
    env |= {"NSM_LOGLEVEL": "x", "OTHER": "1"}
    assert load(env).trench == "default"
    assert unknown_variables(env) == ["NSM_LOGLEVEL", "NSM_TRENCHE"]


# ---------------------------------------------------------------------------------------------
# Bad values: exactly one line per problem, naming the variable and the value given

BAD = [
    # durations
    ("NSM_DIAL_TIMEOUT", "5", "not a duration"),
    ("NSM_DIAL_TIMEOUT", "0s", "not greater than 0"),
    ("NSM_REQUEST_TIMEOUT", "-15s", "not greater than 0"),
    ("NSM_MAX_TOKEN_LIFETIME", "1 day", "not a duration"),
    ("NSM_GRPC_KEEPALIVE_TIME", "0", "not greater than 0"),
    ("NSM_GRPC_PROBE_RPC_TIMEOUT", "1sec", "not a duration"),
    ("NSM_GRPC_MAX_BACKOFF", "-1ms", "not greater than 0"),
    ("NSM_BRIDGE_IP_RENEW_INTERVAL", "0", "not greater than 0"),
    ("NSM_BRIDGE_IP_RENEW_INTERVAL", "99999999999h", "duration out of range"),
    ("NSM_IP_RELEASE_DELAY", "-1s", "negative"),
    ("NSM_SHUTDOWN_TIMEOUT", "30s", "too long"),
    ("NSM_ROUTING_TABLE", "254", "a reserved table"),
    ("NSM_ROUTING_TABLE", "0", "a reserved table"),
    ("NSM_ROUTING_TABLE", "4294967296", "out of range"),
    ("NSM_RULE_PRIORITY", "32766", "out of range"),
    ("NSM_EGRESS_MODE", "ecmp", "unknown egress mode"),
    ("NSM_ECMP_BUCKETS", "0", "out of range"),
    ("NSM_ECMP_IDLE_TIMER", "0s", "not greater than 0"),
    ("NSM_ECMP_UNBALANCED_TIMER", "-1s", "negative"),
    ("NSM_RECONCILE_INTERVAL", "0", "not greater than 0"),
    ("NSM_SHUTDOWN_TIMEOUT", "0s", "not greater than 0"),
    # integers
    ("NSM_MTU", "abc", "not an integer"),
    ("NSM_MTU", "0x5dc", "not an integer"),
    ("NSM_MTU", "1_500", "not an integer"),
    ("NSM_MTU", " 1500", "not an integer"),
    ("NSM_MTU", "65536", "out of range"),
    ("NSM_MTU", "9" * 5000, "out of range"),
    ("NSM_NSP_SERVICE_PORT", "-7778", "out of range"),
    ("NSM_MTU", "1279", "out of range"),
    ("NSM_NSP_SERVICE_PORT", "0", "out of range"),
    ("NSM_NSP_SERVICE_PORT", "65536", "out of range"),
    ("NSM_NSP_SERVICE_PORT", "http", "not an integer"),
    # choices
    ("NSM_IP_FAMILY", "dual", "unknown IP family"),
    ("NSM_IP_FAMILY", "ipv4 ", "unknown IP family"),
    ("NSM_LOG_LEVEL", "VERBOSE", "unknown log level"),
    ("NSM_LOG_FORMAT", "logfmt", "unknown log format"),
    # names
    ("NSM_NAME", "proxy a", "contains whitespace"),
    ("NSM_TRENCH", "red\n", "contains whitespace"),
    ("NSM_CONDUIT", "\tlb", "contains whitespace"),
    ("NSM_NAMESPACE", "my ns", "contains whitespace"),
    ("NSM_SERVICE_NAME", "a b", "contains whitespace"),
    ("NSM_NETWORK_SERVICE_NAME", "lb x", "contains whitespace"),
    ("NSM_NSP_SERVICE_NAME", "nsp service", "contains whitespace"),
    ("NSM_HOST", "node a", "contains whitespace"),
    # addresses
    ("NSM_CONNECT_TO", "nsmgr", "missing :port"),
    ("NSM_CONNECT_TO", "unix://nsm.io.sock", "socket path not absolute"),
    ("NSM_CONNECT_TO", "tcp://nsmgr:0", "port not from 1 to 65535"),
    ("NSM_CONNECT_TO", "http://nsmgr:5001", "unexpected scheme"),
    ("NSM_IPAM_SERVICE", "tcp://ipam:7777", "unexpected scheme"),
    ("NSM_CONNECT_TO", "unix:///" + "x" * 107, "socket path too long or not valid"),
    ("NSM_IPAM_SERVICE", "ipam-service", "missing :port"),
    ("NSM_IPAM_SERVICE", ":7777", "missing host"),
    ("NSM_IPAM_SERVICE", "2001:db8::1:7777", "IPv6 without brackets"),
    ("NSM_IPAM_SERVICE", "[2001:db8::g]:7777", "not a valid IPv6 address in brackets"),
    ("NSM_IPAM_SERVICE", "[2001:db8::1]", "not [ipv6]:port"),
    ("NSM_IPAM_SERVICE", "300.1.1.1:7777", "not a valid IPv4 address"),
    ("NSM_IPAM_SERVICE", "ipam_service:7777", "not a host name or IPv4 address"),
    ("NSM_IPAM_SERVICE", "ipam:77777", "port not from 1 to 65535"),
    ("NSM_HEALTH_ADDRESS", "/tmp/health.sock", "not unix://"),
    ("NSM_HEALTH_ADDRESS", "unix:///", "socket path not absolute"),
    ("NSM_HEALTH_TCP_ADDRESS", "5005", "missing :port"),
    ("NSM_HEALTH_TCP_ADDRESS", "[::]:", "port not from 1 to 65535"),
]


@pytest.mark.parametrize(("name", "value", "reason"), BAD)
def test_each_bad_value_gives_one_line(name: str, value: str, reason: str) -> None:
    env = {"NSM_HOST": "n", name: value}
    with pytest.raises(ConfigError) as err:
        load(env)
    [problem] = err.value.problems
    assert problem.startswith(f"{name}={value!r}: {reason}; expected ")
    assert "\n" not in problem


@pytest.mark.parametrize("name", [var.env for var in config.variables() if not var.allow_empty])
def test_set_but_empty_is_an_error(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({"NSM_HOST": "n", name: ""})
    [problem] = err.value.problems
    if name == "NSM_HOST":
        assert problem.startswith("NSM_HOST='': set but empty; expected the node name")
    else:
        default = next(var.default for var in config.variables() if var.env == name)
        assert problem == f"{name}='': set but empty; unset it to use the default {default}"


def test_empty_health_tcp_address_means_off() -> None:
    assert load({"NSM_HOST": "n", "NSM_HEALTH_TCP_ADDRESS": ""}).health_tcp_address == ""


def test_host_is_required() -> None:
    with pytest.raises(ConfigError) as err:
        load({})
    assert err.value.problems == [
        "NSM_HOST is not set; expected the node name (spec.nodeName through the downward API) "
        "without whitespace"
    ]


def test_several_problems_give_several_lines_in_variable_order() -> None:
    env = {
        "NSM_SHUTDOWN_TIMEOUT": "1m",
        "NSM_MTU": "abc",
        "IP_FAMILY": "ipv5",
        "NSM_DIAL_TIMEOUT": "",
        "NSM_NAME": "a b",
    }
    with pytest.raises(ConfigError) as err:
        load(env)
    problems = err.value.problems
    assert [p.split("=")[0].split(" ")[0] for p in problems] == [
        "NSM_NAME",
        "NSM_DIAL_TIMEOUT",
        "NSM_HOST",
        "IP_FAMILY",
        "NSM_MTU",
        "NSM_SHUTDOWN_TIMEOUT",
    ]
    assert (
        "NSM_MTU='abc': not an integer; expected a whole number from 1280 to 65535 (dualstack)"
        in (problems)
    )
    assert str(err.value) == "\n".join(problems)


@pytest.mark.parametrize(
    ("family", "mtu", "ok"),
    [
        ("ipv4", "576", True),
        ("ipv4", "575", False),
        ("ipv6", "1280", True),
        ("ipv6", "1279", False),
        ("dualstack", "1280", True),
        ("dualstack", "576", False),
        ("ipv4", "65535", True),
        ("ipv6", "65536", False),
        ("bogus", "600", False),  # an invalid family is checked as dualstack, as upstream
    ],
)
def test_mtu_minimum_depends_on_the_family(family: str, mtu: str, ok: bool) -> None:
    env = {"NSM_HOST": "n", "NSM_IP_FAMILY": family, "NSM_MTU": mtu}
    if ok:
        assert load(env).mtu == int(mtu)
        return
    with pytest.raises(ConfigError) as err:
        load(env)
    mtu_problems = [p for p in err.value.problems if p.startswith("NSM_MTU")]
    minimum = 576 if family == "ipv4" else 1280
    shown = family if family != "bogus" else "dualstack"
    assert mtu_problems == [
        f"NSM_MTU={mtu!r}: out of range; expected a whole number from {minimum} to 65535 ({shown})"
    ]


def test_values_are_quoted_so_a_problem_stays_on_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        load({"NSM_HOST": "n", "NSM_TRENCH": "a\nb", "NSM_MTU": "1\r\n"})
    assert len(err.value.problems) == 2
    assert all("\n" not in p and "\r" not in p for p in err.value.problems)
    assert err.value.problems[0].startswith("NSM_TRENCH='a\\nb': ")


def test_config_file_overlays_the_environment(tmp_path) -> None:
    path = tmp_path / "proxy.env"
    path.write_text("# a ConfigMap\n\nNSM_LOG_LEVEL=trace\nNSM_TRENCH=red\nOTHER=x=y\n")
    env = {"NSM_HOST": "n", "NSM_LOG_LEVEL": "INFO", "NSM_CONFIG_FILE": str(path)}
    cfg = config.load_environment(env)
    assert cfg.log_level == "TRACE"  # the file wins over the environment
    assert cfg.trench == "red"
    assert cfg.config_file == str(path)
    assert config.read_env_file(str(path))["OTHER"] == "x=y"


def test_config_file_problems_name_file_and_line(tmp_path) -> None:
    path = tmp_path / "proxy.env"
    path.write_text("NSM_MTU=1500\nnot a line\nNSM_CONFIG_FILE=/x\n")
    with pytest.raises(ConfigError) as err:
        config.load_environment({"NSM_HOST": "n", "NSM_CONFIG_FILE": str(path)})
    assert err.value.problems == [
        f"NSM_CONFIG_FILE={str(path)!r}: line 2: expected NAME=value",
        f"NSM_CONFIG_FILE={str(path)!r}: line 3: cannot name itself",
    ]
    with pytest.raises(ConfigError, match="cannot read it"):
        config.load_environment({"NSM_HOST": "n", "NSM_CONFIG_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="not an absolute path"):
        config.load_environment({"NSM_HOST": "n", "NSM_CONFIG_FILE": "relative.env"})


def test_nsp_address_is_built_as_upstream_unless_given() -> None:
    built = load({"NSM_HOST": "n", "NSM_TRENCH": "red", "NSM_NAMESPACE": "ns"})
    assert built.nsp_address == "nsp-service-red.ns:7778"
    given = load({"NSM_HOST": "n", "NSM_NSP_SERVICE": "unix:///run/nsp.sock"})
    assert given.nsp_address == "unix:///run/nsp.sock"


def test_identity_sources() -> None:
    assert load({"NSM_HOST": "n"}).identity is IdentitySource.SPIFFE
    assert load({"NSM_HOST": "n", "NSM_IDENTITY": "Insecure"}).identity is IdentitySource.INSECURE
    files = {
        "NSM_HOST": "n",
        "NSM_IDENTITY": "files",
        "NSM_TLS_CERT_FILE": "/etc/proxy/svid.pem",
        "NSM_TLS_KEY_FILE": "/etc/proxy/svid.key",
        "NSM_TLS_BUNDLE_FILE": "/etc/proxy/bundle.pem",
    }
    assert load(files).tls_bundle_file == "/etc/proxy/bundle.pem"
    with pytest.raises(ConfigError) as missing:
        load({**files, "NSM_TLS_KEY_FILE": ""})
    assert missing.value.problems == [
        "NSM_TLS_KEY_FILE is not set (NSM_IDENTITY=files); expected an absolute path"
    ]
    with pytest.raises(ConfigError) as bad:
        load({"NSM_HOST": "n", "NSM_IDENTITY": "spire", "SPIFFE_ENDPOINT_SOCKET": "/x.sock"})
    assert bad.value.problems == [
        "NSM_IDENTITY='spire': unknown identity source; expected spiffe, files or insecure"
        " (any case)",
        "SPIFFE_ENDPOINT_SOCKET='/x.sock': not unix://; expected unix:///absolute/path",
    ]


def test_authorized_ids() -> None:
    ids = "spiffe://example.org/ns/x/sa/nsmgr, other.example"
    assert load({"NSM_HOST": "n", "NSM_AUTHORIZED_IDS": ids}).authorized_ids == ids
    with pytest.raises(ConfigError) as bad:
        load({"NSM_HOST": "n", "NSM_AUTHORIZED_IDS": "spiffe://Example.org/x"})
    [problem] = bad.value.problems
    assert problem.startswith("NSM_AUTHORIZED_IDS='spiffe://Example.org/x': ")
    assert "lower-case" in problem


def test_the_state_dir_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="NSM_STATE_DIR='tmp': not an absolute path"):
        load({"NSM_HOST": "node-a", "NSM_STATE_DIR": "tmp"})
