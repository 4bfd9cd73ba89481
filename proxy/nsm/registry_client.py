"""The registry calls of an NSM client, as the sdk's registry client chain makes them (one call
each; when to call is the caller's loop: `registration` for the proxy, the lab LB's own).

Every Register and Unregister carries:

* the token metadata (`nsm-client-token`, `-expires`) signed for the registry (`hoptoken`);
* the `path` metadata (wire-api §2.5, the sdk's `grpcmetadata` client): the path the registry
  answered in its `path` response header the last time for that name, `{"Index":0,
  "PathSegments":null}` the first time. The registry puts our token and its own in it, so a
  refresh goes with the path it made; a registry that answers none (or garbage, logged) leaves
  the stored one as it was, and a failed call drops it (the retry starts afresh);
* for an endpoint on NSM's UNIX socket, its socket file as a descriptor (`sendfd`).

Find sends no path (wire-api §2.5); `discovery` makes its own calls.
"""

from __future__ import annotations

from typing import Any, Literal

from google.protobuf.message import Message
from loguru import logger

from proxy.api.registry import registry_grpc
from proxy.api.registry.registry_pb2 import NetworkService, NetworkServiceEndpoint
from proxy.nsm.hoptoken import Signer, call_metadata
from proxy.nsm.sendfd import FdPassError, send_endpoint_url
from proxy.rpc import Channel, RpcFailedError, unary_call
from proxy.security.tokens import (
    PATH_KEY,
    RegistryPath,
    TokenError,
    parse_registry_path,
    registry_path_json,
)

__all__ = ["FdPassError", "RegistryClient"]

Kind = Literal["service", "endpoint"]


class RegistryClient:
    """Registry calls with tokens, the path each name was last answered, and sendfd.

    `paths`: what the registry answered last, per (kind, name)."""

    def __init__(self, signer: Signer | None) -> None:
        self._signer = signer
        self.paths: dict[tuple[Kind, str], RegistryPath] = {}

    async def register_service(self, channel: Channel, ns: NetworkService) -> NetworkService:
        stub = registry_grpc.NetworkServiceRegistryStub(channel)
        answer: NetworkService = await self._call(stub.Register, ns, channel, "service", ns.name)
        return answer

    async def register_endpoint(
        self, channel: Channel, nse: NetworkServiceEndpoint
    ) -> NetworkServiceEndpoint:
        """Register `nse` (its `url` in the local form: a `unix://` socket goes as a
        descriptor). FdPassError when the socket cannot be passed: nothing is sent."""
        sent = NetworkServiceEndpoint()
        sent.CopyFrom(nse)
        sent.url = send_endpoint_url(channel.fds, nse.url)
        stub = registry_grpc.NetworkServiceEndpointRegistryStub(channel)
        answer: NetworkServiceEndpoint = await self._call(
            stub.Register, sent, channel, "endpoint", nse.name
        )
        return answer

    async def unregister_endpoint(self, channel: Channel, nse: NetworkServiceEndpoint) -> None:
        """Unregister `nse`; its socket goes along when it can (the registry removes by name,
        so a socket that is gone by now does not stop the call)."""
        sent = NetworkServiceEndpoint()
        sent.CopyFrom(nse)
        try:
            sent.url = send_endpoint_url(channel.fds, nse.url)
        except FdPassError as exc:
            logger.debug("unregistering without the socket", name=nse.name, reason=str(exc))
        stub = registry_grpc.NetworkServiceEndpointRegistryStub(channel)
        try:
            await self._call(stub.Unregister, sent, channel, "endpoint", nse.name)
        finally:
            self.paths.pop(("endpoint", nse.name), None)

    async def _call(
        self, method: Any, message: Message, channel: Channel, kind: Kind, name: str
    ) -> Any:
        key = (kind, name)
        path = self.paths.get(key, RegistryPath())
        metadata = (*call_metadata(self._signer, channel), (PATH_KEY, registry_path_json(path)))
        try:
            reply = await unary_call(method, message, metadata=metadata)
        except RpcFailedError:
            # Whatever the registry disliked, the next attempt starts from a first call's path
            # (which any registry takes) rather than repeat one that may be what it refused.
            self.paths.pop(key, None)
            raise
        answered = reply.header(PATH_KEY)
        if answered is not None:  # (none: a registry without grpcmetadata)
            try:
                self.paths[key] = parse_registry_path(answered)
            except TokenError as exc:
                logger.warning("registry answered a path that does not parse; keeping the last one",
                               kind=kind, name=name, reason=str(exc))  # fmt: skip
        return reply.message
