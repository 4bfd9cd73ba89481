"""Command line: help from the config metadata, version, usage errors, subcommand dispatch."""

import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest

import proxy
from proxy import cli, config
from proxy.config import Config

ROOT = Path(__file__).resolve().parents[2]

UPSTREAM_VARIABLES = [
    "NSM_NAME",
    "NSM_SERVICE_NAME",
    "NSM_CONNECT_TO",
    "NSM_DIAL_TIMEOUT",
    "NSM_REQUEST_TIMEOUT",
    "NSM_MAX_TOKEN_LIFETIME",
    "NSM_IPAM_SERVICE",
    "NSM_HOST",
    "NSM_NETWORK_SERVICE_NAME",
    "NSM_NAMESPACE",
    "NSM_TRENCH",
    "NSM_CONDUIT",
    "NSM_NSP_SERVICE_NAME",
    "NSM_NSP_SERVICE_PORT",
    "NSM_IP_FAMILY",
    "NSM_LOG_LEVEL",
    "NSM_MTU",
    "NSM_GRPC_KEEPALIVE_TIME",
    "NSM_GRPC_PROBE_RPC_TIMEOUT",
    "NSM_GRPC_MAX_BACKOFF",
    "NSM_IP_RELEASE_DELAY",
    "NSM_BRIDGE_IP_RENEW_INTERVAL",
]
ALT_NAMES = [
    "IP_FAMILY",
    "GRPC_KEEPALIVE_TIME",
    "GRPC_PROBE_RPC_TIMEOUT",
    "GRPC_MAX_BACKOFF",
    "IP_RELEASE_DELAY",
    "BRIDGE_IP_RENEW_INTERVAL",
]
NEW_VARIABLES = [
    "NSM_HEALTH_ADDRESS",
    "NSM_HEALTH_TCP_ADDRESS",
    "NSM_LOG_FORMAT",
    "NSM_SHUTDOWN_TIMEOUT",
    "NSM_IDENTITY",
    "SPIFFE_ENDPOINT_SOCKET",
    "NSM_TLS_CERT_FILE",
    "NSM_TLS_KEY_FILE",
    "NSM_TLS_BUNDLE_FILE",
    "NSM_AUTHORIZED_IDS",
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("NSM_") or name in ALT_NAMES:
            monkeypatch.delenv(name)
    return monkeypatch


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, main: object) -> None:
    module = types.ModuleType(name)
    module.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, name, module)


def _help_lines(text: str) -> dict[str, str]:
    """Variable name -> its heading line in --help."""
    lines = [line.strip() for line in text.splitlines()]
    names = ("NSM_", "SPIFFE_")
    return {line.split()[0].rstrip(","): line for line in lines if line.startswith(names)}


def test_help_lists_every_variable_of_the_metadata() -> None:
    text = cli.help_text()
    headings = _help_lines(text)
    assert list(headings) == [var.env for var in config.variables()]
    for var in config.variables():
        heading = headings[var.env]
        assert var.kind in heading
        if var.required:
            assert "required" in heading
        else:
            assert f"default: {var.default or '(empty)'}" in heading
        if var.alt:
            assert f"or {var.alt}" in heading
        assert ("[SIGHUP]" in heading) == var.reloadable
        assert " ".join(var.help.split()) in " ".join(text.split())


def test_help_lists_the_upstream_variables_and_the_new_ones() -> None:
    headings = _help_lines(cli.help_text())
    assert len(UPSTREAM_VARIABLES) == 22
    for name in UPSTREAM_VARIABLES + NEW_VARIABLES:
        assert name in headings
    for alt in ALT_NAMES:
        assert f"or {alt} " in cli.help_text()


def test_help_describes_the_program_the_subcommands_and_the_signals() -> None:
    text = cli.help_text()
    assert text.startswith("usage: meridio-proxy")
    assert "environment variables" in text
    for word in ("probe", "debug", "lab", "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP"):
        assert word in text
    assert "SIGUSR1                   set the log level back to NSM_LOG_LEVEL" in text
    assert "SIGUSR2                   set the log level to TRACE" in text


def test_help_fits_a_100_column_terminal() -> None:
    assert max(len(line) for line in cli.help_text().splitlines()) <= 100


@pytest.mark.parametrize("flag", ["--help", "-h", "-help"])
def test_help_flags(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([flag]) == 0
    out, err = capsys.readouterr()
    assert out == cli.help_text() + "\n"
    assert err == ""


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version_flags(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([flag]) == 0
    assert capsys.readouterr().out == f"meridio-proxy {proxy.__version__}\n"


@pytest.mark.parametrize("argv", [["--bogus"], ["-x"], ["--ver"], ["extra"], ["--help=yes"]])
def test_unknown_flag_or_argument_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("usage: meridio-proxy")
    assert "error:" in err


def test_probe_gets_the_rest_of_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def probe_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    _fake_module(monkeypatch, "proxy.probe", probe_main)
    assert cli.main(["probe", "--help", "--addr", "unix:///x"]) == 7
    assert seen == [["--help", "--addr", "unix:///x"]]


def test_run_mode_passes_the_loaded_config_to_the_app(clean_env: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []

    def app_main(cfg: Config, load_config: Callable[[], Config]) -> int:
        seen.append(cfg)
        clean_env.setenv("NSM_LOG_LEVEL", "info")  # what a reload would see
        seen.append(load_config())
        return 0

    _fake_module(clean_env, "proxy.app", app_main)
    clean_env.setenv("NSM_HOST", "node-a")
    clean_env.setenv("NSM_TRENCH", "red")
    clean_env.setenv("IP_FAMILY", "ipv6")
    assert cli.main([]) == 0
    expected = Config(host="node-a", trench="red", ip_family=config.IpFamily.IPV6)
    assert seen == [expected, Config(**{**attrs.asdict(expected), "log_level": "INFO"})]


def test_run_mode_with_bad_config_lists_every_problem(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def app_main(cfg: Config, load_config: Callable[[], Config]) -> int:
        raise AssertionError("must not run")

    _fake_module(clean_env, "proxy.app", app_main)
    clean_env.setenv("NSM_MTU", "abc")
    clean_env.setenv("NSM_DIAL_TIMEOUT", "")
    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "meridio-proxy: invalid configuration:",
        "  NSM_DIAL_TIMEOUT='': set but empty; unset it to use the default 5s",
        "  NSM_HOST is not set; expected the node name (spec.nodeName through the downward API) "
        "without whitespace",
        "  NSM_MTU='abc': not an integer; expected a whole number from 1280 to 65535 (dualstack)",
    ]


# ---------------------------------------------------------------------------------------------
# As a real process: `python -m proxy` with a controlled environment


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *argv],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_process_help() -> None:
    done = _run(["--help"], {})
    assert done.returncode == 0
    for name in UPSTREAM_VARIABLES + NEW_VARIABLES:
        assert name in done.stdout
    assert done.stderr == ""


def test_process_version() -> None:
    done = _run(["-version"], {})
    assert (done.returncode, done.stdout) == (0, f"meridio-proxy {proxy.__version__}\n")


def test_process_unknown_flag() -> None:
    done = _run(["--frobnicate"], {})
    assert done.returncode == 2
    assert done.stderr.startswith("usage: meridio-proxy")
    assert "--frobnicate" in done.stderr
    assert "Traceback" not in done.stderr


def test_process_bad_config() -> None:
    env = {"NSM_HOST": "node-a", "NSM_MTU": "abc", "GRPC_MAX_BACKOFF": "forever"}
    done = _run([], env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "meridio-proxy: invalid configuration:",
        "  NSM_MTU='abc': not an integer; expected a whole number from 1280 to 65535 (dualstack)",
        "  GRPC_MAX_BACKOFF='forever': not a duration; "
        "expected a duration greater than 0 such as 300ms, 5s, 1m30s or 24h",
    ]
