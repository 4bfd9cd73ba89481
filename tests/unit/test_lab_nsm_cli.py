"""`meridio-proxy lab nsm`: what is refused before anything runs (exit 2, one line on stderr).
Serving is tested in tests/integration/test_lab_nsm_manager.py (a subprocess)."""

from __future__ import annotations

import sys

import pytest

from proxy.lab.cli import main


def test_the_lab_usage_lists_nsm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "nsm    the node's NSM" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "127.0.0.1:5000", "--no-kernel"], "--listen must be unix:///path"),
        (["--listen", "unix:///tmp/nsm.sock", "--no-kernel", "--lifetime", "0s"], "--lifetime"),
        (["--listen", "unix:///tmp/nsm.sock", "--lifetime", "soon"], "not a duration"),
        (["--no-kernel"], "--listen"),
    ],
)
def test_bad_arguments_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["nsm", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("meridio-proxy lab nsm: error:") and message in error


def test_without_the_kernel_forwarder_module_exit_2_with_a_hint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "proxy.lab.nsm.kernel", None)  # as if not written yet
    assert main(["nsm", "--listen", "unix:///tmp/nsm-never.sock"]) == 2
    error = capsys.readouterr().err
    assert "kernel forwarder (proxy.lab.nsm.kernel) is not available" in error
    assert "--no-kernel" in error
