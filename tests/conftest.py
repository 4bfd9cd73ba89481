"""Suite-wide rules."""

from __future__ import annotations

import os

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    # A root test run without root fails loudly: a suite that skips what it claims to check
    # would look green. Without root, run `make test-unit`, which collects no root tests.
    if item.get_closest_marker("root") is not None and os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces); without root run `make test-unit`")
