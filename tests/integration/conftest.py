"""Fixtures shared by the integration tests."""

from __future__ import annotations

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
