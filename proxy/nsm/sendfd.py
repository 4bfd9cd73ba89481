"""NSM's sendfd, the proxy's side of it (wire-api §2.4, behaviour §9.5): a file that a message
names by a local URL goes with the call as a descriptor, and the message names it by its
`inode://<dev>/<ino>` URL instead, because the peer (nsmgr) can neither see our paths (another
mount namespace) nor trust a process id it reads off the socket (the process may be in another
network namespace than the one it means).

* As a client (the mesh's Requests and Closes): every mechanism's `inodeURL` with the scheme
  `file` (our network namespace, `NETNS_URL`, as the sdk's kernel mechanism client sets it) is
  sent, and the answer's `inode://` URL mapped back to the `file://` one (`send_mechanisms`,
  `restore_mechanism`).
* Registering our endpoint: a `unix://` URL is replaced by its socket file's `inode://` URL and
  the socket file sent (`send_endpoint_url`); nsmgr dials us through the descriptor.
* As an endpoint (our answers to nsmgr): the answer's `file://` inodeURL (our own namespace,
  as the sdk's kernel mechanism server sets it) is sent back likewise (`send_answer`).

Without a descriptor channel (`fds` None: a TCP connection) the URLs go as they are, as grpcfd
leaves them when it cannot pass descriptors. A file that cannot be opened, or a connection that
has closed, is an `FdPassError` with the reason: the call is not made.
"""

from __future__ import annotations

from collections.abc import Iterable

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.rpc import UnavailableError
from proxy.rpc.fdpass import FdPassError, FdTransceiver, FdUrlError

__all__ = [
    "INODE_URL",
    "NETNS_URL",
    "FdPassError",
    "request_mechanisms",
    "restore_mechanism",
    "send_answer",
    "send_endpoint_url",
    "send_mechanisms",
]

INODE_URL = "inodeURL"  # the mechanism parameter naming a network namespace
NETNS_URL = "file:///proc/thread-self/ns/net"  # our own namespace (the sdk kernel mechanism's)


def _send(fds: FdTransceiver, url: str) -> str:
    """Queue the file `url` names; its `inode://` URL (FdPassError with the reason)."""
    try:
        return fds.send_url(url)
    except FdUrlError as exc:
        raise FdPassError(f"cannot pass {url[:80]}: {exc}") from None
    except OSError as exc:
        raise FdPassError(f"cannot pass {url[:80]}: {exc.strerror or exc}") from None


def send_mechanisms(fds: FdTransceiver | None, mechanisms: Iterable[Mechanism]) -> dict[str, str]:
    """For each mechanism whose `inodeURL` is a `file://` URL: queue the file on `fds` and put
    its `inode://` URL in the parameter instead. Returns the map back (inode:// to file://),
    empty when `fds` is None (nothing changed). A URL named twice is sent once."""
    sent: dict[str, str] = {}
    if fds is None:
        return sent
    by_file: dict[str, str] = {}
    for mechanism in mechanisms:
        url = mechanism.parameters.get(INODE_URL, "")
        if not url.startswith("file://"):
            continue
        inode = by_file.get(url)
        if inode is None:
            inode = by_file[url] = _send(fds, url)
            sent[inode] = url
        mechanism.parameters[INODE_URL] = inode
    return sent


def request_mechanisms(request: NetworkServiceRequest) -> list[Mechanism]:
    """The mechanisms of a Request whose namespace URLs go as descriptors (the sdk's sendfd
    client): the preferences and the connection's own (a refresh)."""
    mechanisms = list(request.mechanism_preferences)
    if request.connection.HasField("mechanism"):
        mechanisms.append(request.connection.mechanism)
    return mechanisms


def restore_mechanism(mechanism: Mechanism, sent: dict[str, str]) -> None:
    """The answer's `inodeURL` as we know it: an `inode://` URL we sent back to its `file://`."""
    url = mechanism.parameters.get(INODE_URL, "")
    if url in sent:
        mechanism.parameters[INODE_URL] = sent[url]


def send_answer(fds: FdTransceiver | None, answer: Connection) -> None:
    """An endpoint's side (the sdk's sendfd server): the answer's namespace goes as a
    descriptor, named `inode://` in it; UNAVAILABLE when it cannot, as the call cannot be
    answered meaningfully then. Done last: what the endpoint keeps names it by its path."""
    try:
        send_mechanisms(fds, [answer.mechanism])
    except FdPassError as exc:
        raise UnavailableError(str(exc)) from None


def send_endpoint_url(fds: FdTransceiver | None, url: str) -> str:
    """The URL to register an endpoint at: for a `unix://` URL on a descriptor channel, its
    socket file's `inode://` URL (the socket file queued to go with the call); else `url`."""
    if fds is None or not url.startswith("unix://"):
        return url
    return _send(fds, url)
