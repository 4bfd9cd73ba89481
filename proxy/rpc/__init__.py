"""The project's gRPC layer over purerpc; everything else uses this package, never purerpc's
`Server` or `insecure_channel` directly. See `server.py` and `client.py` for what it fixes."""

from purerpc.grpclib.exceptions import (
    CancelledError,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    RpcFailedError,
    UnavailableError,
    UnimplementedError,
)
from purerpc.grpclib.status import Status, StatusCode

from proxy.rpc.address import Address, AddressError, TcpAddress, UnixAddress, parse_address
from proxy.rpc.backoff import Backoff
from proxy.rpc.client import (
    Channel,
    ChannelState,
    ConnectFailed,
    ReconnectingChannel,
    Reply,
    ResponseStream,
    open_channel,
    server_stream,
    unary_call,
)
from proxy.rpc.connection import Peer
from proxy.rpc.server import CallContext, Server
from proxy.rpc.tls import Tls

__all__ = [
    "Address",
    "AddressError",
    "Backoff",
    "CallContext",
    "CancelledError",
    "Channel",
    "ChannelState",
    "ConnectFailed",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "NotFoundError",
    "Peer",
    "PermissionDeniedError",
    "ReconnectingChannel",
    "Reply",
    "ResponseStream",
    "RpcFailedError",
    "Server",
    "Status",
    "StatusCode",
    "TcpAddress",
    "Tls",
    "UnavailableError",
    "UnimplementedError",
    "UnixAddress",
    "open_channel",
    "parse_address",
    "server_stream",
    "unary_call",
]
