"""Where the proxy's identity comes from, kept current in a `Watched[Identity | None]`:

* **the SPIFFE Workload API** (`follow_workload_api`): the SPIRE agent's socket
  (SPIFFE_ENDPOINT_SOCKET), a FetchX509SVID stream that sends the SVID and bundles at once and
  again at every rotation; on our trio/purerpc layer, not the grpcio-and-threads `spiffe`
  package. Lost, it is dialed again with backoff while the last identity stays in use (an SVID
  lives for an hour by default; a restarting agent must not cut every connection).
* **files** (`follow_files`): a certificate chain, its key and a bundle, all PEM, for
  deployments without SPIRE (e.g. cert-manager); read again when they change, the last good
  set kept (and the problem logged once) while a rotation is half written.

Both start (`nursery.start`) once the first identity is in: as upstream, nothing that needs an
identity may start without one. Until then they log every WAIT_LOG seconds why not.
Consumers follow the Watched value: new connections use the new identity, established ones
keep theirs.
"""

from __future__ import annotations

import hashlib
from functools import partial
from pathlib import Path

import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from loguru import logger

from proxy.api.workload.workload_grpc import SpiffeWorkloadAPIStub
from proxy.api.workload.workload_pb2 import X509SVIDRequest
from proxy.config import Config, IdentitySource
from proxy.rpc import Backoff, ConnectFailed, RpcFailedError, open_channel, server_stream
from proxy.rpc.status import describe_status
from proxy.security.spiffe import (
    Bundle,
    Identity,
    IdentityError,
    Svid,
    certificate_spiffe_id,
    identity_from_response,
)
from proxy.security.tls import Authorizer, SpiffeTls
from proxy.watched import Watched

__all__ = [
    "DEFAULT_WORKLOAD_API",
    "WORKLOAD_HEADER",
    "follow_files",
    "follow_workload_api",
    "read_files",
    "start_identity",
]

DEFAULT_WORKLOAD_API = "unix:///run/spire/sockets/agent.sock"  # upstream's deployments
WORKLOAD_HEADER = ("workload.spiffe.io", "true")  # required by every Workload API server
WAIT_LOG = 10.0  # seconds between "still waiting" lines


def _log_identity(new: Identity, old: Identity | None, source: str) -> None:
    if old is None:
        logger.info("identity", source=source, identity=new.describe())
    elif new.svid != old.svid:
        logger.info("identity rotated", source=source, identity=new.describe())
    else:
        logger.info("trust bundles changed", source=source, trusted=", ".join(sorted(new.bundles)))


async def follow_workload_api(
    address: str,
    identity: Watched[Identity | None],
    *,
    max_backoff: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `identity` set from the Workload API at `address` until cancelled. One WARNING
    when it becomes unavailable (with the reason), one INFO when it is back; while there is
    no identity yet, a WARNING every WAIT_LOG seconds."""
    backoff = Backoff(max_backoff)
    started = False
    down = False  # an outage was reported and has not ended
    bad_svid: str | None = None  # the last unusable SVID reported
    waiting_since = trio.current_time()
    last_wait_log = waiting_since
    while True:
        try:
            async with open_channel(address) as channel:
                stub = SpiffeWorkloadAPIStub(channel)
                request = X509SVIDRequest()
                async with server_stream(
                    stub.FetchX509SVID, request, metadata=(WORKLOAD_HEADER,)
                ) as responses:
                    async for response in responses:
                        if down:
                            logger.info("Workload API available again", address=address)
                            down = False
                        backoff.reset()
                        try:
                            new = identity_from_response(response)
                        except IdentityError as exc:
                            if str(exc) != bad_svid:
                                logger.error("Workload API sent an unusable SVID", reason=str(exc))
                            bad_svid = str(exc)
                            continue
                        bad_svid = None
                        _log_identity(new, identity.value, "workload-api")
                        identity.set(new)
                        if not started:
                            started = True
                            task_status.started()
            reason = "the Workload API ended its stream"
        except ConnectFailed as exc:
            reason = str(exc)
        except RpcFailedError as exc:
            reason = describe_status(exc)
        if not down:
            kept = {"keeping": str(identity.value.spiffe_id)} if identity.value else {}
            logger.warning("Workload API unavailable", address=address, reason=reason, **kept)
            down = True
        now = trio.current_time()
        if not started and now - last_wait_log >= WAIT_LOG:
            waited = f"{now - waiting_since:.0f}s"
            logger.warning("still no identity", address=address, waited=waited, reason=reason)
            last_wait_log = now
        await trio.sleep(backoff.next_delay())


# -- files -----------------------------------------------------------------------------------------


def _pem_certificates(data: bytes, what: str) -> tuple[x509.Certificate, ...]:
    try:
        certificates = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise IdentityError(f"{what}: {exc}") from None
    if not certificates:
        raise IdentityError(f"{what}: no certificate")
    return certificates


def read_files(certificate: Path, key: Path, bundle: Path) -> Identity:
    """An Identity from PEM files: the SVID chain (leaf first), its private key (PKCS#8 or
    SEC1), and the bundle of CA certificates. Every CA in the bundle is trusted for the trust
    domain of the SVID; a CA certificate that names another trust domain in a URI SAN (as
    SPIRE's do) makes a federated bundle of that domain."""
    try:
        chain_pem, key_pem, bundle_pem = (p.read_bytes() for p in (certificate, key, bundle))
    except OSError as exc:
        raise IdentityError(f"{exc.filename}: {exc.strerror}") from None
    chain = _pem_certificates(chain_pem, str(certificate))
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"{key}: {exc}") from None
    svid = Svid.checked(chain, private_key)
    own = svid.spiffe_id.trust_domain
    by_domain: dict[str, list[x509.Certificate]] = {}
    for authority in _pem_certificates(bundle_pem, str(bundle)):
        try:
            domain = certificate_spiffe_id(authority).trust_domain
        except IdentityError:
            domain = own
        by_domain.setdefault(domain, []).append(authority)
    if own not in by_domain:
        raise IdentityError(f"{bundle}: no CA certificate for the SVID's trust domain {own}")
    return Identity(svid, {d: Bundle(d, tuple(cas)) for d, cas in by_domain.items()})


def _fingerprint(paths: tuple[Path, ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            digest.update(f"{exc.errno}".encode())
        digest.update(b"\0")
    return digest.hexdigest()


async def follow_files(
    certificate: Path,
    key: Path,
    bundle: Path,
    identity: Watched[Identity | None],
    *,
    interval: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep `identity` set from the files, read again whenever their content changes (checked
    every `interval` seconds), until cancelled."""
    paths = (certificate, key, bundle)
    seen: str | None = None
    problem: str | None = None
    started = False
    while True:
        fingerprint = await trio.to_thread.run_sync(_fingerprint, paths)
        if fingerprint != seen:
            seen = fingerprint
            try:
                new = await trio.to_thread.run_sync(read_files, *paths)
            except IdentityError as exc:
                if str(exc) != problem:
                    kept = ", the last good ones kept" if started else ""
                    logger.error("identity files unusable" + kept, reason=str(exc))
                problem = str(exc)
            else:
                problem = None
                if new != identity.value:
                    _log_identity(new, identity.value, "files")
                    identity.set(new)
                if not started:
                    started = True
                    task_status.started()
        await trio.sleep(interval)


# -- from the configuration ------------------------------------------------------------------------


async def start_identity(config: Config, nursery: trio.Nursery) -> SpiffeTls | None:
    """The identity source NSM_IDENTITY names, started in `nursery` (returns once the first
    identity is in), and the mutual-TLS settings that follow it; None for plain text."""
    if config.identity is IdentitySource.INSECURE:
        logger.warning(
            "PLAIN TEXT: NSM_IDENTITY=insecure: no peer is authenticated and nothing is"
            " encrypted; for labs and tests only"
        )
        return None
    identity: Watched[Identity | None] = Watched(None)
    if config.identity is IdentitySource.SPIFFE:
        address = config.spiffe_endpoint_socket
        logger.info("waiting for the first SVID", source="workload-api", address=address)
        follow = partial(
            follow_workload_api, address, identity, max_backoff=config.grpc_max_backoff
        )
    else:
        cert, key, bundle = (
            Path(config.tls_cert_file),
            Path(config.tls_key_file),
            Path(config.tls_bundle_file),
        )
        logger.info("reading the identity", source="files", files=f"{cert}, {key}, {bundle}")
        follow = partial(follow_files, cert, key, bundle, identity)
    await nursery.start(follow)
    listed = config.authorized_ids
    tls = SpiffeTls(identity, Authorizer.parse(listed.split(",")) if listed else None)
    logger.info("mutual TLS", authorized=tls.authorizer().describe())
    return tls
