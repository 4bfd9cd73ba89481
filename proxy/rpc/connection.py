"""One HTTP/2 connection carrying gRPC calls, on a trio stream (TCP, UNIX or TLS over either).

purerpc's sans-IO state machine (`GRPCConnection`: h2 plus gRPC framing) does the protocol; this
module does the I/O around it, which is where purerpc's own socket layer falls short
(`field-notes.md` part A §3):

* the peer's RST_STREAM reaches the call (a server handler is cancelled, a client call fails);
* losing the connection (EOF, reset, keepalive timeout) fails every call at once with UNAVAILABLE
  instead of leaving it waiting forever;
* one writer task owns the socket, so a cancelled caller never leaves half a frame behind, and
  `send_message` waits for the bytes to be written (back-pressure, and the loop keeps breathing);
* GOAWAY is sent when a connection is closed on purpose, and the transport is always closed;
* optional HTTP/2 keepalive PINGs detect a peer that is gone without a FIN;
* on a UNIX socket (`fdpass.FdStream`, under TLS or not), `fds` passes file descriptors.
"""

from __future__ import annotations

import math
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio
from purerpc.grpclib.buffers import MessageWriteBuffer
from purerpc.grpclib.config import GRPCConfiguration
from purerpc.grpclib.connection import GRPCConnection
from purerpc.grpclib.events import (
    MessageReceived,
    RequestEnded,
    RequestReceived,
    ResponseEnded,
    WindowUpdated,
)
from purerpc.grpclib.exceptions import ProtocolError
from purerpc.grpclib.headers import sanitize_headers

from proxy.rpc.fdpass import FdTransceiver, transceiver_of

# How long a connection being closed on purpose may spend sending its GOAWAY.
GOODBYE_TIMEOUT = 0.25
RECEIVE_SIZE = 65536


@attrs.frozen
class Peer:
    """Who is on the other end: what the transport can tell, for logs and authorization."""

    address: str
    pid: int | None = None
    uid: int | None = None
    gid: int | None = None
    # The verified TLS peer certificate (`SSLSocket.getpeercert()` form and DER), if TLS.
    certificate: dict[str, Any] | None = None
    certificate_der: bytes | None = None


@attrs.frozen
class StreamReset:
    stream_id: int
    error_code: int


@attrs.frozen
class GoAway:
    error_code: int
    last_stream_id: int


@attrs.frozen
class PingAcked:
    pass


class _Protocol(GRPCConnection):  # type: ignore[misc]
    """purerpc's state machine, reporting the three events it drops on the floor."""

    def __init__(self, config: GRPCConfiguration) -> None:
        super().__init__(config)
        # h2 3.2 closes its whole state machine on receiving GOAWAY, so the frames a server sends
        # after it while draining (grpcio and grpc-go: a PING, then the in-flight responses) are
        # a ProtocolError and every call in flight fails. Keep the state: `Connection` refuses
        # new calls once it has seen GOAWAY, and the streams the peer lets finish can finish.
        h2_connection = self.h2_connection
        receive_goaway = h2_connection._frame_dispatch_table[h2.connection.GoAwayFrame]

        def receive_goaway_keeping_state(frame: Any) -> Any:
            state = h2_connection.state_machine.state
            result = receive_goaway(frame)
            h2_connection.state_machine.state = state
            return result

        h2_connection._frame_dispatch_table[h2.connection.GoAwayFrame] = (
            receive_goaway_keeping_state
        )

    def _stream_reset(self, event: h2.events.StreamReset) -> list[Any]:
        return [StreamReset(event.stream_id, int(event.error_code))]

    def _connection_terminated(self, event: h2.events.ConnectionTerminated) -> list[Any]:
        return [GoAway(int(event.error_code), event.last_stream_id or 0)]

    def _ping_acknowledged(self, event: h2.events.PingAckReceived) -> list[Any]:
        return [PingAcked()]

    def begin_call(
        self,
        stream_id: int,
        *,
        scheme: str,
        path: str,
        authority: str,
        timeout: str | None,
        user_agent: str,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> None:
        """Send a call's request headers. (purerpc's `start_request` formats grpc-timeout
        with more than the 8 digits the protocol allows, so the headers are built here.)"""
        headers = [
            (":method", "POST"),
            (":scheme", scheme),
            (":path", path),
            (":authority", authority),
            ("te", "trailers"),
            ("content-type", "application/grpc+proto"),
            ("user-agent", user_agent),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", timeout))
        headers.extend(sanitize_headers(metadata))
        self.h2_connection.send_headers(stream_id, headers, end_stream=False)


class StreamGone(Exception):
    """The peer reset this stream or the connection ended; there is no one left to answer."""


class RpcStream:
    """One gRPC call on a connection, either side."""

    def __init__(self, connection: Connection, stream_id: int) -> None:
        self.connection = connection
        self.stream_id = stream_id
        self._events_in, self._events_out = trio.open_memory_channel[Any](math.inf)
        self._window_changed = trio.Event()
        self.reset_code: int | None = None
        self.ended_remote = False
        self.ended_local = False
        self.response_started = False  # server side: response headers are out
        # Set by a server handler so that the reader can cancel it when the peer resets the stream.
        self.cancel_scope: trio.CancelScope | None = None

    @property
    def finished(self) -> bool:
        return self.reset_code is not None or (self.ended_local and self.ended_remote)

    # -- called by the connection's reader ------------------------------------------------------

    def _deliver(self, event: Any) -> None:
        if isinstance(event, ResponseEnded | RequestEnded):
            self.ended_remote = True
        self._events_in.send_nowait(event)

    def _window_update(self) -> None:
        self._window_changed.set()
        self._window_changed = trio.Event()

    def _peer_reset(self, error_code: int) -> None:
        if self.finished:
            return  # grpcio resets a stream right after ending it; nothing to tell anyone.
        if self.connection.client_side and self.ended_remote:
            # The whole response is here; a server may answer before our request has ended and
            # then reset the stream with NO_ERROR (RFC 9113 §8.1): stop sending, keep the answer.
            self.ended_local = True
            self._window_update()
            return
        self.reset_code = error_code
        self._events_in.send_nowait(StreamReset(self.stream_id, error_code))
        self._window_update()
        if self.cancel_scope is not None:
            self.cancel_scope.cancel()

    # -- used by both sides ---------------------------------------------------------------------

    async def next_event(self) -> Any:
        """The next event from the peer; StreamGone if the stream or the connection is gone."""
        if self.reset_code is not None:
            raise StreamGone(f"stream reset by peer (HTTP/2 error {self.reset_code})")
        event = await self._events_out.receive()
        if isinstance(event, StreamReset):
            raise StreamGone(f"stream reset by peer (HTTP/2 error {event.error_code})")
        if isinstance(event, _Lost):
            raise StreamGone(event.reason)
        if isinstance(event, MessageReceived):
            # Credit the flow-control window only once the message is consumed: back-pressure.
            self.connection.acknowledge(self.stream_id, event.flow_controlled_length)
        return event

    async def send_message(self, payload: bytes) -> None:
        framed = MessageWriteBuffer(None, self.connection.max_message_length)
        framed.write_message(payload)
        while framed:
            self._check_can_send()
            window = self.connection.send_window(self.stream_id)
            if window <= 0:
                await self._window_changed.wait()
                continue
            self.connection.send_data(self.stream_id, framed.data_to_send(min(window, len(framed))))
        await self.connection.drain()

    def reset(self, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abandon the call: RST_STREAM to the peer (synchronous, safe in `finally`)."""
        if self.finished:
            return
        self.reset_code = error_code
        self.connection.reset_stream(self.stream_id, error_code)

    def _check_can_send(self) -> None:
        if self.reset_code is not None:
            raise StreamGone(f"stream reset (HTTP/2 error {self.reset_code})")
        if self.connection.lost is not None:
            raise StreamGone(self.connection.lost)


@attrs.frozen
class _Lost:
    reason: str


RequestHandler = Callable[[RpcStream, RequestReceived], Awaitable[None]]


class Connection:
    """Reader, writer and (optionally) keepalive of one HTTP/2 connection; see `run`."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        *,
        client_side: bool,
        peer: Peer,
        max_message_length: int = 32 * 1024 * 1024,
    ) -> None:
        self._transport = transport
        self.client_side = client_side
        self.peer = peer
        # Descriptors passed with the calls (grpcfd); None unless the transport is an FdStream.
        self.fds: FdTransceiver | None = transceiver_of(transport)
        # The SSL context this end used (its own certificate: what its tokens must match).
        self.tls_context: ssl.SSLContext | None = (
            transport.context if isinstance(transport, trio.SSLStream) else None
        )
        self.max_message_length = max_message_length
        self._protocol = _Protocol(
            GRPCConfiguration(client_side=client_side, max_message_length=max_message_length)
        )
        self._streams: dict[int, RpcStream] = {}
        self._writer_wakeup = trio.Event()
        self._queued = 0  # bytes-producing operations so far
        self._written = 0  # ... of which the writer has put on the wire
        self._flushed = trio.Event()
        self._last_received = 0.0
        self._ping_acked = trio.Event()
        self._lost_event = trio.Event()
        self._unusable_event = trio.Event()  # lost, or the peer asked us to go away
        self.lost: str | None = None
        self.draining = False  # the peer sent GOAWAY: no new calls on this connection
        self._run_scope: trio.CancelScope | None = None

    # -- lifetime -------------------------------------------------------------------------------

    async def run(
        self,
        handle_request: RequestHandler | None = None,
        *,
        keepalive: tuple[float, float] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve the connection until it is lost or cancelled; the transport is closed on return.

        `handle_request` (server side) runs once per incoming call, in a nursery that lives as
        long as the connection. `keepalive=(interval, timeout)` (client side) sends a PING after
        `interval` seconds without traffic and declares the connection lost when no answer comes
        within `timeout`.
        """
        self._last_received = trio.current_time()
        self._protocol.initiate_connection()
        self.kick()
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._writer)
                if keepalive is not None:
                    nursery.start_soon(self._keepalive, *keepalive)
                task_status.started()
                await self._reader(handle_request)
                nursery.cancel_scope.cancel()
        finally:
            if self.lost is None:
                await self._say_goodbye()
                self._mark_lost("connection closed")
            await trio.aclose_forcefully(self._transport)

    async def wait_unusable(self) -> None:
        """Until no new call can start here: the connection is lost or draining (GOAWAY)."""
        await self._unusable_event.wait()

    async def wait_lost(self) -> str:
        await self._lost_event.wait()
        assert self.lost is not None
        return self.lost

    async def _say_goodbye(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT):
            try:
                self._protocol.h2_connection.close_connection()
                data = self._protocol.data_to_send()
                if data:
                    await self._transport.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
                pass
            except (OSError, ssl.SSLError, h2.exceptions.ProtocolError):
                pass

    def _mark_lost(self, reason: str) -> None:
        if self.lost is not None:
            return
        self.lost = reason
        self._lost_event.set()
        self._unusable_event.set()
        if self._run_scope is not None:
            self._run_scope.cancel()
        self._flushed.set()
        for stream in list(self._streams.values()):
            stream._events_in.send_nowait(_Lost(reason))
            stream._window_update()
            if stream.cancel_scope is not None:
                stream.cancel_scope.cancel()
        self._streams.clear()

    # -- reading --------------------------------------------------------------------------------

    async def _reader(self, handle_request: RequestHandler | None) -> None:
        async with trio.open_nursery() as handlers:
            try:
                while True:
                    try:
                        data = await self._transport.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                        self._mark_lost(f"connection lost: {_describe(exc)}")
                        return
                    if not data:
                        self._mark_lost("connection closed by peer")
                        return
                    self._last_received = trio.current_time()
                    try:
                        events = self._protocol.receive_data(data)
                    except (h2.exceptions.ProtocolError, ProtocolError) as exc:
                        self._mark_lost(f"HTTP/2 protocol error from peer: {exc}")
                        return
                    self.kick()  # h2 may owe the peer ACKs and window updates
                    for event in events:
                        self._dispatch(event, handle_request, handlers)
            finally:
                handlers.cancel_scope.cancel()

    def _dispatch(
        self, event: Any, handle_request: RequestHandler | None, handlers: trio.Nursery
    ) -> None:
        if isinstance(event, RequestReceived):
            if handle_request is None:
                self.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            new = RpcStream(self, event.stream_id)
            self._streams[event.stream_id] = new
            handlers.start_soon(handle_request, new, event)
        elif isinstance(event, GoAway):
            self.draining = True
            self._unusable_event.set()
            for stream_id in [i for i in self._streams if i > event.last_stream_id]:
                self._streams.pop(stream_id)._peer_reset(event.error_code)
            if not self._streams:
                self._mark_lost(f"peer closed the connection (GOAWAY, error {event.error_code})")
        elif isinstance(event, PingAcked):
            self._ping_acked.set()
        elif isinstance(event, WindowUpdated) and event.stream_id == 0:
            for each in self._streams.values():
                each._window_update()
        elif (stream := self._streams.get(event.stream_id)) is None:
            return  # an event for a call we have already forgotten
        elif isinstance(event, WindowUpdated):
            stream._window_update()
        elif isinstance(event, StreamReset):
            del self._streams[event.stream_id]
            stream._peer_reset(event.error_code)
        else:  # messages, headers, end of stream
            stream._deliver(event)
            self._forget_if_finished(stream)

    def _forget_if_finished(self, stream: RpcStream) -> None:
        if stream.finished:
            self._streams.pop(stream.stream_id, None)

    # -- writing --------------------------------------------------------------------------------

    def kick(self) -> None:
        """Wake the writer: the protocol has bytes to send (call after every protocol operation)."""
        self._queued += 1
        self._writer_wakeup.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is on the wire (or the connection is lost)."""
        target = self._queued
        while self._written < target and self.lost is None:
            await self._flushed.wait()
        await trio.lowlevel.checkpoint()

    async def _writer(self) -> None:
        while True:
            self._writer_wakeup = trio.Event()
            queued = self._queued
            data = self._protocol.data_to_send()
            if data:
                try:
                    await self._transport.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    self._mark_lost(f"connection lost: {_describe(exc)}")
                    return
            self._written = queued
            self._flushed.set()
            self._flushed = trio.Event()
            if self._queued == queued:
                await self._writer_wakeup.wait()

    # -- operations for streams -----------------------------------------------------------------

    def open_stream(self) -> RpcStream:
        stream_id = self._protocol.get_next_available_stream_id()
        stream = RpcStream(self, stream_id)
        self._streams[stream_id] = stream
        return stream

    @property
    def protocol(self) -> GRPCConnection:
        return self._protocol

    def send_window(self, stream_id: int) -> int:
        try:
            return int(self._protocol.flow_control_window(stream_id))
        except h2.exceptions.StreamClosedError:
            raise StreamGone("stream closed") from None

    def send_data(self, stream_id: int, data: bytes) -> None:
        self._protocol.send_data(stream_id, data)
        self.kick()

    def acknowledge(self, stream_id: int, length: int) -> None:
        if self.lost is not None:
            return
        try:
            self._protocol.acknowledge_received_data(stream_id, length)
        except h2.exceptions.ProtocolError:  # stream or connection closed (see reset_stream)
            return
        self.kick()

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._streams.pop(stream_id, None)
        if self.lost is not None:
            return
        try:
            self._protocol.reset_stream(stream_id, error_code)
        except h2.exceptions.ProtocolError:
            # The stream is closed already, or so is the connection: we are sending GOAWAY
            # (closing) and `lost` is not set yet. Either way there is nothing left to reset.
            return
        self.kick()

    def stream_done(self, stream: RpcStream) -> None:
        """Called when our side has ended the stream."""
        stream.ended_local = True
        self._forget_if_finished(stream)

    # -- keepalive ------------------------------------------------------------------------------

    async def _keepalive(self, interval: float, answer_within: float) -> None:
        while True:
            await trio.sleep_until(self._last_received + interval)
            if trio.current_time() < self._last_received + interval:
                continue
            self._ping_acked = trio.Event()
            self._protocol.h2_connection.ping(os.urandom(8))
            self.kick()
            with trio.move_on_after(answer_within):
                await self._ping_acked.wait()
                continue
            self._mark_lost(f"keepalive: no answer to PING within {answer_within:g}s")
            return


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__


def unix_peer(sock: trio.socket.SocketType) -> Peer:
    """Peer of an AF_UNIX socket from SO_PEERCRED (pid, uid, gid of the process that connected)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(address=f"unix:{sock.getsockname() or '@'}", pid=pid, uid=uid, gid=gid)


def tls_peer(peer: Peer, stream: trio.SSLStream[Any]) -> Peer:
    """`peer` with the certificate it presented in the TLS handshake of `stream`."""
    return attrs.evolve(
        peer,
        certificate=stream.getpeercert(),
        certificate_der=stream.getpeercert(binary_form=True),
    )
