"""NSM's sendfd on the proxy's side (proxy/nsm/sendfd.py) and recvfd's bookkeeping in the lab's
nsmgr (proxy/lab/nsm/recvfd.py): which URLs go as descriptors, what the message says instead,
what is mapped back, and which descriptors are held, replaced and closed.

Real descriptors of files in a tmp directory; nothing crosses a socket here (that is in
tests/integration/test_fdpass.py and test_lab_nsm_fds.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
import trio

from proxy.api.networkservice.connection_pb2 import Connection, Mechanism
from proxy.api.networkservice.networkservice_pb2 import NetworkServiceRequest
from proxy.lab.nsm.recvfd import Handoff, Netns, fd_path
from proxy.nsm.sendfd import (
    NETNS_URL,
    FdPassError,
    request_mechanisms,
    restore_mechanism,
    send_endpoint_url,
    send_mechanisms,
)
from proxy.rpc import UnavailableError
from proxy.rpc.fdpass import FdNotReceived, FdTransceiver, inode_url_of_path

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def fds() -> Iterator[FdTransceiver]:
    transceiver = FdTransceiver()
    try:
        yield transceiver
    finally:
        transceiver._close()  # what the connection does when it closes


def kernel(url: str = "") -> Mechanism:
    return Mechanism(cls="LOCAL", type="KERNEL", parameters={"inodeURL": url} if url else {})


# -- sendfd ----------------------------------------------------------------------------------------


def test_file_urls_go_as_descriptors_and_come_back(fds: FdTransceiver, tmp_path: Path) -> None:
    other = tmp_path / "netns"
    other.touch()
    request = NetworkServiceRequest(
        connection=Connection(mechanism=kernel(NETNS_URL)),
        mechanism_preferences=[kernel(NETNS_URL), kernel(f"file://{other}"), kernel()],
    )
    sent = send_mechanisms(fds, request_mechanisms(request))
    own = inode_url_of_path("/proc/thread-self/ns/net")
    assert sent == {own: NETNS_URL, inode_url_of_path(str(other)): f"file://{other}"}
    assert fds.pending == 2  # our namespace once, though two mechanisms name it
    assert [m.parameters.get("inodeURL") for m in request.mechanism_preferences] == [
        own,
        inode_url_of_path(str(other)),
        None,
    ]
    assert request.connection.mechanism.parameters["inodeURL"] == own

    answer = kernel(own)
    restore_mechanism(answer, sent)
    assert answer.parameters["inodeURL"] == NETNS_URL
    foreign = kernel("inode://1/2")  # not one we sent: left as it is
    restore_mechanism(foreign, sent)
    assert foreign.parameters["inodeURL"] == "inode://1/2"


def test_a_first_request_has_no_connection_mechanism_to_send() -> None:
    request = NetworkServiceRequest(mechanism_preferences=[kernel(NETNS_URL)])
    assert len(request_mechanisms(request)) == 1
    assert not request.connection.HasField("mechanism")


def test_without_a_descriptor_channel_nothing_changes() -> None:
    mechanism = kernel(NETNS_URL)
    assert send_mechanisms(None, [mechanism]) == {}
    assert mechanism.parameters["inodeURL"] == NETNS_URL
    assert send_endpoint_url(None, "unix:///tmp/x/listen.on") == "unix:///tmp/x/listen.on"


def test_endpoint_urls(fds: FdTransceiver, tmp_path: Path) -> None:
    socket_file = tmp_path / "listen.on"
    socket_file.touch()
    assert send_endpoint_url(fds, f"unix://{socket_file}") == inode_url_of_path(str(socket_file))
    assert send_endpoint_url(fds, "tcp://198.18.0.1:5000") == "tcp://198.18.0.1:5000"
    assert fds.pending == 1


def test_what_cannot_be_passed_says_why(fds: FdTransceiver, tmp_path: Path) -> None:
    with pytest.raises(FdPassError, match="No such file"):
        send_endpoint_url(fds, f"unix://{tmp_path}/gone.sock")
    with pytest.raises(FdPassError, match="local path"):
        send_mechanisms(fds, [kernel("file://host/run/netns/x")])
    fds._close()
    with pytest.raises(FdPassError, match="closed"):
        send_mechanisms(fds, [kernel(NETNS_URL)])
    assert fds.pending == 0


# -- recvfd ----------------------------------------------------------------------------------------


class Arrived:
    """Stands for a connection's transceiver: the files that 'arrived', by inode URL."""

    def __init__(self, *paths: Path) -> None:
        self.paths = {inode_url_of_path(str(path)): path for path in paths}
        self.given: list[int] = []

    async def receive_fd(self, url: str) -> int:
        await trio.lowlevel.checkpoint()
        if url not in self.paths:
            raise FdNotReceived(f"connection closed before {url}")
        fd = os.open(self.paths[url], os.O_PATH | os.O_CLOEXEC)
        self.given.append(fd)
        return fd


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_namespaces_held_replaced_on_commit_and_closed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.touch()
    b.touch()
    arrived = Arrived(a, b)
    fds = cast(FdTransceiver, arrived)
    url_a, url_b = inode_url_of_path(str(a)), inode_url_of_path(str(b))
    netns = Netns()

    first = await netns.path("client", fds, url_a)
    assert first == fd_path(arrived.given[0]) and first.startswith(f"/proc/{os.getpid()}/fd/")
    netns.commit()
    assert await netns.path("client", fds, url_a) == first  # the same one again: held
    assert len(arrived.given) == 1

    moved = await netns.path("client", fds, url_b)  # another namespace: staged
    assert moved != first and netns.count == 2
    netns.rollback()  # the attempt failed: the old one stays
    assert not is_open(arrived.given[1]) and is_open(arrived.given[0])

    await netns.path("client", fds, url_b)
    netns.commit()  # the pair moved: the old one goes
    assert not is_open(arrived.given[0]) and is_open(arrived.given[2]) and netns.count == 1

    netns.forget("client")  # named by a path now
    netns.commit()
    assert not is_open(arrived.given[2]) and netns.count == 0

    await netns.path("endpoint", fds, url_a)
    netns.commit()
    await netns.path("client", fds, url_b)
    netns.close()
    assert netns.count == 0 and not any(is_open(fd) for fd in arrived.given)


async def test_a_descriptor_that_does_not_come_is_unavailable(tmp_path: Path) -> None:
    netns = Netns()
    with pytest.raises(UnavailableError, match="the client's network namespace"):
        await netns.path("client", cast(FdTransceiver, Arrived()), "inode://1/2")
    assert netns.count == 0


def test_a_handoff_is_owned_by_whoever_comes_first(tmp_path: Path) -> None:
    (tmp_path / "s").touch()
    taken = Handoff(os.open(tmp_path / "s", os.O_PATH))
    fd = taken.take()
    assert fd is not None
    taken.drop()  # the receiver's finally: nothing, the owner has it
    assert is_open(fd)
    os.close(fd)

    dropped = Handoff(os.open(tmp_path / "s", os.O_PATH))
    dropped.drop()  # the receiver gave up first
    assert dropped.take() is None
