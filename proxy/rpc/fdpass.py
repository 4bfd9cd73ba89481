"""File descriptors passed over UNIX-socket gRPC connections, as NSM's grpcfd does it.

NSM passes open file descriptors (a network namespace, an endpoint's listening socket file) over
the gRPC connection to nsmgr, in both directions, with TLS on top (wire-api §2.4, behaviour
§9.5). The descriptors ride as SCM_RIGHTS ancillary data on bytes of the raw socket stream, below
TLS, and a message names one as `inode://<st_dev>/<st_ino>` (decimal, from fstat): the receiver
finds it by that pair. This module does it on trio:

* `FdStream` is the raw byte stream of a connected AF_UNIX socket (what `trio.SSLStream` wraps
  when TLS is on). Each write first sends the descriptors queued so far, one per byte
  (`sendmsg`), then the rest of the bytes; each read (`recvmsg`, MSG_CMSG_CLOEXEC) hands the
  descriptors that came with it to the stream's `FdTransceiver`.
* `FdTransceiver` (`stream.fds`; a connection's `Connection.fds`, a client's `Channel.fds`, a
  handler's `CallContext.fds`) is the API: `send_fd`, `send_path` and `send_url` queue a
  descriptor for the next bytes written and return its `inode://` URL, to put in the message that
  follows; `receive_fd(url)` waits for the descriptor a received message names and returns a
  duplicate the caller owns (and closes).
* Pure helpers for the URL forms: `inode://dev/ino` (`format_inode_url`, `parse_inode_url`) and
  the local `file://path` (a mechanism's inodeURL) and `unix://path` (an endpoint URL) forms
  (`path_of_url`, `inode_url_of`), and `proc_fd_url` for the path a received descriptor is
  reachable at (`/proc/<pid>/fd/<n>`, what NSM's recvfd hands on), `reopen_fd` to turn a received
  O_PATH descriptor into one setns(2) accepts.

What edwarnicke/grpcfd (connwrap.go, connwrap_linux.go, url.go) does, and this follows:

* A descriptor is duplicated when it is queued (the caller may close its own at once) and the
  duplicate closed once it is sent or the connection closes. Files are opened O_PATH.
* Each queued descriptor is sent alone on one byte of the next write (one `sendmsg` each), then
  the rest of the write goes as plain bytes. grpcfd takes at most 64 per write; here every queued
  descriptor goes as long as the write has bytes for them, because one left over would wait for
  an unrelated later write while the peer waits for it (a gRPC write is a frame, tens of bytes
  at least). A receiver gets one descriptor per read either way, so Go peers read these.
* The receiver fstats each descriptor and keeps the first one of each (dev, ino), closing later
  copies of the same file; it keeps them whether asked for or not, until the connection closes
  (NSM sends the same namespace again with every refresh). Every `receive_fd` gets its own
  duplicate ("always copy the fd"). A receiver waits until the descriptor arrives; NSM bounds
  the wait with the call's context, here the caller's trio deadline.
* When the connection closes, every descriptor held or still queued is closed and waiters fail.

Beyond grpcfd, which holds every descriptor until the connection closes: at most `max_held`
distinct ones are held per connection, and one more makes room by closing the one least recently
received or asked for (a long-lived connection, nsmgr's to our endpoint, sees a namespace per
target over its life; a peer flooding us only evicts its own). `release(url)` closes one its
holder no longer needs (a connection's Close). Descriptors a short ancillary buffer cut off
(MSG_CTRUNC) are logged.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import os
import re
import socket
import urllib.parse
from collections.abc import Iterator

import trio
from loguru import logger

RECEIVE_SIZE = 65536
MAX_HELD = 256  # distinct descriptors held for one connection (least recently used go first)
SCM_MAX_FD = 253  # the kernel's limit of descriptors in one SCM_RIGHTS message
_INT = array.array("i").itemsize
ANCILLARY_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * _INT)
_INODE_URL = re.compile(r"inode://([0-9]{1,20})/([0-9]{1,20})")
_U64 = 2**64


class FdPassError(Exception):
    """A descriptor could not be sent or received on this connection; the message says why."""


class FdNotReceived(FdPassError):
    """The connection closed before the descriptor a URL names arrived."""


class FdUrlError(ValueError):
    """Not a URL of the form asked for; the message is the reason."""


# -- URL forms (pure, apart from the stat calls their names announce) -----------------------------


def format_inode_url(dev: int, ino: int) -> str:
    return f"inode://{dev}/{ino}"


def parse_inode_url(url: str) -> tuple[int, int]:
    """(dev, ino) of `inode://<dev>/<ino>`, both decimal and unsigned 64-bit."""
    match = _INODE_URL.fullmatch(url)
    if match is None:
        raise FdUrlError(f"not an inode://<dev>/<ino> URL: {url[:80]!r}")
    dev, ino = int(match[1]), int(match[2])
    if dev >= _U64 or ino >= _U64:
        raise FdUrlError(f"device or inode number out of range: {url[:80]!r}")
    return dev, ino


def is_inode_url(url: str) -> bool:
    return url.startswith("inode://")


def path_of_url(url: str) -> str:
    """The absolute path of a `file://` or `unix://` URL (percent-decoded)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("file", "unix"):
        raise FdUrlError(f"not a file:// or unix:// URL: {url[:80]!r}")
    if parts.netloc or parts.query or parts.fragment:
        raise FdUrlError(f"a {parts.scheme}:// URL here is a local path only: {url[:80]!r}")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise FdUrlError(f"path not absolute: {url[:80]!r}")
    return path


def inode_url_of_stat(result: os.stat_result) -> str:
    return format_inode_url(result.st_dev, result.st_ino)


def inode_url_of_path(path: str) -> str:
    """`inode://` of the file at `path` (symbolic links followed, as grpcfd's os.Stat does)."""
    return inode_url_of_stat(os.stat(path))


def inode_url_of_fd(fd: int) -> str:
    return inode_url_of_stat(os.fstat(fd))


def inode_url_of(url: str) -> str:
    """`inode://` of the file a `file://` or `unix://` URL names (grpcfd's FilenameToURL)."""
    return inode_url_of_path(path_of_url(url))


def reopen_fd(fd: int, flags: int = os.O_RDONLY) -> int:
    """A new open of the file `fd` refers to, through `/proc/self/fd/<fd>`: what a descriptor
    opened O_PATH (all that `send_path` sends, as grpcfd does) needs before setns(2) or a read,
    which refuse O_PATH descriptors (EBADF)."""
    return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)


def proc_fd_url(fd: int, scheme: str = "file") -> str:
    """Where another process (or a dialer) reaches our descriptor: `<scheme>:///proc/<pid>/fd/<fd>`
    (NSM's recvfd turns a mechanism's inode:// into a file:// one, an NSE's into unix://)."""
    return f"{scheme}:///proc/{os.getpid()}/fd/{fd}"


# -- the per-connection transceiver ---------------------------------------------------------------


class FdTransceiver:
    """The descriptors of one connection: queued to go out, and received (indexed by dev, ino)."""

    def __init__(self, *, max_held: int = MAX_HELD) -> None:
        self.max_held = max_held
        self._outgoing: collections.deque[int] = collections.deque()
        self._held: dict[tuple[int, int], int] = {}
        self._arrived: dict[tuple[int, int], trio.Event] = {}
        self._closed = False
        self.sent = 0  # descriptors sent so far
        self.received = 0  # descriptors received and held (copies of a held one not counted)
        self.evicted = 0  # held ones closed to make room for newer ones (`max_held`)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Descriptors queued and not sent yet."""
        return len(self._outgoing)

    @property
    def held(self) -> int:
        """Distinct received descriptors held for `receive_fd`."""
        return len(self._held)

    # -- sending --------------------------------------------------------------------------------

    def send_fd(self, fd: int) -> str:
        """Queue a duplicate of `fd` for the next bytes written; its `inode://` URL."""
        self._check_open()
        return self._queue(os.dup(fd))

    def send_path(self, path: str) -> str:
        """Open `path` (O_PATH: no read access needed, any file type) and queue it."""
        self._check_open()
        return self._queue(os.open(path, os.O_PATH | os.O_CLOEXEC))

    def send_url(self, url: str) -> str:
        """Queue the file a `file://` or `unix://` URL names; the `inode://` URL to send instead
        (NSM's sendfd: a mechanism's inodeURL, an endpoint's registered URL)."""
        return self.send_path(path_of_url(url))

    def _queue(self, owned: int) -> str:
        try:
            url = inode_url_of_fd(owned)
        except BaseException:
            os.close(owned)
            raise
        self._outgoing.append(owned)
        return url

    def _next_outgoing(self) -> int | None:
        return self._outgoing[0] if self._outgoing else None

    def _sent_one(self) -> None:
        os.close(self._outgoing.popleft())
        self.sent += 1

    # -- receiving ------------------------------------------------------------------------------

    async def receive_fd(self, url: str) -> int:
        """A new descriptor (close-on-exec, the caller's to close) for the file `url`
        (`inode://dev/ino`) names, once it has arrived on this connection.

        Waits as long as the caller's deadline allows (`with trio.fail_after(...)`); raises
        FdNotReceived if the connection closes first.
        """
        return await self._receive(parse_inode_url(url), url)

    async def _receive(self, key: tuple[int, int], url: str) -> int:
        while True:
            await trio.lowlevel.checkpoint()
            held = self._held.pop(key, None)
            if held is not None:
                self._held[key] = held  # the most recently used now: the last to be evicted
                return os.dup(held)
            if self._closed:
                raise FdNotReceived(f"connection closed before the descriptor for {url} arrived")
            event = self._arrived.setdefault(key, trio.Event())
            await event.wait()

    def release(self, url: str) -> bool:
        """Close the descriptor held for `url` (duplicates handed out stay open); False if none."""
        held = self._held.pop(parse_inode_url(url), None)
        if held is None:
            return False
        os.close(held)
        return True

    def _deliver(self, fds: list[int], *, truncated: bool = False) -> None:
        """Index the descriptors one read brought (taking ownership of every one)."""
        if truncated:
            logger.warning("descriptors cut off: ancillary data truncated (MSG_CTRUNC)")
        for fd in fds:
            try:
                stat = os.fstat(fd)
            except OSError as exc:
                os.close(fd)
                logger.warning("received descriptor unusable", reason=exc.strerror or str(exc))
                continue
            key = (stat.st_dev, stat.st_ino)
            if self._closed or key in self._held:
                os.close(fd)  # a copy of one we hold (or nobody left to hold it)
                continue
            while len(self._held) >= self.max_held:
                oldest = next(iter(self._held))
                os.close(self._held.pop(oldest))
                self.evicted += 1
                logger.debug(
                    "held descriptor closed to make room",
                    url=format_inode_url(*oldest),
                    held=len(self._held),
                )
            self._held[key] = fd
            self.received += 1
            event = self._arrived.pop(key, None)
            if event is not None:
                event.set()

    # -- lifetime -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FdPassError("connection closed: no more descriptors can be sent")

    def _close(self) -> None:
        """Close everything held or queued, and wake every waiter (idempotent)."""
        self._closed = True
        while self._outgoing:
            os.close(self._outgoing.popleft())
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)
        arrived, self._arrived = self._arrived, {}
        for event in arrived.values():
            event.set()


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            numbers = array.array("i")
            numbers.frombytes(data[: len(data) - len(data) % _INT])
            fds.extend(numbers)
    return fds


# -- the stream -----------------------------------------------------------------------------------


class FdStream(trio.abc.HalfCloseableStream):
    """A connected AF_UNIX stream socket that carries descriptors (see the module docstring).

    Like `trio.SocketStream` otherwise (`socket` is the trio socket); closing it closes the
    socket and every descriptor its `fds` holds or has queued.
    """

    def __init__(self, sock: trio.socket.SocketType, *, max_held: int = MAX_HELD) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError("FdStream needs a connected AF_UNIX SOCK_STREAM socket")
        self.socket = sock
        self.fds = FdTransceiver(max_held=max_held)
        self._sending = False
        self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            with _stream_errors(), memoryview(data) as whole:
                if not whole:
                    if self.socket.fileno() == -1:
                        raise trio.ClosedResourceError("socket was already closed")
                    await trio.lowlevel.checkpoint()
                    return
                offset = 0
                while offset < len(whole) and (fd := self.fds._next_outgoing()) is not None:
                    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
                    with whole[offset : offset + 1] as one:
                        sent = await self.socket.sendmsg([one], rights)
                    if sent:  # the byte went, so did its descriptor
                        self.fds._sent_one()
                        offset += sent
                while offset < len(whole):
                    with whole[offset:] as rest:
                        offset += await self.socket.send(rest)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("socket was already closed")
        with _stream_errors():
            await self.socket.wait_writable()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self.socket.did_shutdown_SHUT_WR:
            return
        with _stream_errors():
            self.socket.shutdown(socket.SHUT_WR)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is None:
            max_bytes = RECEIVE_SIZE
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            with _stream_errors():
                data, ancillary, flags, _ = await self.socket.recvmsg(
                    max_bytes, ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
        finally:
            self._receiving = False
        self.fds._deliver(_descriptors(ancillary), truncated=bool(flags & socket.MSG_CTRUNC))
        return data

    async def aclose(self) -> None:
        # The socket first: a send waiting on it wakes with ClosedResourceError and never
        # passes a queued descriptor number that `_close` is about to free.
        self.socket.close()
        self.fds._close()
        await trio.lowlevel.checkpoint()


@contextlib.contextmanager
def _stream_errors() -> Iterator[None]:
    """OSError as trio's stream errors, as `trio.SocketStream` does: EBADF is closed, anything
    else broken."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


async def open_fd_stream(path: str, *, max_held: int = MAX_HELD) -> FdStream:
    """Connect to the UNIX socket at `path` (OSError if that fails)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return FdStream(sock, max_held=max_held)


def transceiver_of(stream: trio.abc.Stream) -> FdTransceiver | None:
    """The descriptor transceiver under `stream` (through TLS), or None (TCP, a test stream)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    return stream.fds if isinstance(stream, FdStream) else None
