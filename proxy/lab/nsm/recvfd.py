"""NSM's recvfd in the lab's nsmgr: the descriptors clients and endpoints pass with their calls
(a network namespace in a mechanism's `inodeURL`, an endpoint's socket in its registered `url`,
both `inode://dev/ino` on the wire: wire-api §2.4, behaviour §9.5), received, held for as long as
what they name is in use, and handed on as paths that reach them: `/proc/<our pid>/fd/<n>`.

Why hold them: a namespace or a socket file named by a path or a process id can be one the
manager cannot see (another mount namespace) or not the one meant (a process in several
namespaces); the descriptor is the thing itself. The kernel forwarder opens the path and enters
the namespace; the manager dials the endpoint socket through it. Holding a namespace keeps it
alive, as NSM's forwarder does, until the connection is closed or expires.

* `Netns` holds a connection's namespaces by role (client side, endpoint side). The same
  `inode://` URL again (every refresh sends it again) is the descriptor already held, so the
  path the forwarder knows the pair by stays the same; a different one is staged and replaces
  the old one only when the caller commits (after the forwarder has moved the pair: it still
  needs the old namespace to take down what it made there).
* `Handoff` carries one received descriptor from the handler task that waited for it to the task
  that will own it (the registry's), and closes it if that never happens.

`receive` waits for a descriptor as long as the caller's deadline allows (NSM bounds it by the
call's context likewise) and turns a closed connection into UNAVAILABLE with the reason; a
wait cut short either way is logged (its caller sees at most DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import os

import trio
from loguru import logger

from proxy.rpc import UnavailableError
from proxy.rpc.fdpass import FdNotReceived, FdTransceiver, proc_fd_url

__all__ = ["Handoff", "Netns", "fd_path", "receive"]


def fd_path(fd: int) -> str:
    """The path our descriptor `fd` is reachable at, for us and for others: /proc/<pid>/fd/<n>."""
    return proc_fd_url(fd)[len("file://") :]


async def receive(fds: FdTransceiver, url: str, what: str) -> int:
    """The descriptor `url` names once it has arrived on `fds` (a new one, the caller's to
    close); UnavailableError when the connection closed first. Bounded by the caller's deadline
    (a cancel scope around the call)."""
    try:
        return await fds.receive_fd(url)
    except FdNotReceived:
        # (The caller, gone with its connection, hears nothing: the log is all there is.)
        logger.warning("descriptor never came", what=what, url=url, reason="connection closed")
        raise UnavailableError(
            f"the connection closed before {what} ({url}) arrived as a descriptor"
        ) from None
    except trio.Cancelled:
        # The call's deadline, most likely: the caller only learns DEADLINE_EXCEEDED.
        logger.warning("descriptor never came", what=what, url=url, reason="deadline")
        raise


class Netns:
    """The namespace descriptors one connection holds, by role ("client", "endpoint")."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[str, int]] = {}  # role: (inode URL, descriptor)
        # What `commit` does per role: hold this one instead, or (None) hold none any more.
        self._staged: dict[str, tuple[str, int] | None] = {}

    @property
    def count(self) -> int:
        """Descriptors held or staged (for tests and logs)."""
        return len(self._held) + sum(entry is not None for entry in self._staged.values())

    async def path(self, role: str, fds: FdTransceiver, url: str) -> str:
        """The path of the namespace `url` names for `role`: the one held when it is that one,
        else the descriptor received (and staged until `commit`)."""
        for current in (self._staged.get(role), self._held.get(role)):
            if current is not None and current[0] == url:
                return fd_path(current[1])
        fd = await receive(fds, url, f"the {role}'s network namespace")
        self._unstage(role)  # (one staged by an attempt that failed later)
        self._staged[role] = (url, fd)
        logger.debug("namespace received as a descriptor", role=role, url=url, path=fd_path(fd))
        return fd_path(fd)

    def forget(self, role: str) -> None:
        """`role`'s namespace is named another way now (a path, a process): the descriptor held
        for it goes at `commit`."""
        self._unstage(role)
        self._staged[role] = None

    def commit(self) -> None:
        """The staged changes are made: replaced descriptors are closed."""
        staged, self._staged = self._staged, {}
        for role, entry in staged.items():
            old = self._held.pop(role, None)
            if old is not None:
                os.close(old[1])
            if entry is not None:
                self._held[role] = entry

    def rollback(self) -> None:
        """Close what was staged; the held ones stay."""
        for role in list(self._staged):
            self._unstage(role)

    def close(self) -> None:
        """Close everything (the connection is gone, and its pair with it)."""
        self.rollback()
        held, self._held = self._held, {}
        for _url, fd in held.values():
            os.close(fd)

    def _unstage(self, role: str) -> None:
        entry = self._staged.pop(role, None)
        if entry is not None:
            os.close(entry[1])


class Handoff:
    """A received descriptor on its way to the task that will own it.

    The receiver creates it and, in a `finally`, calls `drop`; the owner calls `take`. Whichever
    comes first decides: after `take`, `drop` does nothing; after `drop` (the receiver gave up:
    cancelled while the owner had not run the job yet), `take` returns None and the descriptor
    is already closed. Both run on the trio thread, so nothing comes between the check and the
    change.
    """

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def take(self) -> int | None:
        fd, self._fd = self._fd, None
        return fd

    def drop(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
