"""Fixtures shared by the integration tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from loguru import logger


@pytest.fixture
def warnings() -> Iterator[list[dict[str, Any]]]:
    """The WARNING (and worse) log records of the test, as message plus bound fields."""
    records: list[dict[str, Any]] = []
    sink = logger.add(
        lambda message: records.append(
            {"message": message.record["message"], **message.record["extra"]}
        ),
        level="WARNING",
    )
    try:
        yield records
    finally:
        logger.remove(sink)


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A fresh directory for sockets, short enough for AF_UNIX's 107-byte paths (pytest's
    tmp_path may not be), removed afterwards."""
    path = tempfile.mkdtemp(dir="/tmp", prefix="mp-sock-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
