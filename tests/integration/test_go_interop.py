"""NSM's tokens and mutual TLS against real Go code (golang-jwt v4, grpc-go, crypto/tls from
Debian's packages, which `make` installs as root): `interop/go/check.py`, run as a process.

Every check it makes must pass; its DIFF lines (where we are stricter than Go on texts and
metadata no Go peer sends) are printed, not failures. Its output shows with `pytest -s`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def test_go_peers_make_and_accept_what_the_proxy_does() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "interop.go.check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    print(result.stdout)
    if result.returncode == 2:
        pytest.fail(
            "Go or its Debian packages are missing: `make` installs them as root\n" + result.stdout
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout
