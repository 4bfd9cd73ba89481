"""`meridio-proxy lab spire`: a SPIFFE Workload API server with its own CA (a SPIRE agent
stand-in). Each socket stands for one workload and gives it its SPIFFE ID (SPIRE would attest
the caller; the lab gives each workload its own socket instead). SVIDs are issued short-lived
and rotated: every `rotate` seconds every workload gets a new SVID on its open FetchX509SVID
streams, as SPIRE rotates at half the SVID's life.

As SPIRE's agent: a call without the `workload.spiffe.io: true` metadata is refused with
INVALID_ARGUMENT; the first response comes at once, the next ones on rotation; X509SVIDResponse
carries the SVID chain (DER), its PKCS#8 key, and the trust domain's bundle (DER).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Mapping

import attrs
import trio
from cryptography.hazmat.primitives import serialization
from loguru import logger

from proxy.api.workload.workload_grpc import SpiffeWorkloadAPIServicer
from proxy.api.workload.workload_pb2 import (
    X509SVID,
    X509BundlesRequest,
    X509BundlesResponse,
    X509SVIDRequest,
    X509SVIDResponse,
)
from proxy.lab.spiffe_ca import LabCa
from proxy.rpc import CallContext, InvalidArgumentError, Server
from proxy.security.identity import WORKLOAD_HEADER
from proxy.security.spiffe import Svid
from proxy.watched import Watched

__all__ = ["Issuer", "WorkloadApiServicer", "serve_workload_api", "svid_message"]


def svid_message(svid: Svid, bundle_der: bytes) -> X509SVID:
    der = serialization.Encoding.DER
    return X509SVID(
        spiffe_id=str(svid.spiffe_id),
        x509_svid=b"".join(c.public_bytes(der) for c in svid.chain),
        x509_svid_key=svid.key.private_bytes(
            der, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        bundle=bundle_der,
        hint=svid.hint,
    )


@attrs.define
class Issuer:
    """The current SVID of every workload path; `rotate()` issues them all anew."""

    ca: LabCa
    paths: tuple[str, ...]
    lifetime: datetime.timedelta
    current: Watched[Mapping[str, Svid]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.current = Watched(self._issue())

    def _issue(self) -> Mapping[str, Svid]:
        return {path: self.ca.issue(path, lifetime=self.lifetime) for path in self.paths}

    def rotate(self) -> None:
        self.current.set(self._issue())

    async def rotate_every(self, seconds: float) -> None:
        while True:
            await trio.sleep(seconds)
            self.rotate()
            logger.info("SVIDs rotated", workloads=len(self.paths))


class WorkloadApiServicer(SpiffeWorkloadAPIServicer):
    """The Workload API of one workload (one SPIFFE ID path)."""

    def __init__(self, issuer: Issuer, path: str) -> None:
        self._issuer = issuer
        self._path = path

    @staticmethod
    def _check_header(request: CallContext) -> None:
        if request.metadata(WORKLOAD_HEADER[0]) != WORKLOAD_HEADER[1]:
            raise InvalidArgumentError("security header missing from request")

    def _response(self, svids: Mapping[str, Svid]) -> X509SVIDResponse:
        bundle = self._issuer.ca.bundle.der()
        return X509SVIDResponse(svids=[svid_message(svids[self._path], bundle)])

    # The generated base declares coroutines; server-streaming methods are async generators.
    async def FetchX509SVID(  # type: ignore[override]
        self, message: X509SVIDRequest, request: CallContext
    ) -> AsyncIterator[X509SVIDResponse]:
        self._check_header(request)
        svids = self._issuer.current.value
        yield self._response(svids)
        while True:
            svids = await self._issuer.current.wait_change(svids)
            yield self._response(svids)

    async def FetchX509Bundles(  # type: ignore[override]
        self, message: X509BundlesRequest, request: CallContext
    ) -> AsyncIterator[X509BundlesResponse]:
        self._check_header(request)
        ca = self._issuer.ca
        yield X509BundlesResponse(bundles={f"spiffe://{ca.trust_domain}": ca.bundle.der()})
        await trio.sleep_forever()


async def serve_workload_api(
    issuer: Issuer,
    sockets: Mapping[str, str],
    *,
    rotate: float | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Workload API of each workload path on its socket (`sockets`: socket path ->
    workload path), rotating every `rotate` seconds, until cancelled."""
    async with trio.open_nursery() as nursery:
        for socket_path, path in sockets.items():
            server = Server([WorkloadApiServicer(issuer, path)])
            await nursery.start(server.serve_unix, socket_path)
            logger.info(
                "Workload API serving",
                socket=socket_path,
                spiffe_id=f"spiffe://{issuer.ca.trust_domain}{path}",
            )
        if rotate is not None:
            nursery.start_soon(issuer.rotate_every, rotate)
        task_status.started()
