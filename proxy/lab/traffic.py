"""Lab traffic, in-process on trio: sockets born in the lab's namespaces, an echo server, many
flows that each remember their 5-tuple, a recorder of which interface each flow arrived on, and
a constant-rate UDP stream with sequence numbers to measure loss.

A socket belongs to the network namespace of the thread that created it, for good: it is created
on a throw-away thread inside the namespace (`proxy.kernel.netlink.in_netns`) and then used from
the trio thread like any other socket. Nothing here forks or runs a program.

* `serve_echo`: UDP and TCP echo on the outside host (one socket of each per address).
* `PathRecorder`: an AF_PACKET socket in the outside host's namespace that notes, for every
  packet arriving on an interface (one per LB), its protocol, source address and source port:
  which LB carried each flow, as seen by the receiver, for UDP and TCP alike.
* `FlowSet`: UDP sockets and TCP connections from one address (a VIP) to the echo server, kept
  open so the same 5-tuples can be exchanged again after a change; `exchange` sends one message
  on every flow and says which were answered.
* `udp_stream`: a sender at a constant rate and a receiver that notes each sequence number and
  the interface it came in on (IP_PKTINFO): loss, the longest gap in milliseconds, path changes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import attrs
import trio

from proxy.kernel.netlink import in_netns

__all__ = [
    "ECHO_PORT",
    "Flow",
    "FlowKey",
    "FlowSet",
    "PathRecorder",
    "Stream",
    "StreamReport",
    "open_sockets",
    "serve_echo",
    "udp_stream",
]

ECHO_PORT = 7007
ETH_P_ALL = 0x0003
PACKET_HOST = 0
SO_RCVBUFFORCE = 33
RECORDER_BUFFER = 32 * 1024 * 1024
ECHO_BUFFER = 8 * 1024 * 1024
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PROTOCOLS = {6: "tcp", 17: "udp"}
_STREAM_HEADER = struct.Struct(">Qd")  # sequence number, send time (monotonic, host-wide)

TrioSocket = trio.socket.SocketType
FlowKey = tuple[str, str, int]  # (protocol "udp"/"tcp", source address, source port)


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


async def open_sockets(
    netns: str | None, family: int, kind: int, count: int = 1
) -> list[TrioSocket]:
    """`count` sockets born in `netns` (None: this thread's namespace), as trio sockets."""

    def make() -> list[socket.socket]:
        return [socket.socket(family, kind) for _ in range(count)]

    made = await trio.to_thread.run_sync(in_netns, netns, make)
    return [trio.socket.from_stdlib_socket(s) for s in made]


# -- the echo server -------------------------------------------------------------------------------


async def serve_echo(
    netns: str | None,
    addresses: list[str],
    port: int = ECHO_PORT,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Echo every UDP datagram and every TCP byte back, on each of `addresses`, until cancelled."""
    async with trio.open_nursery() as nursery:
        for address in addresses:
            family = _family(address)
            [udp] = await open_sockets(netns, family, socket.SOCK_DGRAM)
            [tcp] = await open_sockets(netns, family, socket.SOCK_STREAM)
            udp.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, ECHO_BUFFER)  # bursts of flows
            for sock in (udp, tcp):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind((address, port))
            tcp.listen(1024)
            nursery.start_soon(_echo_udp, udp)
            nursery.start_soon(_echo_tcp, tcp, nursery)
        task_status.started()


async def _echo_udp(sock: TrioSocket) -> None:
    with sock:
        while True:
            data, peer = await sock.recvfrom(65535)
            with contextlib.suppress(OSError):  # no route back right now: the sender sees a loss
                await sock.sendto(data, peer)


async def _echo_tcp(listener: TrioSocket, nursery: trio.Nursery) -> None:
    with listener:
        while True:
            connection, _ = await listener.accept()
            nursery.start_soon(_echo_connection, trio.SocketStream(connection))


async def _echo_connection(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


# -- which interface each flow arrived on --------------------------------------------------------


def parse_flow(packet: bytes) -> tuple[FlowKey, int] | None:
    """(flow key, destination port) of an IPv4/IPv6 TCP or UDP packet; None for anything else."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        header = (packet[0] & 0x0F) * 4
        protocol, source = packet[9], str(ipaddress.IPv4Address(packet[12:16]))
    elif version == 6 and len(packet) >= 40:
        header, protocol = 40, packet[6]  # extension headers: none in the lab's traffic
        source = str(ipaddress.IPv6Address(packet[8:24]))
    else:
        return None
    name = _PROTOCOLS.get(protocol)
    if name is None or len(packet) < header + 4:
        return None
    sport, dport = struct.unpack_from(">HH", packet, header)
    return (name, source, sport), dport


class PathRecorder:
    """Which interface the packets of each flow arrived on, in one namespace (the outside host's,
    with one interface per LB), for packets to `port`."""

    def __init__(self, netns: str | None, port: int = ECHO_PORT) -> None:
        self.netns = netns
        self.port = port
        self.seen: dict[FlowKey, Counter[str]] = {}
        self.packets: Counter[str] = Counter()  # per interface

    def reset(self) -> None:
        self.seen = {}
        self.packets = Counter()

    def path(self, key: FlowKey) -> str | None:
        """The interface most of the flow's packets came in on (None: none seen)."""
        counts = self.seen.get(key)
        return counts.most_common(1)[0][0] if counts else None

    def paths(self, key: FlowKey) -> set[str]:
        return set(self.seen.get(key, ()))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECORDER_BUFFER)
            return sock

        raw = await trio.to_thread.run_sync(in_netns, self.netns, make)
        with trio.socket.from_stdlib_socket(raw) as sock:
            task_status.started()
            while True:
                packet, address = await sock.recvfrom(65535)
                ifname, _, packet_type = address[0], address[1], address[2]
                if packet_type != PACKET_HOST:
                    continue
                parsed = parse_flow(packet)
                if parsed is None or parsed[1] != self.port:
                    continue
                key = parsed[0]
                self.seen.setdefault(key, Counter())[ifname] += 1
                self.packets[ifname] += 1


# -- flows ---------------------------------------------------------------------------------------


@attrs.define
class Flow:
    protocol: str  # udp, tcp
    source: str
    sport: int
    sock: TrioSocket
    stream: trio.SocketStream | None = None  # TCP

    @property
    def key(self) -> FlowKey:
        return (self.protocol, self.source, self.sport)


@attrs.frozen
class Answer:
    ok: bool
    tries: int  # UDP: datagrams sent; TCP: 1


class FlowSet:
    """UDP sockets and TCP connections from `source` (in `netns`) to `destination:port`, each
    with its own source port, kept open between exchanges."""

    def __init__(self, netns: str | None, source: str, destination: str, port: int) -> None:
        self.netns = netns
        self.source = source
        self.destination = destination
        self.port = port
        self.flows: list[Flow] = []
        self._sequence = 0

    async def open(self, udp: int, tcp: int, *, connect_timeout: float = 5.0) -> None:
        family = _family(self.source)
        for sock in await open_sockets(self.netns, family, socket.SOCK_DGRAM, udp):
            await sock.bind((self.source, 0))
            await sock.connect((self.destination, self.port))
            self.flows.append(Flow("udp", self.source, sock.getsockname()[1], sock))
        tcp_socks = await open_sockets(self.netns, family, socket.SOCK_STREAM, tcp)
        for sock in tcp_socks:
            await sock.bind((self.source, 0))
            self.flows.append(Flow("tcp", self.source, sock.getsockname()[1], sock))
        limiter = trio.CapacityLimiter(64)

        async def connect(flow: Flow) -> None:
            async with limiter:
                with trio.fail_after(connect_timeout):
                    await flow.sock.connect((self.destination, self.port))
                flow.stream = trio.SocketStream(flow.sock)

        async with trio.open_nursery() as nursery:
            for flow in self.flows:
                if flow.protocol == "tcp":
                    nursery.start_soon(connect, flow)

    async def exchange(self, wait: float = 1.0, tries: int = 3) -> dict[FlowKey, Answer]:
        """One message on every flow, answered by the echo; per flow whether it came back (UDP
        is sent again up to `tries` times, `wait` apart; TCP waits `wait * tries`)."""
        self._sequence += 1
        answers: dict[FlowKey, Answer] = {}
        limiter = trio.CapacityLimiter(64)

        async def one(flow: Flow) -> None:
            message = f"{flow.sport}:{self._sequence}\n".encode()
            async with limiter:
                answers[flow.key] = await _exchange(flow, message, wait, tries)

        async with trio.open_nursery() as nursery:
            for flow in self.flows:
                nursery.start_soon(one, flow)
        return answers

    def aclose_sync(self) -> None:
        for flow in self.flows:
            flow.sock.close()
        self.flows = []


async def _exchange(flow: Flow, message: bytes, wait: float, tries: int) -> Answer:
    if flow.stream is not None:
        try:
            with trio.move_on_after(wait * tries):
                await flow.stream.send_all(message)
                received = b""
                while not received.endswith(b"\n"):
                    chunk = await flow.stream.receive_some(4096)
                    if not chunk:
                        return Answer(False, 1)
                    received += chunk
                return Answer(received == message, 1)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return Answer(False, 1)
        return Answer(False, 1)
    for attempt in range(1, tries + 1):
        try:
            await flow.sock.send(message)
            with trio.move_on_after(wait):
                while True:
                    if await flow.sock.recv(65535) == message:
                        return Answer(True, attempt)
        except OSError:  # e.g. ECONNREFUSED from an earlier ICMP error
            await trio.sleep(wait)
    return Answer(False, tries)


# -- constant-rate UDP stream ----------------------------------------------------------------------


@attrs.frozen
class StreamReport:
    rate: float  # packets per second asked for
    sent: int
    received: int
    lost: int
    duplicates: int
    longest_gap_ms: float  # the longest run of lost packets, in send time
    lost_ms: float  # lost packets converted to time at the stream's rate
    paths: tuple[tuple[int, str], ...]  # (first sequence number, interface) at each path change

    @property
    def interfaces(self) -> set[str]:
        return {interface for _, interface in self.paths}


class Stream:
    """A running stream: `sent` and what the receiver saw so far; `report()` when done."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.sent: list[float] = []  # send time by sequence number
        self.arrivals: dict[int, str] = {}  # sequence number -> interface
        self.duplicates = 0
        self.index_names: dict[int, str] = {}

    @property
    def received(self) -> int:
        return len(self.arrivals)

    def report(self) -> StreamReport:
        sent = len(self.sent)
        lost = [n for n in range(sent) if n not in self.arrivals]
        runs: list[list[int]] = []  # [first, last] of each run of lost sequence numbers
        for n in lost:
            if runs and runs[-1][1] == n - 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        interval_ms = 1000 / self.rate
        longest = max(
            ((self.sent[last] - self.sent[first]) * 1000 + interval_ms for first, last in runs),
            default=0.0,
        )
        paths: list[tuple[int, str]] = []
        for n in sorted(self.arrivals):
            if not paths or paths[-1][1] != self.arrivals[n]:
                paths.append((n, self.arrivals[n]))
        return StreamReport(
            rate=self.rate,
            sent=sent,
            received=len(self.arrivals),
            lost=len(lost),
            duplicates=self.duplicates,
            longest_gap_ms=longest,
            lost_ms=len(lost) * 1000 / self.rate,
            paths=tuple(paths),
        )


@asynccontextmanager
async def udp_stream(
    *,
    source_netns: str | None,
    source: str,
    destination_netns: str | None,
    destination: str,
    port: int,
    rate: float = 500.0,
    interface_names: Callable[[], dict[int, str]] | None = None,
    drain: float = 0.5,
) -> AsyncIterator[Stream]:
    """Send sequence-numbered datagrams from `source` to `destination:port` at `rate` per second
    while the body runs; the receiver notes each arrival and the interface it came in on
    (`interface_names()` maps the receiver namespace's ifindexes to names). After the body, the
    sender stops and the receiver waits `drain` seconds for stragglers."""
    stream = Stream(rate)
    family = _family(destination)
    [receiver] = await open_sockets(destination_netns, family, socket.SOCK_DGRAM)
    [sender] = await open_sockets(source_netns, family, socket.SOCK_DGRAM)
    with receiver, sender:
        if family == socket.AF_INET:
            receiver.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        else:
            receiver.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        receiver.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 * 1024 * 1024)
        await receiver.bind((destination, port))
        await sender.bind((source, 0))
        await sender.connect((destination, port))
        names = interface_names or dict
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_receive_stream, receiver, stream, names)
            async with trio.open_nursery() as sending:
                sending.start_soon(_send_stream, sender, stream)
                yield stream
                sending.cancel_scope.cancel()
            await trio.sleep(drain)
            nursery.cancel_scope.cancel()


async def _send_stream(sock: TrioSocket, stream: Stream) -> None:
    interval = 1.0 / stream.rate
    due = trio.current_time()
    while True:
        sequence = len(stream.sent)
        now = time.monotonic()
        stream.sent.append(now)
        with contextlib.suppress(OSError):  # no route for a moment: a loss, counted as such
            await sock.send(_STREAM_HEADER.pack(sequence, now))
        due += interval
        await trio.sleep_until(due)


async def _receive_stream(
    sock: TrioSocket, stream: Stream, interface_names: Callable[[], dict[int, str]]
) -> None:
    names: dict[int, str] = {}
    while True:
        data, ancillary, _, _ = await sock.recvmsg(256, 256)
        if len(data) < _STREAM_HEADER.size:
            continue
        sequence, _ = _STREAM_HEADER.unpack_from(data)
        index = 0
        for level, kind, value in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                index = struct.unpack_from("I", value)[0]
            elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
                index = struct.unpack_from("I", value, 16)[0]
        if index not in names:
            names = interface_names()
        if sequence in stream.arrivals:
            stream.duplicates += 1
            continue
        stream.arrivals[sequence] = names.get(index, str(index))
