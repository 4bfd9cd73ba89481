"""File descriptors over UNIX-socket gRPC connections (proxy/rpc/fdpass.py), as NSM's grpcfd
passes them: SCM_RIGHTS on bytes of the raw socket stream, under TLS when TLS is on, named in
messages as `inode://<st_dev>/<st_ino>`.

The calls are NSM's own: `NetworkService.Request` with the descriptors named in the mechanisms'
`inodeURL` parameters, as the proxy's NSC sends its namespace and its NSE answers with its own.
Client and server run in this process, so a descriptor is checked against the file it came
from with stat. Figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import array
import ctypes
import math
import os
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import grpc
import pytest
import trio
import trustme
from purerpc.grpclib.exceptions import FailedPreconditionError

from proxy.api.health.v1.health_grpc import HealthServicer, HealthStub
from proxy.api.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.networkservice_grpc import (
    NetworkServiceServicer,
    NetworkServiceStub,
)
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.rpc import CallContext, NotFoundError, Server, open_channel
from proxy.rpc import tls as rpc_tls
from proxy.rpc.fdpass import (
    FdNotReceived,
    FdPassError,
    FdStream,
    FdTransceiver,
    inode_url_of_path,
    is_inode_url,
    reopen_fd,
)
from tests.integration.netns import ip, namespaces
from tests.integration.waiting import eventually

pytestmark = pytest.mark.timeout(60)

INODE_URL = "inodeURL"
HEALTH = "grpc.health.v1.Health"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


# -- the server side: an NSE that resolves what it is sent and sends files back -------------------


@attrs.define
class Received:
    url: str
    dev: int
    ino: int
    content: bytes | None  # a regular file's first bytes, read through the received descriptor
    probe: str | None = None


class FdEndpoint(NetworkServiceServicer):  # type: ignore[misc]
    """Request: every mechanism preference's `inode://` inodeURL is resolved to its descriptor
    (waiting at most `wait` seconds, then NOT_FOUND; inf: as long as the call's deadline allows),
    recorded (and handed to `probe`, whose answer goes back as `probe-<i>`), and closed. Each
    `reply-<i>` parameter of the connection's mechanism names a file sent back: the answer's
    mechanism carries its inode:// URL under the same key."""

    def __init__(
        self,
        *,
        wait: float = 5.0,
        probe: Callable[[int], Awaitable[str]] | None = None,
    ) -> None:
        self.wait = wait
        self.probe = probe
        self.received: list[Received] = []
        self.contexts: list[CallContext] = []
        self.cancelled = 0

    async def Request(self, message: NetworkServiceRequest, request: CallContext) -> Connection:
        self.contexts.append(request)
        fds = request.fds
        if fds is None:
            raise FailedPreconditionError("no descriptors on this connection")
        answer = Connection(id=message.connection.id, mechanism=Mechanism(cls="LOCAL"))
        try:
            for index, preference in enumerate(message.mechanism_preferences):
                url = preference.parameters.get(INODE_URL, "")
                if not is_inode_url(url):
                    continue
                with trio.move_on_after(self.wait) as waited:
                    fd = await fds.receive_fd(url)
                if waited.cancelled_caught:
                    raise NotFoundError(f"no descriptor for {url} within {self.wait:g}s")
                try:
                    answer.mechanism.parameters[f"probe-{index}"] = await self._record(url, fd)
                finally:
                    os.close(fd)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        for key, path in message.connection.mechanism.parameters.items():
            if key.startswith("reply-"):
                answer.mechanism.parameters[key] = fds.send_path(path)
        return answer

    async def _record(self, url: str, fd: int) -> str:
        info = os.fstat(fd)
        try:
            content: bytes | None = read_through(fd)
        except OSError:  # a namespace (nsfs) or a socket file: nothing to read
            content = None
        probe = await self.probe(fd) if self.probe is not None else ""
        self.received.append(Received(url, info.st_dev, info.st_ino, content, probe))
        return probe


class Serving(HealthServicer):  # type: ignore[misc]
    async def Check(self, message: HealthCheckRequest, request: CallContext) -> HealthCheckResponse:
        return HealthCheckResponse(status=HealthCheckResponse.SERVING)


def read_through(fd: int) -> bytes:
    """The first bytes of the file a (possibly O_PATH) descriptor refers to."""
    readable = reopen_fd(fd)
    try:
        return os.read(readable, 64)
    finally:
        os.close(readable)


@asynccontextmanager
async def serving(
    path: str, *servicers: Any, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(Server(servicers).serve_unix, path, ssl_context=ssl_context))
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()


def nse_request(
    urls: list[str], replies: list[str] | tuple[str, ...] = (), name: str = "c"
) -> NetworkServiceRequest:
    """A Request naming `urls` as the preferences' inodeURLs, asking for `replies` back."""
    return NetworkServiceRequest(
        connection=Connection(
            id=name,
            mechanism=Mechanism(parameters={f"reply-{i}": p for i, p in enumerate(replies)}),
        ),
        mechanism_preferences=[
            Mechanism(cls="LOCAL", type="KERNEL", parameters={INODE_URL: url}) for url in urls
        ],
    )


def inode(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def fd_inode(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fds_open_on(paths: set[str]) -> int:
    """How many of this process's descriptors refer to one of `paths` (grpcfd's openfdcount)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") in paths:
                count += 1
        except OSError:
            pass  # the listing's own descriptor, gone by now
    return count


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="fd-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_files(directory: str, count: int, prefix: str = "f") -> list[str]:
    paths = []
    for index in range(count):
        path = f"{directory}/{prefix}{index}"
        Path(path).write_bytes(f"{prefix}{index}".encode())
        paths.append(path)
    return paths


@attrs.frozen
class Pki:
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_pem: str
    client_cert: str  # PEM text, for grpcio
    client_key: str
    server_cert: str
    server_key: str


@pytest.fixture(scope="module")
def pki() -> Iterator[Pki]:
    """mTLS as NSM runs it on its UNIX sockets (ALPN h2, client certificates required)."""
    directory = tempfile.mkdtemp(prefix="fd-tls-")
    try:
        ca = trustme.CA()
        files = {}
        for name, cert in (
            ("server", ca.issue_cert("localhost")),
            ("client", ca.issue_cert("client.example")),
        ):
            files[name] = (f"{directory}/{name}.pem", f"{directory}/{name}.key")
            cert.cert_chain_pems[0].write_to_path(files[name][0])
            cert.private_key_pem.write_to_path(files[name][1])
        ca_pem = ca.cert_pem.bytes().decode()
        yield Pki(
            server=rpc_tls.server_context(
                certfile=files["server"][0], keyfile=files["server"][1], trusted_ca_pem=ca_pem
            ),
            client=rpc_tls.client_context(
                trusted_ca_pem=ca_pem, certfile=files["client"][0], keyfile=files["client"][1]
            ),
            ca_pem=ca_pem,
            client_cert=Path(files["client"][0]).read_text(),
            client_key=Path(files["client"][1]).read_text(),
            server_cert=Path(files["server"][0]).read_text(),
            server_key=Path(files["server"][1]).read_text(),
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@attrs.frozen
class Security:
    server: ssl.SSLContext | None
    client: ssl.SSLContext | None


@pytest.fixture(params=["plain", "tls"])
def security(request: pytest.FixtureRequest, pki: Pki) -> Security:
    if request.param == "tls":
        return Security(pki.server, pki.client)
    return Security(None, None)


# == the raw stream ================================================================================


def stream_pair(**kwargs: Any) -> tuple[FdStream, FdStream]:
    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdStream(left, **kwargs), FdStream(right, **kwargs)


async def test_each_descriptor_rides_alone_on_one_byte(sockdir):
    """grpcfd's wire behaviour: one descriptor per byte (one sendmsg each), so a reader with
    room for a single descriptor (old grpcfd reads with CmsgSpace(4)) loses none; the rest of
    the write follows as plain bytes."""
    files = make_files(sockdir, 10)
    sender, raw = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdStream(sender)
    try:
        urls = [stream.fds.send_path(path) for path in files]
        assert stream.fds.pending == 10
        payload = bytes(range(100))
        await stream.send_all(payload)
        assert (stream.fds.pending, stream.fds.sent) == (0, 10)
        data, got = b"", list[int]()
        while len(data) < len(payload):
            chunk, ancillary, flags, _ = await raw.recvmsg(
                len(payload), socket.CMSG_SPACE(array.array("i").itemsize)
            )
            assert not flags & socket.MSG_CTRUNC
            for _, _, cmsg in ancillary:
                got.extend(array.array("i", cmsg))
            data += chunk
        assert data == payload
        assert [fd_inode(fd) for fd in got] == [inode(path) for path in files]
        assert urls == [inode_url_of_path(path) for path in files]
        for fd in got:
            os.close(fd)
    finally:
        await stream.aclose()
        raw.close()


async def test_a_peer_that_bundles_descriptors_in_one_message(sockdir):
    """A sender putting many descriptors on one byte (not grpcfd, but legal): all are kept."""
    files = make_files(sockdir, 100)
    raw, receiver = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = FdStream(receiver)
    opened = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in files]
    try:
        rights = array.array("i", opened)
        await raw.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        assert await stream.receive_some() == b"x"
        assert stream.fds.received == 100
        for path in files:
            with trio.fail_after(1):
                fd = await stream.fds.receive_fd(inode_url_of_path(path))
            assert fd_inode(fd) == inode(path)
            os.close(fd)
    finally:
        for fd in opened:
            os.close(fd)
        raw.close()
        await stream.aclose()


async def test_copies_room_release_and_close(sockdir):
    """A file sent twice is held once; past `max_held` the least recently received or asked for
    is closed to make room; `release` closes one; closing the stream closes what is held and
    what is still queued."""
    files = make_files(sockdir, 5)
    paths = set(files)
    left, right = stream_pair(max_held=3)

    async def deliver(*sent: str) -> None:
        for path in sent:
            left.fds.send_path(path)
        await left.send_all(b"x" * len(sent))
        received = b""
        while len(received) < len(sent):
            received += await right.receive_some()

    async def held(path: str) -> bool:
        with trio.move_on_after(0.05):
            os.close(await right.fds.receive_fd(inode_url_of_path(path)))
            return True
        return False

    await deliver(files[0], files[0], files[1], files[2])
    assert (right.fds.held, right.fds.received, right.fds.evicted) == (3, 3, 0)
    assert await held(files[0])  # asked for: the most recently used now
    await deliver(files[3])  # room made: files[1] goes, the oldest not asked for since
    assert (right.fds.held, right.fds.received, right.fds.evicted) == (3, 4, 1)
    assert [await held(path) for path in files[:4]] == [True, False, True, True]
    assert right.fds.release(inode_url_of_path(files[0]))
    assert not right.fds.release(inode_url_of_path(files[4]))
    assert right.fds.held == 2
    right.fds.send_path(files[4])  # queued, never sent
    assert fds_open_on(paths) == 3  # two held, one queued
    await right.aclose()
    await left.aclose()
    assert fds_open_on(paths) == 0
    with pytest.raises(FdPassError):
        left.fds.send_path(files[0])


# == calls: descriptors in both directions =========================================================


async def test_descriptors_both_ways(sockdir, security):
    """Client -> server with a Request, server -> client with its answer, over a real UNIX
    socket, with and without TLS; each resolves to the file it was opened from, and reads."""
    to_server, to_client = make_files(sockdir, 2)
    path = f"{sockdir}/nse.sock"
    endpoint = FdEndpoint()
    async with (
        serving(path, endpoint, ssl_context=security.server),
        open_channel(f"unix://{path}", ssl_context=security.client) as channel,
    ):
        fds = channel.fds
        assert fds is not None
        assert (channel.connection.peer.certificate is not None) == (security.client is not None)
        start = time.perf_counter()
        url = fds.send_url(f"file://{to_server}")
        assert url == inode_url_of_path(to_server)
        with trio.fail_after(5):
            answer = await NetworkServiceStub(channel).Request(
                nse_request([url], replies=[to_client])
            )
            back = answer.mechanism.parameters["reply-0"]
            fd = await fds.receive_fd(back)
        took = time.perf_counter() - start
        try:
            assert fd_inode(fd) == inode(to_client)
            assert read_through(fd) == b"f1"
        finally:
            os.close(fd)
        [seen] = endpoint.received
        assert (seen.dev, seen.ino) == inode(to_server)
        assert seen.content == b"f0"
        assert (fds.sent, fds.pending, fds.received) == (1, 0, 1)
        server_fds = endpoint.contexts[0].fds
        assert server_fds is not None and (server_fds.sent, server_fds.received) == (1, 1)
    kind = "TLS" if security.client else "plain"
    print(f"\n{kind}: one descriptor each way in {took * 1e3:.1f} ms")


@pytest.mark.root
async def test_a_network_namespace_travels_and_is_entered(sockdir, security):
    """NSM's use: the client sends a namespace (`/run/netns/<name>`, a throw-away one with an
    interface made in it) and the server enters it through the received descriptor; the server
    answers with its own (`/proc/thread-self/ns/net`, as NSM's kernel mechanism server does)."""
    path = f"{sockdir}/nse.sock"

    async def interfaces(fd: int) -> str:
        return ",".join(await trio.to_thread.run_sync(interfaces_in, fd))

    endpoint = FdEndpoint(probe=interfaces)
    with namespaces("fd") as names:
        netns = names["fd"]
        ip("link", "add", "mpfd0", "type", "bridge", netns=netns)
        async with (
            serving(path, endpoint, ssl_context=security.server),
            open_channel(f"unix://{path}", ssl_context=security.client) as channel,
        ):
            assert channel.fds is not None
            url = channel.fds.send_url(f"file:///run/netns/{netns}")
            with trio.fail_after(5):
                answer = await NetworkServiceStub(channel).Request(
                    nse_request([url], replies=["/proc/thread-self/ns/net"])
                )
                fd = await channel.fds.receive_fd(answer.mechanism.parameters["reply-0"])
            try:
                [seen] = endpoint.received
                assert (seen.dev, seen.ino) == inode(f"/run/netns/{netns}")
                assert "mpfd0" in answer.mechanism.parameters["probe-0"].split(",")
                assert fd_inode(fd) == inode("/proc/self/ns/net") != inode(f"/run/netns/{netns}")
                assert "mpfd0" not in await trio.to_thread.run_sync(interfaces_in, fd)
            finally:
                os.close(fd)
    print(f"\nnamespace {netns}: interfaces seen through the descriptor: {seen.probe}")


def interfaces_in(fd: int) -> list[str]:
    """The interfaces of the network namespace `fd` refers to, listed from a thread that enters
    it (reopened: setns refuses the O_PATH descriptor grpcfd sends) and then ends."""
    names: list[str] = []
    errors: list[BaseException] = []

    def enter_and_list() -> None:
        try:
            namespace = reopen_fd(fd)
            try:
                if _libc.setns(namespace, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(namespace)
            names.extend(name for _, name in socket.if_nameindex())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=enter_and_list)  # never back to a pool: it changed netns
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return names


async def test_an_endpoint_socket_travels_and_is_dialled(sockdir, security):
    """NSM's registry use: an NSE sends its listening socket file (`unix://` URL -> inode://);
    the receiver dials it through `/proc/<pid>/fd/<n>`, as nsmgr does."""
    nse_path, manager_path = f"{sockdir}/nse.sock", f"{sockdir}/manager.sock"
    endpoint = FdEndpoint()
    dialled: list[str] = []

    async def dial(fd: int) -> str:
        async with open_channel(f"unix:///proc/{os.getpid()}/fd/{fd}") as nse:
            with trio.fail_after(5):
                answer = await NetworkServiceStub(nse).Request(nse_request([], name="via-fd"))
        dialled.append(str(answer.id))
        return str(answer.id)

    manager = FdEndpoint(probe=dial)
    async with (
        serving(nse_path, endpoint),
        serving(manager_path, manager, ssl_context=security.server),
        open_channel(f"unix://{manager_path}", ssl_context=security.client) as channel,
    ):
        assert channel.fds is not None
        url = channel.fds.send_url(f"unix://{nse_path}")
        with trio.fail_after(5):
            answer = await NetworkServiceStub(channel).Request(nse_request([url]))
    assert dialled == ["via-fd"] and answer.mechanism.parameters["probe-0"] == "via-fd"
    assert [context.fds is not None for context in endpoint.contexts] == [True]


# == waiting =======================================================================================


async def test_waiting_for_a_descriptor_that_never_comes(sockdir, security):
    """A bounded wait ends cleanly (the handler answers NOT_FOUND, the connection carries on);
    the client's own wait ends at its deadline; a wait bounded only by the call's deadline ends
    with the call; a waiter is woken when the connection closes."""
    files = make_files(sockdir, 1)
    path = f"{sockdir}/nse.sock"
    missing = "inode://1/987654321"
    async with (
        serving(path, FdEndpoint(wait=0.3), ssl_context=security.server),
        open_channel(f"unix://{path}", ssl_context=security.client) as channel,
    ):
        stub = NetworkServiceStub(channel)
        assert channel.fds is not None
        start = time.perf_counter()
        with pytest.raises(NotFoundError) as refused, trio.fail_after(5):
            await stub.Request(nse_request([missing]))
        took = time.perf_counter() - start
        assert missing in refused.value.status.status_message
        assert 0.25 < took < 2
        with trio.fail_after(5):  # the same connection still passes descriptors
            await stub.Request(nse_request([channel.fds.send_path(files[0])]))
        start = time.perf_counter()
        with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
            await channel.fds.receive_fd(missing)
        client_took = time.perf_counter() - start

    unbounded = FdEndpoint(wait=math.inf)
    woken: list[str] = []

    async def wait(fds: FdTransceiver) -> None:
        with pytest.raises(FdNotReceived) as closed:
            await fds.receive_fd(missing)
        woken.append(str(closed.value))

    async with serving(path, unbounded, ssl_context=security.server):
        async with open_channel(f"unix://{path}", ssl_context=security.client) as channel:
            with pytest.raises(trio.TooSlowError), trio.fail_after(0.3):
                await NetworkServiceStub(channel).Request(nse_request([missing]))
            await eventually(lambda: unbounded.cancelled == 1, within=2, interval=0.01)
        async with (
            trio.open_nursery() as nursery,
            open_channel(f"unix://{path}", ssl_context=security.client) as channel,
        ):
            transceiver = channel.fds
            assert transceiver is not None
            nursery.start_soon(wait, transceiver)
            await trio.sleep(0.05)
            assert not woken
        assert woken and "connection closed" in woken[0]
        with pytest.raises(FdPassError):
            transceiver.send_path(files[0])
    print(f"\nhandler gave up after {took:.3f}s (NOT_FOUND); client after {client_took:.3f}s")


# == volume and leaks ==============================================================================


async def test_many_descriptors_over_one_connection(sockdir, security):
    """Hundreds of descriptors both ways on one connection: one by one, 100 in one Request and
    100 in its answer, and from 20 calls at once."""
    files = make_files(sockdir, 420)
    path = f"{sockdir}/nse.sock"
    endpoint = FdEndpoint()
    async with (
        serving(path, endpoint, ssl_context=security.server),
        open_channel(f"unix://{path}", ssl_context=security.client) as channel,
    ):
        fds = channel.fds
        assert fds is not None
        stub = NetworkServiceStub(channel)
        start = time.perf_counter()
        back: dict[str, str] = {}  # url -> file
        with trio.fail_after(30):
            for index in range(100):  # 2 there and 1 back per call
                pair = files[2 * index : 2 * index + 2]
                answer = await stub.Request(
                    nse_request([fds.send_path(p) for p in pair], replies=[files[200 + index]])
                )
                back[answer.mechanism.parameters["reply-0"]] = files[200 + index]
            bulk = files[300:400]
            answer = await stub.Request(
                nse_request([fds.send_path(p) for p in bulk], replies=files[:100])
            )
            for key, url in answer.mechanism.parameters.items():
                if key.startswith("reply-"):
                    back[url] = files[int(key.removeprefix("reply-"))]

            async def one(name: str, group: list[str]) -> None:
                await stub.Request(nse_request([fds.send_path(p) for p in group], name=name))

            async with trio.open_nursery() as nursery:
                for task in range(20):
                    nursery.start_soon(one, f"c{task}", files[400 + task : 401 + task] * 5)
            for url, file in back.items():
                fd = await fds.receive_fd(url)
                assert fd_inode(fd) == inode(file)
                os.close(fd)
        took = time.perf_counter() - start
        sent_there = 200 + 100 + 20 * 5
        assert fds.sent == sent_there and fds.pending == 0
        assert len(endpoint.received) == sent_there
        assert all((seen.dev, seen.ino) == inode_of_url(seen.url) for seen in endpoint.received)
        contents = {seen.content for seen in endpoint.received}
        there = [*range(200), *range(300, 420)]  # files[200:300] only ever went back
        assert contents == {f"f{index}".encode() for index in there}
        assert fds.received == len(back) == 200
    kind = "TLS" if security.client else "plain"
    print(
        f"\n{kind}: {sent_there} descriptors to the server, {len(back)} back, on one connection"
        f" in {took:.2f}s"
    )


def inode_of_url(url: str) -> tuple[int, int]:
    dev, _, ino = url.removeprefix("inode://").partition("/")
    return int(dev), int(ino)


async def test_no_descriptor_leak_after_many_connections(sockdir, pki):
    """Connections (half of them TLS) that pass descriptors both ways, some never asked for
    and some still queued when the channel closes: afterwards this process (client and server)
    holds exactly the descriptors it held before, and none of the files passed."""
    files = make_files(sockdir, 6)
    paths = set(files)
    path, tls_path = f"{sockdir}/nse.sock", f"{sockdir}/nse-tls.sock"
    endpoint = FdEndpoint()
    rounds = 40

    async def one_connection(index: int) -> None:
        tls = index % 2 == 1
        target = f"unix://{tls_path if tls else path}"
        async with open_channel(target, ssl_context=pki.client if tls else None) as channel:
            fds = channel.fds
            assert fds is not None
            asked = [fds.send_path(files[0]), fds.send_path(files[1])]
            fds.send_path(files[2])  # sent, never asked for: held by the server until closed
            with trio.fail_after(5):
                answer = await NetworkServiceStub(channel).Request(
                    nse_request(asked, replies=[files[3], files[4]], name=f"c{index}")
                )
                fd = await fds.receive_fd(answer.mechanism.parameters["reply-0"])
            os.close(fd)  # reply-1 never asked for: held until the channel closes
            fds.send_path(files[5])  # queued after the last call

    async with (
        serving(path, endpoint),
        serving(tls_path, endpoint, ssl_context=pki.server),
    ):
        await one_connection(0)
        await one_connection(1)
        await eventually(lambda: fds_open_on(paths) == 0, within=5, interval=0.01)
        before = open_fds()
        start = time.perf_counter()
        for index in range(rounds):
            await one_connection(index)
        took = time.perf_counter() - start
        # The server's side of the last connection closes once it has seen the client go.
        await eventually(lambda: open_fds() == before, within=5, interval=0.01)
        assert fds_open_on(paths) == 0
        after = open_fds()
    passed = rounds * 6
    print(
        f"\n{rounds} connections, {passed} descriptors passed: open fds {before} before, "
        f"{after} after ({took:.2f}s)"
    )


# == other peers ===================================================================================


async def test_grpcio_peers_on_the_same_sockets(sockdir, pki):
    """grpcio has no fd passing, but plain calls between it and the fd-capable streams still
    work both ways on UNIX sockets, with and without TLS, next to a client passing descriptors
    to the same server; over TCP there is no transceiver at all."""
    files = make_files(sockdir, 1)
    plain, secured = f"{sockdir}/plain.sock", f"{sockdir}/tls.sock"
    endpoint = FdEndpoint()

    def grpcio_check(target: str, credentials: Any = None) -> int:
        if credentials is None:
            channel = grpc.insecure_channel(target)
        else:
            channel = grpc.secure_channel(
                target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
            )
        try:
            call = channel.unary_unary(
                f"/{HEALTH}/Check",
                request_serializer=HealthCheckRequest.SerializeToString,
                response_deserializer=HealthCheckResponse.FromString,
            )
            return int(call(HealthCheckRequest(), timeout=5).status)
        finally:
            channel.close()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem.encode(),
        private_key=pki.client_key.encode(),
        certificate_chain=pki.client_cert.encode(),
    )
    serving_status = int(HealthCheckResponse.SERVING)
    async with (
        serving(plain, endpoint, Serving()),
        serving(secured, endpoint, Serving(), ssl_context=pki.server),
        open_channel(f"unix://{secured}", ssl_context=pki.client) as channel,
    ):
        assert channel.fds is not None
        url = channel.fds.send_path(files[0])
        with trio.fail_after(5):
            await NetworkServiceStub(channel).Request(nse_request([url]))

        async def check(*args: Any) -> int:
            return await trio.to_thread.run_sync(grpcio_check, *args)

        assert await check(f"unix:{plain}") == serving_status
        assert await check(f"unix:{secured}", credentials) == serving_status
        with trio.fail_after(5):
            socket_url = channel.fds.send_path(plain)
            await NetworkServiceStub(channel).Request(nse_request([socket_url]))
        assert socket_url == inode_url_of_path(plain)
    assert [seen.url for seen in endpoint.received] == [url, socket_url]

    # The layer's fd-capable client to a grpcio server on a UNIX socket, plain and TLS.
    for use_tls in (False, True):
        grpcio_server = grpc.server(ThreadPoolExecutor(max_workers=4))
        grpcio_server.add_generic_rpc_handlers((grpcio_health_handler(),))
        socket_path = f"{sockdir}/grpcio-{use_tls}.sock"
        if use_tls:
            server_credentials = grpc.ssl_server_credentials(
                [(pki.server_key.encode(), pki.server_cert.encode())],
                root_certificates=pki.ca_pem.encode(),
                require_client_auth=True,
            )
            grpcio_server.add_secure_port(f"unix:{socket_path}", server_credentials)
        else:
            grpcio_server.add_insecure_port(f"unix:{socket_path}")
        grpcio_server.start()
        try:
            async with open_channel(
                f"unix://{socket_path}", ssl_context=pki.client if use_tls else None
            ) as channel:
                assert channel.fds is not None
                with trio.fail_after(5):
                    reply = await HealthStub(channel).Check(HealthCheckRequest())
                assert reply.status == HealthCheckResponse.SERVING
        finally:
            grpcio_server.stop(0).wait(5)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(Server([endpoint]).serve_tcp, "127.0.0.1", 0))
        async with open_channel(f"127.0.0.1:{port}") as channel:
            assert channel.fds is None
            with pytest.raises(FailedPreconditionError), trio.fail_after(5):
                await NetworkServiceStub(channel).Request(nse_request([]))
        assert endpoint.contexts[-1].fds is None
        nursery.cancel_scope.cancel()


def grpcio_health_handler() -> Any:
    """Health/Check for a grpcio server, with the project's own message classes."""

    def check(message: HealthCheckRequest, context: grpc.ServicerContext) -> HealthCheckResponse:
        return HealthCheckResponse(status=HealthCheckResponse.SERVING)

    return grpc.method_handlers_generic_handler(
        HEALTH,
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=HealthCheckRequest.FromString,
                response_serializer=HealthCheckResponse.SerializeToString,
            )
        },
    )
