"""Client side: channels that purerpc's generated stubs accept, with what purerpc lacks.

* `open_channel(target)` dials `unix:///path`, `host:port` or `[v6]:port` (optionally TLS with
  ALPN h2) and runs one `Connection`. Every call carries the caller's trio deadline as
  grpc-timeout; a call whose scope is cancelled resets its stream; a lost connection fails every
  pending call with UNAVAILABLE at once.
* `server_stream(stub.Method, request)` reads a server stream and resets it when the block is left
  early (purerpc's own iterator never tells the server).
* `unary_call(stub.Method, request)` answers the reply with the server's response header
  metadata, which purerpc's stubs drop (NSM's registry answers its `path` there).
* On a UNIX socket, `channel.fds` passes file descriptors with the calls, as NSM's grpcfd does
  (`fdpass`): `url = channel.fds.send_url("file:///proc/thread-self/ns/net")` before the call,
  `await channel.fds.receive_fd(url)` for one the server sent back.
* `ReconnectingChannel` keeps a channel up with jittered exponential backoff, and publishes its
  state (for the IPAMCli / NSPCli health of later issues).

Usage::

    async with open_channel("unix:///tmp/health.sock") as channel:
        with trio.fail_after(1):
            reply = await HealthStub(channel).Check(HealthCheckRequest(service=""))
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Generic, TypeVar

import attrs
import h2.errors
import trio
from google.protobuf.message import DecodeError, Message
from loguru import logger
from purerpc.grpclib.events import MessageReceived, ResponseEnded, ResponseReceived
from purerpc.grpclib.exceptions import (
    CancelledError,
    InternalError,
    RpcFailedError,
    UnavailableError,
    raise_status,
)
from purerpc.grpclib.status import StatusCode
from purerpc.wrappers import ClientStubUnaryStream, ClientStubUnaryUnary

import proxy
from proxy.rpc.address import Address, UnixAddress, parse_address
from proxy.rpc.backoff import Backoff
from proxy.rpc.connection import Connection, Peer, RpcStream, StreamGone, tls_peer, unix_peer
from proxy.rpc.fdpass import FdTransceiver, open_fd_stream
from proxy.rpc.status import encode_timeout
from proxy.rpc.tls import Tls, as_tls
from proxy.watched import Watched

DRAIN_TIMEOUT = 1.0
USER_AGENT = f"meridio-proxy/{proxy.__version__} (purerpc)"
M = TypeVar("M", bound=Message)
Metadata = Sequence[tuple[str, str | bytes]]


class ConnectFailed(UnavailableError):  # type: ignore[misc]
    """The dial itself failed (refused, no such socket, TLS refused, timed out)."""


async def connect(
    address: Address, ssl_context: ssl.SSLContext | Tls | None
) -> tuple[trio.abc.Stream, Peer]:
    """Open the transport; OSError and TLS errors, and a TLS peer that `Tls.refusal` refuses,
    come out as UnavailableError."""
    tls_settings = as_tls(ssl_context)
    stream: trio.abc.Stream
    peer = Peer(address=str(address))
    try:
        if isinstance(address, UnixAddress):
            # Able to carry file descriptors, under TLS too (grpcfd; `channel.fds`).
            unix_stream = await open_fd_stream(address.path)
            # The server process (SO_PEERCRED): the lab's NSM manager finds an endpoint's
            # network namespace through its pid.
            peer = attrs.evolve(unix_peer(unix_stream.socket), address=str(address))
            stream = unix_stream
        else:
            stream = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {address}: {exc.strerror or exc}") from None
    if tls_settings is None:
        return stream, peer
    tls = trio.SSLStream(stream, tls_settings.context(), server_hostname=_server_hostname(address))
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tls)
        raise ConnectFailed(f"TLS handshake with {address} failed: {exc.__cause__}") from None
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    if tls.selected_alpn_protocol() not in ("h2", None):
        await trio.aclose_forcefully(tls)
        raise ConnectFailed(f"{address} did not agree to HTTP/2 (ALPN)")
    peer = tls_peer(peer, tls)
    refused = tls_settings.refusal(peer)
    if refused is not None:
        await trio.aclose_forcefully(tls)
        raise ConnectFailed(f"TLS peer {address} refused: {refused}")
    return tls, peer


def _server_hostname(address: Address) -> str:
    return "localhost" if isinstance(address, UnixAddress) else address.host


class ClientCall:
    """One call from our side; the stream object purerpc's stub wrappers drive."""

    def __init__(self, stream: RpcStream) -> None:
        self._stream = stream
        self._response_type: type[Message] | None = None
        self.start_stream_event: ResponseReceived | None = None
        self.end_stream_event: ResponseEnded | None = None

    def expect_message_type(self, message_type: type[Message]) -> None:
        self._response_type = message_type

    async def send_message(self, message: Message) -> None:
        try:
            await self._stream.send_message(message.SerializeToString())
        except StreamGone as exc:
            raise self._failure(exc) from None
        except trio.Cancelled:
            self.cancel()
            raise

    async def close(self) -> None:
        """Half-close: no more requests from us (purerpc's name for it). Never blocks."""
        if self._stream.finished or self._stream.ended_local:
            return
        connection = self._stream.connection
        if connection.lost is None:
            connection.protocol.end_request(self._stream.stream_id)
            connection.kick()
        connection.stream_done(self._stream)

    async def receive_message(self) -> Message | None:
        """The next response message, or None when the server has ended the call."""
        while True:
            try:
                event = await self._stream.next_event()
            except StreamGone as exc:
                raise self._failure(exc) from None
            except trio.Cancelled:
                self.cancel()
                raise
            if isinstance(event, ResponseReceived):
                self.start_stream_event = event
            elif isinstance(event, ResponseEnded):
                self.end_stream_event = event
                return None
            elif isinstance(event, MessageReceived):
                assert self._response_type is not None
                message = self._response_type()
                try:
                    message.ParseFromString(event.data)
                except DecodeError:
                    self.cancel()
                    raise InternalError(
                        f"could not parse the response as {self._response_type.__name__}"
                    ) from None
                return message

    def cancel(self) -> None:
        """Abandon the call: the server is told with RST_STREAM (synchronous)."""
        self._stream.reset(h2.errors.ErrorCodes.CANCEL)

    def _failure(self, exc: StreamGone) -> RpcFailedError:
        lost = self._stream.connection.lost
        if lost is not None:
            return UnavailableError(lost)
        if self._stream.reset_code == h2.errors.ErrorCodes.REFUSED_STREAM:
            return UnavailableError(f"server refused the stream: {exc}")
        if self._stream.reset_code == h2.errors.ErrorCodes.CANCEL:
            return CancelledError(f"server cancelled the call: {exc}")
        return InternalError(str(exc))


class Channel:
    """One connection to a server; hand it to purerpc's generated `...Stub(channel)`."""

    def __init__(self, connection: Connection, address: Address) -> None:
        self.connection = connection
        self.address = address
        # purerpc.Client reads these three attributes; the authority it builds is ignored below.
        self._grpc_socket = self
        self._host = "localhost"
        self._port = 0

    @property
    def fds(self) -> FdTransceiver | None:
        """File descriptors to and from the server (`fdpass`); None unless on a UNIX socket."""
        return self.connection.fds

    @property
    def usable(self) -> bool:
        return self.connection.lost is None and not self.connection.draining

    async def wait_unusable(self) -> None:
        await self.connection.wait_unusable()

    async def wait_lost(self) -> str:
        return await self.connection.wait_lost()

    async def start_request(
        self,
        scheme: str,
        service_name: str,
        method_name: str,
        message_type: str | None = None,
        authority: str | None = None,
        timeout: Any = None,  # noqa: ASYNC109  (purerpc's signature; the trio deadline rules)
        content_type_suffix: str = "",
        custom_metadata: Metadata = (),
    ) -> ClientCall:
        """Open a call (purerpc's stub calls this). The trio deadline becomes grpc-timeout."""
        connection = self.connection
        if connection.lost is not None:
            raise UnavailableError(connection.lost)
        if connection.draining:
            raise UnavailableError("the server is closing this connection (GOAWAY)")
        deadline = trio.current_effective_deadline()
        timeout_header = None
        if deadline != float("inf"):
            timeout_header = encode_timeout(max(0.0, deadline - trio.current_time()))
        stream = connection.open_stream()
        connection.protocol.begin_call(
            stream.stream_id,
            scheme="https" if connection.peer.certificate_der is not None else "http",
            path=f"/{service_name}/{method_name}",
            authority=self.address.authority,
            timeout=timeout_header,
            user_agent=USER_AGENT,
            metadata=custom_metadata,
        )
        connection.kick()
        return ClientCall(stream)


@asynccontextmanager
async def open_channel(
    target: str | Address,
    *,
    ssl_context: ssl.SSLContext | Tls | None = None,
    connect_timeout: float = 5.0,
    keepalive: tuple[float, float] | None = None,
) -> AsyncIterator[Channel]:
    """Dial `target` and yield a Channel; the connection is closed when the block ends.

    A failed or timed-out dial raises ConnectFailed (an UnavailableError).
    `keepalive=(interval, timeout)` sends HTTP/2 PINGs on an idle connection and fails it when
    they go unanswered.
    """
    address = parse_address(target) if isinstance(target, str) else target
    with trio.move_on_after(connect_timeout) as dial:
        transport, peer = await connect(address, ssl_context)
    if dial.cancelled_caught:
        raise ConnectFailed(f"cannot connect to {address}: timed out after {connect_timeout:g}s")
    connection = Connection(transport, client_side=True, peer=peer)
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(connection.run, keepalive=keepalive))
        try:
            yield Channel(connection, address)
        except BaseException as exc:
            # Re-raised below, outside the nursery: the caller's own exception, not wrapped in
            # an ExceptionGroup (the connection's tasks never raise; they record the loss).
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error


class ResponseStream(Generic[M]):
    """Iterates the messages of a server stream; raises the call's status if it is not OK."""

    def __init__(self, call: ClientCall) -> None:
        self._call = call

    def __aiter__(self) -> ResponseStream[M]:
        return self

    async def __anext__(self) -> M:
        message = await self._call.receive_message()
        if message is not None:
            return message  # type: ignore[return-value]
        ended = self._call.end_stream_event
        if ended is not None and ended.status.status_code != StatusCode.OK:
            raise_status(ended.status)
        raise StopAsyncIteration


@attrs.frozen
class Reply(Generic[M]):
    """A unary call's response message with the response's header metadata."""

    message: M
    headers: Metadata = ()

    def header(self, key: str) -> str | bytes | None:
        """The first value of a header metadata key, or None."""
        return next((value for name, value in self.headers if name == key), None)


async def unary_call(method: Any, request: Message, *, metadata: Metadata = ()) -> Reply[Any]:
    """Call a unary method of a generated stub; the reply and the server's header metadata.

    reply = await unary_call(stub.Register, nse, metadata=...)
    reply.message, reply.header("path")
    """
    if not isinstance(method, ClientStubUnaryUnary):
        raise TypeError(f"{method!r} is not a unary stub method")
    call: ClientCall = await method._stream_fn(metadata=metadata)
    try:
        await call.send_message(request)
        await call.close()
        message = await call.receive_message()
        if message is not None and await call.receive_message() is not None:
            raise InternalError("the server answered a unary call with more than one message")
    finally:
        call.cancel()
    ended = call.end_stream_event
    if ended is not None and ended.status.status_code != StatusCode.OK:
        raise_status(ended.status)
    if message is None:
        raise InternalError("the server ended a unary call without an answer")
    started = call.start_stream_event
    return Reply(message, tuple(started.custom_metadata) if started is not None else ())


@asynccontextmanager
async def server_stream(
    method: Any, request: Message, *, metadata: Metadata = ()
) -> AsyncIterator[ResponseStream[Any]]:
    """Start a server-streaming call of a generated stub; leaving the block early cancels it.

    async with server_stream(stub.Watch, HealthCheckRequest(service="x")) as responses:
        async for response in responses:
            ...
    """
    if not isinstance(method, ClientStubUnaryStream):
        raise TypeError(f"{method!r} is not a server-streaming stub method")
    call: ClientCall = await method._stream_fn(metadata=metadata)
    try:
        await call.send_message(request)
        await call.close()
        yield ResponseStream(call)
    finally:
        call.cancel()


class ChannelState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    TRANSIENT_FAILURE = "transient failure"


class ReconnectingChannel:
    """Keeps one channel to `target` up, redialling with backoff; `get()` waits for it.

    Callers bound their wait and their call with one deadline::

        with trio.fail_after(2):
            reply = await IpamStub(await ipam.get()).Allocate(child)
    """

    def __init__(
        self,
        target: str | Address,
        *,
        name: str,
        backoff: Backoff,
        ssl_context: ssl.SSLContext | Tls | None = None,
        connect_timeout: float = 5.0,
        keepalive: tuple[float, float] | None = None,
    ) -> None:
        self.address = parse_address(target) if isinstance(target, str) else target
        self.name = name
        self._backoff = backoff
        self._ssl_context = ssl_context
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._channel: Channel | None = None
        self.state: Watched[ChannelState] = Watched(ChannelState.CONNECTING)
        self.connects = 0  # successful dials so far

    async def get(self) -> Channel:
        """The live channel, waiting (as long as the caller's deadline allows) for one."""
        while True:
            channel = self._channel
            if channel is not None and channel.usable:
                return channel
            if self.state.value is ChannelState.READY:
                await self.state.wait_change(ChannelState.READY)  # run() is about to notice
            await self.state.wait_for(ChannelState.READY)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dial, serve, redial: until cancelled. Logs each state change once."""
        log = logger.bind(peer=self.name, address=str(self.address))
        task_status.started()
        failures = 0
        while True:
            self.state.set(ChannelState.CONNECTING)
            try:
                async with open_channel(
                    self.address,
                    ssl_context=self._ssl_context,
                    connect_timeout=self._connect_timeout,
                    keepalive=self._keepalive,
                ) as channel:
                    self.connects += 1
                    up_since = trio.current_time()
                    self._channel = channel
                    self.state.set(ChannelState.READY)
                    log.info("connected", after_failures=failures)
                    failures = 0
                    await channel.wait_unusable()
                    self._channel = None
                    self.state.set(ChannelState.TRANSIENT_FAILURE)
                    # A server going away (GOAWAY) lets calls in flight finish, briefly.
                    with trio.move_on_after(DRAIN_TIMEOUT):
                        await channel.wait_lost()
                    log.warning("connection lost", reason=channel.connection.lost or "draining")
                    if trio.current_time() - up_since >= self._backoff.maximum:
                        self._backoff.reset()
            except UnavailableError as exc:
                if failures == 0:
                    log.warning(
                        "cannot connect, retrying with backoff", reason=exc.status.status_message
                    )
                failures += 1
            self._channel = None
            self.state.set(ChannelState.TRANSIENT_FAILURE)
            await trio.sleep(self._backoff.next_delay())
