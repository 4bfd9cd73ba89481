"""Fixtures for the end-to-end tests: each test makes its own lab (a unique name, a state
directory of its own under /tmp) and whatever a failed test left is taken down afterwards."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.lab.state import leftovers
from proxy.lab.topology import Topology, TopologySpec


@pytest.fixture
def state_dir() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="mp-e2e-", dir="/tmp"))
    try:
        yield directory
    finally:
        for state_file in directory.glob("*.json"):  # a test that failed half-way
            subprocess.run(
                [sys.executable, "-m", "proxy", "lab", "down", "--name", state_file.stem,
                 "--state-dir", str(directory)],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)


def lab_name() -> str:
    return f"e{secrets.token_hex(3)}"


def spec(state_dir: Path, **fields: object) -> TopologySpec:
    """A spec with a fresh name in `state_dir`; `fields` override the defaults."""
    return TopologySpec(name=lab_name(), state_dir=state_dir, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def topology(state_dir: Path) -> AsyncIterator[Topology]:
    """The default lab (2 LBs, 2 targets, dual-stack), up and ready; checked to leave nothing
    behind when the test is over."""
    async with Topology.running(spec(state_dir)) as running:
        yield running
    assert leftovers(running.state) == []
