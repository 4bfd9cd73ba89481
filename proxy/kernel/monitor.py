"""Link events from the kernel, read by trio itself from a netlink multicast socket.

Upstream's subscription dies for good on the first socket error (ENOBUFS when events come faster
than they are read, §11.17), after which the proxy never again notices an interface appear or
vanish. Here an overflow reopens the socket and sends a `Resynced` event carrying a fresh dump of
every link, so consumers rebuild their view instead of going deaf.
"""

from __future__ import annotations

import errno
import socket

import attrs
import trio
from loguru import logger

from proxy.kernel.model import Link
from proxy.kernel.netlink import NetlinkWorker, in_netns
from proxy.kernel.rtnl import RTM_DELLINK, RTM_NEWLINK, dump_links, link_from_payload, messages

RTMGRP_LINK = 0x1


@attrs.frozen
class LinkChanged:
    link: Link
    deleted: bool = False


@attrs.frozen
class Resynced:
    """Events were lost; this is every link as of now."""

    links: tuple[Link, ...]


LinkEvent = LinkChanged | Resynced


def open_link_socket(netns: str | None, receive_buffer: int | None = None) -> socket.socket:
    """A non-blocking NETLINK_ROUTE socket subscribed to link events, born in `netns`."""

    def make() -> socket.socket:
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE,
        )
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, RTMGRP_LINK))
        return sock

    return in_netns(netns, make)


class LinkMonitor:
    """Sends `LinkChanged` for every RTM_NEWLINK/RTM_DELLINK, `Resynced` after an overflow."""

    def __init__(
        self,
        worker: NetlinkWorker,
        events: trio.MemorySendChannel[LinkEvent],
        *,
        receive_buffer: int | None = None,
    ) -> None:
        self._worker = worker
        self._events = events
        self._receive_buffer = receive_buffer
        self.resyncs = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        while True:
            raw = open_link_socket(self._worker.netns, self._receive_buffer)
            with trio.socket.from_stdlib_socket(raw) as sock:
                if not started:
                    task_status.started()
                    started = True
                else:
                    # Subscribed again before the dump: nothing can fall between the two.
                    links = tuple(await self._worker.call(lambda _ipr: dump_links()))
                    self.resyncs += 1
                    await self._events.send(Resynced(links))
                try:
                    while True:
                        data = await sock.recv(1 << 16)
                        for kind, payload in messages(data):
                            if kind in (RTM_NEWLINK, RTM_DELLINK):
                                link = link_from_payload(payload)
                                await self._events.send(LinkChanged(link, kind == RTM_DELLINK))
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    logger.warning("link events overflowed; resynchronising from a dump")
