"""The VIP watch: the trench's VIPs from NSP, checked at the edge, handed to the router.

Upstream (behaviour reference §1.2 step 15, wire-api §4.5) calls
`ConfigurationManager.WatchVip(Vip{trench{name: NSM_TRENCH}})`; every message is the trench's
FULL VIP list (not a delta; an unchanged list may be repeated), and a stream that ends or fails
is opened again 500 ms later, forever. Here:

* each message becomes the set of valid VIPs (`parse_vips`); the router gets `SetVips` only when
  that set differs from the last one sent (the first message is always sent, even empty: it is
  NSP's word on what the trench holds);
* a bad entry is logged once at WARNING (value and reason) while it stays in the list, and never
  reaches the kernel; the good entries of the same message are applied;
* losing the stream keeps the last VIPs (an outage of NSP is not "no VIPs") and is logged once
  per outage; the watch is opened again with jittered backoff starting at upstream's 500 ms,
  capped by NSM_GRPC_MAX_BACKOFF;
* `run` reports started at once: nothing waits for NSP.

Which VIPs: ALL the trench's, as upstream (behaviour reference §2.3, §11.21). WatchVip filters by
trench only; this conduit's VIPs would have to be derived from other relations (the VIPs of the
flows of the streams of this conduit: a second watch, WatchFlow, joined with this one), with
races between the two streams and a conduit whose flows are edited losing the rule under live
connections, and target egress from a VIP is not tied to a flow at all. A rule for a VIP no target
of this conduit uses never matches, so the upstream behaviour costs nothing here; doing better is
not cheap, so it is not done. (It matters once several conduits of one trench share a process,
issue 238: their rules must then differ by more than the source, e.g. the input bridge.)

What counts as a VIP (`parse_vips`): a CIDR prefix (`198.19.0.1/32`, `2001:db8:ff::/64`) or a
bare address (a /32 or /128), written plainly: no whitespace, scope (`%eth0`) or netmask form.
Rejected, with the reason logged:

* an empty value, or anything that is not an address or prefix;
* a prefix with host bits set (`198.19.0.1/24`): rejected, not normalised, as Meridio's own
  operator rejects it ("not a valid prefix, probably 198.19.0.0/24 should be used"); guessing
  between the network and the address would route traffic nobody asked for;
* a prefix that reaches addresses which never appear as the source of a routed packet, so a
  source rule for them is meaningless or harmful: the default prefix (0.0.0.0/0, ::/0: it would
  send every packet the proxy forwards, including traffic towards its targets, to the load
  balancers), "this network" 0.0.0.0/8 and ::, loopback, link-local (never routed off its link),
  multicast (never a source), the limited broadcast address, and IPv4-mapped IPv6 addresses
  (::ffff:0:0/96, never on the wire: the IPv4 VIP is the one to use).

Duplicates (`198.19.0.1` and `198.19.0.1/32`) are one VIP. Overlapping prefixes are both kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import trio
from loguru import logger

from proxy.api.nsp.v1.configurationmanager_grpc import ConfigurationManagerStub
from proxy.api.nsp.v1.configurationmanager_pb2 import VipResponse
from proxy.api.nsp.v1.model_pb2 import Trench, Vip
from proxy.config import Config
from proxy.kernel.model import IPNetwork
from proxy.kernel.router import RouterEvent, SetVips
from proxy.rpc import Backoff, ReconnectingChannel, RpcFailedError, Tls, server_stream
from proxy.watched import Watched

RETRY_DELAY = 0.5  # upstream's fixed wait before watching again; here the backoff's start
KEEPALIVE_TIMEOUT = 20.0  # grpc-go's default wait for a keepalive PING's answer
_SHOWN_CHARACTERS = 80  # of a rejected value in a log line (NSP could send anything)

_SYNTAX = re.compile(r"(?P<address>[0-9A-Fa-f:.]+)(?:/(?P<length>[0-9]{1,3}))?")

# Prefixes a VIP must not reach (none is ever the source of a routed packet): (network, what it
# is). Checked in order; the first hit is the reason given.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(network), what)
    for network, what in (
        ("0.0.0.0/8", "'this network' 0.0.0.0/8 (unspecified addresses)"),
        ("::/128", "the unspecified address ::"),
        ("127.0.0.0/8", "loopback 127.0.0.0/8"),
        ("::1/128", "loopback ::1"),
        ("169.254.0.0/16", "link-local 169.254.0.0/16"),
        ("fe80::/10", "link-local fe80::/10"),
        ("224.0.0.0/4", "multicast 224.0.0.0/4"),
        ("ff00::/8", "multicast ff00::/8"),
        ("255.255.255.255/32", "the limited broadcast address"),
        ("::ffff:0:0/96", "IPv4-mapped ::ffff:0:0/96 (write the IPv4 VIP)"),
    )
)


class BadVip(ValueError):
    """Why a VIP value is not usable (the message is the reason)."""


def parse_vip(text: str) -> IPNetwork:
    """One VIP value as a network; BadVip with the reason."""
    if not text:
        raise BadVip("empty")
    match = _SYNTAX.fullmatch(text)
    if match is None:
        raise BadVip("not an IP address or CIDR prefix")
    try:
        address = ipaddress.ip_address(match["address"])
    except ValueError:
        raise BadVip("not an IP address or CIDR prefix") from None
    length = address.max_prefixlen if match["length"] is None else int(match["length"])
    if length > address.max_prefixlen:
        raise BadVip(f"prefix length {length} is longer than IPv{address.version} allows")
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    if network.network_address != address:
        raise BadVip(
            f"host bits set: the prefix would be {network}, the address alone "
            f"{address}/{address.max_prefixlen}"
        )
    if length == 0:
        raise BadVip("the default prefix: a source rule for it would catch every packet")
    for special, what in _SPECIAL:
        if special.version == network.version and network.overlaps(special):
            raise BadVip(f"reaches {what}")
    return network


def parse_vips(addresses: Iterable[str]) -> tuple[frozenset[IPNetwork], list[tuple[str, str]]]:
    """The valid VIPs among `addresses`, and each distinct rejected value with its reason (in
    the order first seen). Pure; the rules are in the module docstring."""
    valid: set[IPNetwork] = set()
    rejected: dict[str, str] = {}
    for text in addresses:
        if text in rejected:
            continue
        try:
            valid.add(parse_vip(text))
        except BadVip as exc:
            rejected[text] = str(exc)
    return frozenset(valid), list(rejected.items())


def nsp_channel(config: Config, tls: Tls | None = None) -> ReconnectingChannel:
    """The NSP connection as upstream dials it (step 8): `<service>-<trench>.<namespace>:<port>`,
    backoff capped by NSM_GRPC_MAX_BACKOFF, keepalive every NSM_GRPC_KEEPALIVE_TIME, mutual TLS
    with `tls`."""
    return ReconnectingChannel(
        config.nsp_address,
        name="nsp",
        backoff=Backoff(maximum=config.grpc_max_backoff),
        keepalive=(config.grpc_keepalive_time, KEEPALIVE_TIMEOUT),
        ssl_context=tls,
    )


class VipWatch:
    """Watches the trench's VIPs over `channel` and tells the router; see the module docstring.

    `vips` is the valid set last sent to the router; `rejected` the bad values of the last
    message, with their reasons (both for debugging).
    """

    def __init__(
        self,
        channel: ReconnectingChannel,
        trench: str,
        *,
        max_backoff: float,
        backoff: Backoff | None = None,
    ) -> None:
        self._channel = channel
        self.trench = trench
        self._backoff = backoff or Backoff(
            maximum=max_backoff, initial=min(RETRY_DELAY, max_backoff)
        )
        self._request = Vip(trench=Trench(name=trench))
        self._sent: frozenset[IPNetwork] | None = None  # None: nothing sent yet
        self._reported: set[str] = set()  # bad values already logged, while they stay
        self._lost_at: float | None = None  # start of the current outage
        self._receiving_since: float | None = None  # first message of the current stream
        self.vips: Watched[frozenset[IPNetwork]] = Watched(frozenset())
        self.rejected: dict[str, str] = {}
        self.streams = 0  # WatchVip calls opened so far

    async def run(
        self,
        router_events: trio.MemorySendChannel[RouterEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch, and watch again after a loss, until cancelled."""
        task_status.started()
        log = logger.bind(trench=self.trench, peer=self._channel.name)
        while True:
            self._receiving_since = None
            reason = await self._watch(router_events)
            now = trio.current_time()
            if self._lost_at is None:
                self._lost_at = now
                log.warning(
                    "vip watch down, last VIPs kept", reason=reason, vips=len(self.vips.value)
                )
            since = self._receiving_since
            if since is not None and now - since >= self._backoff.maximum:
                self._backoff.reset()  # it had been working: retry soon, as upstream
            await trio.sleep(self._backoff.next_delay())

    async def _watch(self, router_events: trio.MemorySendChannel[RouterEvent]) -> str:
        """One WatchVip stream, until it ends; why it ended."""
        channel = await self._channel.get()  # no deadline: waiting for NSP is this task's job
        stub = ConfigurationManagerStub(channel)
        try:
            async with server_stream(stub.WatchVip, self._request) as responses:
                self.streams += 1
                async for response in responses:
                    if self._receiving_since is None:
                        self._receiving_since = trio.current_time()
                        self._resumed()
                    await self._apply(response, router_events)
        except RpcFailedError as exc:
            status = exc.status
            return f"{status.status_code.name}: {status.status_message}"
        return "stream ended by NSP"

    def _resumed(self) -> None:
        if self._lost_at is not None:
            logger.info(
                "vip watch resumed",
                trench=self.trench,
                outage=f"{trio.current_time() - self._lost_at:.1f}s",
            )
            self._lost_at = None

    async def _apply(
        self, response: VipResponse, router_events: trio.MemorySendChannel[RouterEvent]
    ) -> None:
        addresses = [vip.address for vip in response.vips]
        valid, rejected = parse_vips(addresses)
        self._report(response, rejected)
        if valid == self._sent:
            return
        previous = self.vips.value
        self._sent = valid
        self.vips.set(valid)
        await router_events.send(SetVips(valid))
        logger.info(
            "vips changed",
            trench=self.trench,
            vips=len(valid),
            added=_sample(valid - previous),
            removed=_sample(previous - valid),
        )

    def _report(self, response: VipResponse, rejected: list[tuple[str, str]]) -> None:
        """Log each bad value once while it stays in the list (gone and back: logged again)."""
        self.rejected = dict(rejected)
        for value, reason in rejected:
            if value in self._reported:
                continue
            names = sorted({vip.name for vip in response.vips if vip.address == value})
            logger.warning(
                "vip rejected",
                trench=self.trench,
                vip=",".join(names),
                address=_shown(value),
                reason=reason,
            )
        self._reported = set(self.rejected)


def _shown(value: str) -> str:
    """A bad value fit for a log line: quoted (whitespace shows), and not too long."""
    if len(value) > _SHOWN_CHARACTERS:
        return repr(value[:_SHOWN_CHARACTERS]) + f"...({len(value)} characters)"
    return repr(value)


def _sample(vips: frozenset[IPNetwork], shown: int = 5) -> str:
    """`198.19.0.1/32,2001:db8::1/128` (the first few, sorted; a count for the rest)."""
    ordered = sorted(vips, key=lambda vip: (vip.version, vip))
    text = ",".join(str(vip) for vip in ordered[:shown])
    return text + (f",+{len(ordered) - shown}" if len(ordered) > shown else "")
