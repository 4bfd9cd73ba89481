"""`meridio-proxy debug` without a kernel: independent sections, names, environment, CLI."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from proxy import cli
from proxy.kernel import debug
from proxy.kernel.debug import Sources
from proxy.kernel.sysctl import REQUIRED


def boom(sources: Sources) -> Any:
    raise RuntimeError("netlink went away")


def test_a_failing_section_is_an_error_and_the_others_still_print():
    environ = {"NSM_HOST": "node-1", "PATH": "/bin"}
    sections = {"first": lambda s: [1, 2], "broken": boom, "environment": debug.environment}
    document = debug.collect(Sources(ipr=None, environ=environ), sections)
    assert document["broken"] == {"error": "RuntimeError: netlink went away"}
    assert document["first"] == [1, 2]
    assert document["environment"] == {"NSM_HOST": "node-1"}
    assert {"version", "time", "unix-time"} <= set(document)
    json.loads(debug.render(document))


def test_every_real_section_fails_alone_without_a_socket():
    # A socket that cannot do anything: the netlink sections fail, the others do not.
    document = debug.collect(Sources(ipr=object(), environ={}))
    for name in ("interfaces", "rules", "routes", "nexthops", "neighbours"):
        assert set(document[name]) == {"error"}, name
    assert "error" not in document["system"]
    assert document["system"]["cpus"] >= 1
    assert document["system"]["packages"]["pyroute2"] == "0.9.7"
    assert set(document["sysctls"]) == {s.name for s in REQUIRED}
    assert document["environment"] == {}
    # The proxy's own view reads the kernel with sockets of its own (this process's namespace).
    assert document["managed"]["scope"]["table"] == 4096
    assert "observed" in document["managed"]


def test_time_is_rfc3339_and_matches_unix_time():
    import datetime

    document = debug.collect(Sources(ipr=None, environ={}), {})
    parsed = datetime.datetime.fromisoformat(document["time"])
    assert parsed.tzinfo is not None
    assert abs(parsed.timestamp() - document["unix-time"]) < 1


@pytest.mark.parametrize(
    ("state", "name"),
    [
        (0x00, "NONE"),
        (0x01, "INCOMPLETE"),
        (0x02, "REACHABLE"),
        (0x04, "STALE"),
        (0x08, "DELAY"),
        (0x10, "PROBE"),
        (0x20, "FAILED"),
        (0x40, "NOARP"),
        (0x80, "PERMANENT"),
        (0x102, "REACHABLE|0x100"),
    ],
)
def test_neighbour_states_are_names(state: int, name: str):
    assert debug.nud_state_name(state) == name


def test_environment_prefixes_fallbacks_and_secrets():
    environ = {
        "NSM_TRENCH": "red",
        "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/sockets/agent.sock",
        "IP_FAMILY": "ipv6",  # upstream's unprefixed fallback of NSM_IP_FAMILY
        "GRPC_MAX_BACKOFF": "5s",
        "NSM_SOME_TOKEN": "eyJhbGciOi...",
        "HOME": "/root",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    }
    found = debug.environment(Sources(ipr=None, environ=environ))
    assert found == {
        "NSM_TRENCH": "red",
        "SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/sockets/agent.sock",
        "IP_FAMILY": "ipv6",
        "GRPC_MAX_BACKOFF": "5s",
        "NSM_SOME_TOKEN": "(hidden)",
    }


class RawMessage(dict[str, Any]):
    def __init__(self, data: bytes, offset: int):
        super().__init__(header={"length": len(data) - offset})
        self.data = data
        self.offset = offset


def test_nexthop_id_read_from_the_raw_route_message():
    body = struct.pack("=HHI", 8, 15, 4096) + struct.pack("=HHI", 8, 30, 4097)
    message = b"\0" * 16 + b"\0" * 12 + body
    assert debug._raw_u32(RawMessage(b"junk" + message, 4), 30) == 4097
    assert debug._raw_u32(RawMessage(message, 0), 15) == 4096
    assert debug._raw_u32(RawMessage(message, 0), 31) is None


def test_render_survives_values_json_does_not_know():
    text = debug.render({"obj": object(), "fine": 1})
    assert "object object" in text and '"fine": 1' in text


def test_help(capsys: pytest.CaptureFixture[str]):
    assert debug.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--netns" in out and "exit status" in out


def test_bad_usage(capsys: pytest.CaptureFixture[str]):
    assert debug.main(["--bogus"]) == 2
    err = capsys.readouterr().err
    assert "usage: meridio-proxy debug" in err and "--bogus" in err


def test_missing_namespace_is_one_line_and_status_1(capsys: pytest.CaptureFixture[str]):
    assert debug.main(["--netns", "mp-no-such-namespace-here"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "mp-no-such-namespace-here" in err and "FileNotFoundError" in err


@pytest.mark.parametrize(
    ("argv", "passed"),
    [
        (["debug"], []),
        (["debug", "--netns", "x"], ["--netns", "x"]),
        (["--debug"], []),
        (["-debug", "--netns", "x"], ["--netns", "x"]),
    ],
)
def test_cli_hands_debug_to_the_debug_command(
    argv: list[str], passed: list[str], monkeypatch: pytest.MonkeyPatch
):
    seen: list[list[str]] = []

    def fake_main(args: list[str]) -> int:
        seen.append(args)
        return 5

    monkeypatch.setattr(debug, "main", fake_main)
    assert cli.main(argv) == 5
    assert seen == [passed]
