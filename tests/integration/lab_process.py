"""A lab command run as a real process: started, waited for, stopped with SIGTERM, reaped."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

REPO = Path(__file__).resolve().parents[2]


@attrs.define
class LabProcess:
    process: trio.Process
    output: bytes = b""

    async def stop(self) -> int:
        """SIGTERM; the exit status once it is gone (its output read to the end)."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            status = await self.process.wait()
            while chunk := await self.process.stdout.receive_some():
                self.output += chunk
        return status


@asynccontextmanager
async def lab_process(args: list[str], ready: bytes) -> AsyncIterator[LabProcess]:
    """`meridio-proxy lab <args>`, yielded once its output shows `ready`; killed and reaped
    whatever happens."""
    argv = [sys.executable, "-m", "proxy", "lab", *args]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, cwd=REPO)
    running = LabProcess(process)
    try:
        assert process.stdout is not None
        with trio.fail_after(20):
            while ready not in running.output:
                chunk = await process.stdout.receive_some()
                assert chunk, f"exited early: {running.output.decode()}"
                running.output += chunk
        yield running
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()
