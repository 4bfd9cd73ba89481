"""An NSM client's Request and Close, as the sdk's client chain sends them: the mechanisms'
network namespace as a descriptor (`sendfd`), the client's path segment and the call signed
(`hoptoken`; nothing to sign in plain text). The proxy's LB connections and the lab's targets
both call these; when and how often is theirs to decide."""

from __future__ import annotations

from proxy.api.networkservice.connection_pb2 import Connection
from proxy.api.networkservice.networkservice_grpc import NetworkServiceStub
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.nsm.hoptoken import Signer, sign_request
from proxy.nsm.sendfd import request_mechanisms, restore_mechanism, send_mechanisms
from proxy.rpc import Channel


async def request(
    channel: Channel, message: NetworkServiceRequest, signer: Signer | None
) -> Connection:
    """Send `message` (changed in place: its namespace URLs name descriptors, its segment is
    signed); the answer with our namespace URL as it was. FdPassError when a namespace cannot
    be passed: nothing is sent."""
    sent = send_mechanisms(channel.fds, request_mechanisms(message))
    metadata = sign_request(signer, message.connection, channel)
    answer: Connection = await NetworkServiceStub(channel).Request(message, metadata=metadata)
    restore_mechanism(answer.mechanism, sent)
    return answer


async def close(channel: Channel, connection: Connection, signer: Signer | None) -> None:
    """Close `connection` (a copy goes, with its namespace as a descriptor)."""
    closing = Connection()
    closing.CopyFrom(connection)
    if closing.HasField("mechanism"):
        send_mechanisms(channel.fds, [closing.mechanism])
    await NetworkServiceStub(channel).Close(
        closing, metadata=sign_request(signer, closing, channel)
    )
