"""Server side: serve purerpc servicers on a UNIX socket path or an explicit host:port.

What purerpc's own `Server`/`ConnectionHandler` get wrong and this does instead
(`field-notes.md` part A §1, §3):

* UNIX sockets work (no TCP options on them); a stale socket file is replaced, a live one or a
  non-socket file is not; the mode is set; the file is removed on exit (only if still ours).
* TCP binds exactly the host:port given (SO_REUSEADDR, never SO_REUSEPORT: a second instance
  gets EADDRINUSE instead of silently sharing the port).
* The client's grpc-timeout is enforced: the handler is cancelled and the client gets
  DEADLINE_EXCEEDED. The deadline is the handler's trio deadline, so calls it makes downstream
  carry what is left of it.
* RST_STREAM from the client, or the connection dropping, cancels the handler (no leaked
  streams); leaving a server stream early runs the generator's `finally`.
* A handler that raises RpcFailedError sends that status; any other exception is logged once with
  its traceback and the client gets UNKNOWN with the exception's type and message, never the
  traceback. No bare `except`: cancellation always propagates.
* A request message that does not parse gets INTERNAL with protobuf's reason (the code grpc-go
  and grpcio send: the gRPC status-code table lists "error parsing request proto" as INTERNAL),
  and is logged once without a traceback: the handler never saw it, so nobody else can.
* Sockets are closed explicitly; a TLS handshake failure is logged once, without a traceback.
* On a UNIX socket a handler passes file descriptors with its calls, as NSM's grpcfd does
  (`fdpass`, under TLS too): `fd = await context.fds.receive_fd(url)` for one the request names,
  `url = context.fds.send_path(path)` for one to name in the response.
* A handler answers header metadata with `context.set_header(key, value)` (grpc-go's
  `SetHeader`; purerpc has no way to).

Only unary and server-streaming methods are served (all that NSM, IPAM, NSP and health use).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import stat
from collections.abc import Iterable
from functools import partial
from typing import Any

import attrs
import trio
from loguru import logger
from purerpc.grpclib.events import MessageReceived, RequestEnded, RequestReceived
from purerpc.grpclib.exceptions import RpcFailedError
from purerpc.grpclib.status import Status, StatusCode
from purerpc.rpc import Cardinality

from proxy.rpc.connection import Connection, Peer, RpcStream, StreamGone, tls_peer, unix_peer
from proxy.rpc.fdpass import FdStream, FdTransceiver
from proxy.rpc.tls import Tls, as_tls

TLS_HANDSHAKE_TIMEOUT = 10.0
_MESSAGE_LIMIT = 200  # characters of an exception message echoed to the client


@attrs.define
class ResponseHeaders:
    """Custom metadata a handler sends with its response headers (grpc-go's `SetHeader`)."""

    items: list[tuple[str, str | bytes]] = attrs.Factory(list)
    sent: bool = False

    def add(self, key: str, value: str | bytes) -> None:
        if self.sent:
            raise RuntimeError(f"header {key!r} set after the response headers went out")
        # What purerpc would refuse only when sending: refused here, at the handler's line.
        if isinstance(value, bytes) != key.endswith("-bin"):
            raise ValueError(f"header {key!r}: bytes values go with '-bin' keys, and only they")
        if key.startswith("grpc-") or key != key.lower():
            raise ValueError(f"header {key!r}: custom keys are lower case, without 'grpc-'")
        self.items.append((key, value))


@attrs.frozen
class CallContext:
    """What a handler may know about its call: passed as the `request` argument of servicer
    methods that declare one (`async def Check(self, message, request)`)."""

    service_name: str
    method_name: str
    custom_metadata: tuple[tuple[str, str | bytes], ...]
    peer: Peer
    deadline: float  # trio time; inf when the client set none
    # The connection's file descriptors (`fdpass`): None unless it came over a UNIX socket.
    fds: FdTransceiver | None = None
    response_headers: ResponseHeaders = attrs.field(factory=ResponseHeaders, eq=False)

    def metadata(self, key: str) -> str | bytes | None:
        """The first value of a metadata key, or None."""
        return next((value for name, value in self.custom_metadata if name == key), None)

    def set_header(self, key: str, value: str | bytes) -> None:
        """Answer `key: value` in the response headers (before the first response message; on
        an error status too). NSM's registry answers its `path` this way."""
        self.response_headers.add(key, value)


@attrs.frozen
class _Method:
    function: Any
    request_type: Any
    server_streaming: bool


class Server:
    """Dispatches calls to purerpc servicers (the generated `...Servicer` subclasses)."""

    def __init__(self, servicers: Iterable[Any]) -> None:
        self._methods: dict[str, _Method] = {}
        for servicer in servicers:
            service = servicer.service  # purerpc builds a new Service on each access
            for name, bound in service.methods.items():
                cardinality = bound.signature.cardinality
                if cardinality not in (Cardinality.UNARY_UNARY, Cardinality.UNARY_STREAM):
                    raise ValueError(f"{service.name}/{name}: client streaming is not supported")
                self._methods[f"/{service.name}/{name}"] = _Method(
                    bound.method_fn,
                    bound.signature.request_type,
                    cardinality == Cardinality.UNARY_STREAM,
                )

    # -- listeners ------------------------------------------------------------------------------

    async def serve_unix(
        self,
        path: str,
        *,
        mode: int = 0o660,
        ssl_context: ssl.SSLContext | Tls | None = None,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on a UNIX socket at `path` until cancelled; the socket file is removed after."""
        sock = bind_unix(path, mode)
        inode = os.stat(path).st_ino
        try:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            logger.debug("serving", address=f"unix://{path}")
            task_status.started(path)
            handler = partial(self._serve_connection, tls=as_tls(ssl_context), unix=True)
            await trio.serve_listeners(handler, [listener])
        finally:
            sock.close()
            _remove_socket_file(path, inode)

    async def serve_tcp(
        self,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | Tls | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on exactly host:port (None: every address; port 0 picks one, reported by
        `nursery.start`)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            bound = listeners[0].socket.getsockname()[1]
            logger.debug("serving", address=f"{host}:{bound}")
            task_status.started(bound)
            handler = partial(self._serve_connection, tls=as_tls(ssl_context), unix=False)
            await trio.serve_listeners(handler, listeners)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    # -- connections ----------------------------------------------------------------------------

    async def _serve_connection(
        self, stream: trio.SocketStream, *, tls: Tls | None, unix: bool
    ) -> None:
        peer = unix_peer(stream.socket) if unix else _tcp_peer(stream.socket)
        transport: trio.abc.Stream = FdStream(stream.socket) if unix else stream
        if tls is not None:
            secured = trio.SSLStream(transport, tls.context(), server_side=True)
            with trio.move_on_after(TLS_HANDSHAKE_TIMEOUT) as handshake:
                try:
                    await secured.do_handshake()
                except trio.BrokenResourceError as exc:
                    logger.warning("TLS handshake refused", peer=peer.address, reason=exc.__cause__)
                    await trio.aclose_forcefully(secured)
                    return
            if handshake.cancelled_caught:
                logger.warning("TLS handshake timed out", peer=peer.address)
                await trio.aclose_forcefully(secured)
                return
            peer = tls_peer(peer, secured)
            refused = tls.refusal(peer)
            if refused is not None:
                logger.warning("TLS peer refused", peer=peer.address, reason=refused)
                await trio.aclose_forcefully(secured)
                return
            transport = secured
        connection = Connection(transport, client_side=False, peer=peer)
        await connection.run(self._handle_call)

    async def _handle_call(self, stream: RpcStream, request: RequestReceived) -> None:
        path = f"/{request.service_name}/{request.method_name}"
        method = self._methods.get(path)
        if method is None:
            _finish(stream, Status(StatusCode.UNIMPLEMENTED, f"unknown method {path}"), None)
            return
        deadline = float("inf")
        if request.timeout is not None:
            deadline = trio.current_time() + request.timeout.total_seconds()
        context = CallContext(
            service_name=request.service_name,
            method_name=request.method_name,
            custom_metadata=tuple(request.custom_metadata),
            peer=stream.connection.peer,
            deadline=deadline,
            fds=stream.connection.fds,
        )
        status = Status(StatusCode.OK)
        with trio.CancelScope(deadline=deadline) as scope:
            stream.cancel_scope = scope
            if stream.finished:  # reset before we got here
                return
            try:
                message = await _receive_request(stream, method.request_type, context)
                if method.server_streaming:
                    replies = method.function(message, request=context)
                    await _stream_responses(stream, replies, context.response_headers)
                else:
                    reply = await method.function(message, request=context)
                    await _send(stream, reply, context.response_headers)
            except StreamGone:
                return
            except RpcFailedError as exc:
                status = exc.status
            except Exception as exc:
                logger.opt(exception=exc).error(
                    "handler failed", method=path, peer=context.peer.address
                )
                text = f"{type(exc).__name__}: {exc}"[:_MESSAGE_LIMIT]
                status = Status(StatusCode.UNKNOWN, text)
        if scope.cancelled_caught:
            if stream.finished or stream.connection.lost is not None:
                return  # the client reset the call or went away: nobody to answer
            status = Status(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        _finish(stream, status, context.response_headers)


async def _receive_request(stream: RpcStream, request_type: Any, context: CallContext) -> Any:
    """The single request message of a unary-request call."""
    message = None
    while True:
        event = await stream.next_event()
        if isinstance(event, MessageReceived):
            if message is not None:
                raise RpcFailedError(Status(StatusCode.INTERNAL, "more than one request message"))
            message = request_type()
            try:
                message.ParseFromString(event.data)
            except Exception as exc:
                text = f"could not parse {request_type.__name__}: {exc}"[:_MESSAGE_LIMIT]
                logger.warning(
                    "request refused",
                    method=f"/{context.service_name}/{context.method_name}",
                    peer=context.peer.address,
                    peer_pid=context.peer.pid or "-",
                    size=len(event.data),
                    reason=text,
                )
                raise RpcFailedError(Status(StatusCode.INTERNAL, text)) from None
        elif isinstance(event, RequestEnded):
            if message is None:
                raise RpcFailedError(Status(StatusCode.INTERNAL, "no request message"))
            return message


async def _stream_responses(stream: RpcStream, responses: Any, headers: ResponseHeaders) -> None:
    try:
        async for reply in responses:
            await _send(stream, reply, headers)
    finally:
        await responses.aclose()


async def _send(stream: RpcStream, reply: Any, headers: ResponseHeaders) -> None:
    _start_response(stream, headers)
    await stream.send_message(reply.SerializeToString())


def _start_response(stream: RpcStream, headers: ResponseHeaders) -> None:
    if not stream.response_started:
        stream.connection.protocol.start_response(stream.stream_id, "+proto", headers.items)
        stream.response_started = headers.sent = True


def _finish(stream: RpcStream, status: Status, headers: ResponseHeaders | None) -> None:
    """End the call with `status` (trailers), synchronously."""
    connection = stream.connection
    if stream.finished or connection.lost is not None:
        return
    if headers is not None and headers.items:
        # Header metadata stays header metadata (as grpc-go sends it), not merged into a
        # trailers-only answer.
        _start_response(stream, headers)
    if stream.response_started:
        connection.protocol.end_response(stream.stream_id, status)
    else:
        connection.protocol.respond_status(stream.stream_id, status, "+proto")
    connection.kick()
    connection.stream_done(stream)


# -- socket files ---------------------------------------------------------------------------------


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening AF_UNIX socket at `path`, replacing a stale socket file (and only that)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        if _socket_is_live(path):
            raise OSError(errno.EADDRINUSE, f"{path}: another server is listening there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _socket_is_live(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True  # a listener with a full backlog is still a listener
    finally:
        probe.close()
    return True


def _remove_socket_file(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _tcp_peer(sock: trio.socket.SocketType) -> Peer:
    host, port = sock.getpeername()[:2]
    return Peer(address=f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
