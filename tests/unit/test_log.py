"""Logging: the JSON and text shapes, runtime level changes, stdlib loggers through the sink."""

import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import datetime

import pytest
from loguru import logger

import proxy
from proxy import log


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    logger.remove()
    logger.add(sys.stderr)
    root.handlers[:] = handlers
    root.setLevel(level)


def _json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines()]


def test_json_line_has_upstream_keys(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("DEBUG", "json")
    logger.info("lb connected", conn_id="c-1", nse="lb-a", count=3)
    [line] = _json_lines(capsys)
    assert set(line) == {"severity", "timestamp", "service_id", "message", "version", "extra_data"}
    assert line["severity"] == "info"
    assert line["service_id"] == "Meridio-proxy"
    assert line["message"] == "lb connected"
    assert line["version"] == proxy.__version__
    assert line["extra_data"] == {"conn_id": "c-1", "nse": "lb-a", "count": 3}
    stamp = str(line["timestamp"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", stamp)
    assert datetime.fromisoformat(stamp).tzinfo is not None


def test_json_severities(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("TRACE", "json")
    logger.trace("t")
    logger.debug("d")
    logger.warning("w")
    logger.error("e")
    logger.critical("c")
    severities = [line["severity"] for line in _json_lines(capsys)]
    assert severities == ["trace", "debug", "warning", "error", "critical"]


def test_json_stringifies_what_json_cannot_hold(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    logger.info("odd values", addr=b"\x01", family={4}, nested={"a": (1, 2)})
    [line] = _json_lines(capsys)
    assert line["extra_data"] == {"addr": "b'\\x01'", "family": "{4}", "nested": {"a": [1, 2]}}


def test_json_exception_is_one_line_error_field(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("request failed", conn_id="c-1")
    out = capsys.readouterr().out
    assert "Traceback" not in out
    [line] = [json.loads(text) for text in out.splitlines()]
    assert line["error"] == "ValueError: bad thing"
    assert line["severity"] == "error"
    assert line["extra_data"] == {"conn_id": "c-1"}


def test_text_format_shows_key_values(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "text")
    logger.info("lb connected", conn_id="c-1", nse="lb a", empty="")
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\S+ INFO +lb connected conn_id=c-1 nse=\"lb a\" empty=\"\"\n", out
    )


def test_text_format_prints_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "text")
    try:
        raise KeyError("k")
    except KeyError:
        logger.exception("lookup failed")
    out = capsys.readouterr().out
    assert "lookup failed" in out.splitlines()[0]
    assert "Traceback" in out
    assert "KeyError: 'k'" in out


def test_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    logger.debug("hidden")
    logger.info("shown")
    assert [line["message"] for line in _json_lines(capsys)] == ["shown"]


def test_set_level_changes_filtering_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    log.set_level("DEBUG")
    logger.debug("now shown")
    log.set_level("ERROR")
    logger.warning("now hidden")
    logger.error("still shown")
    lines = _json_lines(capsys)
    assert [(line["message"], line["extra_data"]) for line in lines] == [
        ("log level changed", {"from": "INFO", "to": "DEBUG"}),
        ("now shown", {}),
        ("log level changed", {"from": "DEBUG", "to": "ERROR"}),
        ("still shown", {}),
    ]


def test_set_level_to_the_same_level_is_a_no_op(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("DEBUG", "json")
    log.set_level("DEBUG")
    assert capsys.readouterr().out == ""


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="VERBOSE"):
        log.setup("VERBOSE", "json")
    log.setup("INFO", "json")
    with pytest.raises(ValueError):
        log.set_level("debug")
    with pytest.raises(ValueError):
        log.set_format("xml")


def test_set_format_switches_the_rendering(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    log.set_format("text")
    logger.info("hello", k="v")
    assert capsys.readouterr().out.rstrip().endswith("INFO    hello k=v")


def test_stdlib_logging_reaches_the_sink(capsys: pytest.CaptureFixture[str]) -> None:
    # Only libraries use stdlib logging: below WARNING they speak at TRACE only.
    log.setup("TRACE", "json")
    logging.getLogger("some.library").info("connected to %s", "peer")
    logging.getLogger("some.library").debug("details")
    [first, second] = _json_lines(capsys)
    assert first["message"] == "connected to peer"
    assert first["severity"] == "info"
    assert first["extra_data"] == {"logger": "some.library"}
    assert second["severity"] == "debug"


def test_stdlib_logging_follows_the_level(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("WARNING", "json")
    logging.getLogger("some.library").info("hidden")
    logging.getLogger("some.library").warning("shown")
    assert [line["message"] for line in _json_lines(capsys)] == ["shown"]


def test_stdlib_exception_becomes_error_field(capsys: pytest.CaptureFixture[str]) -> None:
    log.setup("INFO", "json")
    try:
        raise OSError("gone")
    except OSError:
        logging.getLogger("some.library").exception("failed")
    [line] = _json_lines(capsys)
    assert line["error"] == "OSError: gone"


@pytest.mark.parametrize(
    "name", ["purerpc.server", "anyio.streams.tls", "pyroute2.netlink", "hpack.hpack", "h2"]
)
def test_noisy_libraries_stay_at_warning_unless_trace(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    log.setup("DEBUG", "json")
    logging.getLogger(name).info("chatter")
    logging.getLogger(name).debug("chatter")
    logging.getLogger(name).warning("worth seeing")
    assert [line["message"] for line in _json_lines(capsys)] == ["worth seeing"]

    log.set_level("TRACE")
    capsys.readouterr()
    logging.getLogger(name).debug("chatter at trace")
    assert [line["message"] for line in _json_lines(capsys)] == ["chatter at trace"]

    log.set_level("INFO")
    capsys.readouterr()
    logging.getLogger(name).info("hidden again")
    assert _json_lines(capsys) == []
