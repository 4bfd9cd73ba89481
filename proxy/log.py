"""Logging: one loguru sink on stdout, JSON (as upstream) or text, with a runtime level.

Log calls look like `logger.info("lb connected", conn_id=cid, nse=name)`: the message is a
constant string (loguru would `str.format` it with the kwargs) and the kwargs land in `extra`.

* json: one object per line with `severity`, `timestamp`, `service_id`, `message`, `version`,
  `extra_data` and, for `logger.exception`, a one-line `error` (upstream's zap shape, §7.2).
* text: `time LEVEL message key=value ...`, with the traceback below when there is one.

The stdlib loggers reach the same sink through `InterceptHandler`. Only libraries log through
them (purerpc, h2, hpack, anyio, pyroute2; the proxy uses loguru), and they are chatty (hpack logs
every header at DEBUG), so they are held at WARNING unless the level is TRACE.
The level and format can change at runtime (`set_level`, `set_format`): the sink reads them on
every record, so a change is one assignment and is safe from any thread.
"""

import json
import logging
import sys
import traceback
from typing import TYPE_CHECKING, Any

import attrs
from loguru import logger

import proxy

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = [
    "FORMATS",
    "LEVELS",
    "InterceptHandler",
    "render_json",
    "render_text",
    "set_format",
    "set_level",
    "setup",
]

LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("json", "text")
SERVICE_ID = "Meridio-proxy"

_LEVEL_NO = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}
_SEVERITY = {"SUCCESS": "info", "CRITICAL": "critical"}


@attrs.define
class _State:
    level: str = "INFO"
    fmt: str = "json"


_state = _State()


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown log {what} {value!r}; expected one of {', '.join(allowed)}")
    return str(value)  # a plain str, also when given a config.LogLevel


def render_json(record: "Record") -> str:
    """One JSON line (without newline) for a loguru record."""
    level: str = record["level"].name
    line: dict[str, Any] = {
        "severity": _SEVERITY.get(level, level.lower()),
        "timestamp": record["time"].isoformat(timespec="milliseconds"),
        "service_id": SERVICE_ID,
        "message": record["message"],
        "version": proxy.__version__,
        "extra_data": dict(record["extra"]),
    }
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        text = "".join(traceback.format_exception_only(exception.type, exception.value))
        line["error"] = " ".join(text.split())
    return json.dumps(line, default=str, ensure_ascii=False)


def _logfmt(value: Any) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


def render_text(record: "Record") -> str:
    """One human line (without final newline), the traceback below it if any."""
    fields = "".join(f" {key}={_logfmt(value)}" for key, value in record["extra"].items())
    time = record["time"].isoformat(timespec="milliseconds")
    text = f"{time} {record['level'].name:<7} {record['message']}{fields}"
    exception = record["exception"]
    if exception is not None and exception.type is not None:
        lines = traceback.format_exception(exception.type, exception.value, exception.traceback)
        text += "\n" + "".join(lines).rstrip("\n")
    return text


def _passes(record: "Record") -> bool:
    return record["level"].no >= _LEVEL_NO[_state.level]


def _write(message: "Message") -> None:
    record = message.record
    line = render_json(record) if _state.fmt == "json" else render_text(record)
    # sys.stdout looked up on each call: it may be replaced (tests, a redirected stream).
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class InterceptHandler(logging.Handler):
    """Sends stdlib `logging` records to loguru (the standard loguru recipe)."""

    def emit(self, record: logging.LogRecord) -> None:
        level: str | int
        try:
            level = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info).bind(logger=record.name).log(
            level, record.getMessage()
        )


def _apply_stdlib_levels(level: str) -> None:
    logging.getLogger().setLevel(logging.DEBUG if level == "TRACE" else logging.WARNING)


def setup(level: str, fmt: str) -> None:
    """Replace every loguru sink with ours on stdout and route stdlib logging to it."""
    _state.level = _check(level, LEVELS, "level")
    _state.fmt = _check(fmt, FORMATS, "format")
    logger.remove()
    logger.add(_write, level=0, filter=_passes, format="{message}", catch=True)
    # Replace, not close, what was there: closing would break a host such as pytest.
    logging.getLogger().handlers[:] = [InterceptHandler()]
    _apply_stdlib_levels(level)


def set_level(level: str) -> None:
    """Change the level at runtime and log it (as upstream's "Changing log level")."""
    level = _check(level, LEVELS, "level")
    old = _state.level
    if level == old:
        return
    change = {"from": old, "to": level}
    if _LEVEL_NO[level] > _LEVEL_NO[old]:  # quieter: say so while it still shows
        logger.info("log level changed", **change)
    _state.level = level
    _apply_stdlib_levels(level)
    if _LEVEL_NO[level] < _LEVEL_NO[old]:
        logger.info("log level changed", **change)


def set_format(fmt: str) -> None:
    """Change the format at runtime (json or text)."""
    _state.fmt = _check(fmt, FORMATS, "format")
