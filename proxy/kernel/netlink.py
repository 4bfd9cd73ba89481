"""The netlink worker: one thread that owns the proxy's netlink socket.

pyroute2's synchronous `IPRoute` spends 0.2-0.4 ms of Python per operation and blocks while it
waits for the kernel (`field-notes.md` part A §5), so it never runs on the trio thread. One
worker thread owns one `IPRoute` for its whole life (pyroute2 keeps sockets and event loops
per thread), runs the jobs it is given one at a time, in order, and hands results back to trio.
A job is a whole batch (a dump, or every operation of a reconcile), so a reconcile costs one
thread hop, not one per operation.

The proxy runs in its own network namespace and the worker uses it as it is. Tests give a
namespace name: the thread enters it with setns(2) before opening its socket. Nothing forks
(pyroute2's `netns=` would fork a helper per socket).
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from proxy.kernel.errors import KernelError, from_netlink_error

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(name_or_path: str) -> None:
    """Move the calling thread into a network namespace (`ip netns` name or a path)."""
    path = name_or_path if name_or_path.startswith("/") else f"/run/netns/{name_or_path}"
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # no O_CREAT: a typo must not make one
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str | None, function: Callable[[], T]) -> T:
    """Run `function` in a throw-away thread inside `netns` (for sockets that must be born
    there); in the current thread when `netns` is None."""
    if netns is None:
        return function()
    result: list[outcome.Outcome[T]] = []

    def inside() -> T:
        enter_netns(netns)
        return function()

    def body() -> None:
        result.append(outcome.capture(inside))

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    return result[0].unwrap()


Job = Callable[[IPRoute], Any]


class NetlinkWorker:
    """Runs jobs `fn(ipr)` on the worker thread: `await worker.call(fn)`.

    A pyroute2 NetlinkError raised by a job comes out as a `KernelError` subclass; any other
    exception as itself. A caller cancelled while its job runs gets Cancelled; the job still
    finishes (the kernel cannot take half an operation back) and its result is dropped.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._jobs: queue.SimpleQueue[tuple[Job, Callable[[outcome.Outcome[Any]], None]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.jobs_done = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the thread, serve until cancelled, then stop it (closing its socket)."""
        ready = trio.Event()
        failure: list[BaseException] = []
        token = trio.lowlevel.current_trio_token()

        def started(error: BaseException | None) -> None:
            if error is not None:
                failure.append(error)
            token.run_sync_soon(ready.set)

        self._thread = threading.Thread(
            target=self._serve, args=(started,), name="netlink", daemon=True
        )
        self._thread.start()
        await ready.wait()
        if failure:
            raise failure[0]
        try:
            task_status.started()
            await trio.sleep_forever()
        finally:
            self._jobs.put(None)  # the thread closes its socket and ends; no need to wait

    async def call(self, job: Callable[[IPRoute], T]) -> T:
        if self._thread is None:
            raise RuntimeError("the netlink worker is not running")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: list[outcome.Outcome[T]] = []

        def deliver(result: outcome.Outcome[T]) -> None:
            box.append(result)
            token.run_sync_soon(done.set)

        self._jobs.put((job, deliver))
        await done.wait()
        return box[0].unwrap()

    def _serve(self, started: Callable[[BaseException | None], None]) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            ipr = IPRoute(ext_ack=True)
        except BaseException as exc:  # reported to the trio side, which raises it
            started(exc)
            return
        started(None)
        try:
            while (item := self._jobs.get()) is not None:
                job, deliver = item
                result = outcome.capture(_translated, job, ipr)
                self.jobs_done += 1
                try:
                    deliver(result)
                except trio.RunFinishedError:
                    return
        finally:
            ipr.close()


def _translated(job: Job, ipr: IPRoute) -> Any:
    try:
        return job(ipr)
    except NetlinkError as exc:
        raise from_netlink_error(exc) from exc


__all__ = ["KernelError", "NetlinkWorker", "enter_netns", "in_netns"]
