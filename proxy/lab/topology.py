"""The lab topology: the real proxy process with every peer it needs, in network namespaces.

    out (outside host) --lb0----outside-- lb0 --nsm-..--+
       198.18.200.1    --lb1----outside-- lb1 --nsm-..--+-- bridge0 (proxy) --+-- nsm0 tg0
       2001:db8:200::1                                                        +-- nsm0 tg1
    ipam, nsp, nsm (with the kernel forwarder): processes on UNIX sockets in the work directory

* **proxy**: `meridio-proxy` started as a container starts it: NSM_* environment only (and
  PATH), in its own namespace (`ip netns exec`). Its health socket is `health.sock` in the work
  directory.
* **lbN**: `meridio-proxy lab lb`, each in its namespace, with an `outside` veth to the outside
  host (its own /32 and /128 there: 198.18.200.(10+N), 2001:db8:200::(10+N)). It routes the
  outside-bound traffic (default routes) to the outside host, and each target's VIPs to that
  target's node-subnet address, which is only known once the target has connected: so the
  targets connect first and the LBs start with those routes (`--route`), which the LB keeps.
* **tgN**: `meridio-proxy lab target`, each in its namespace, with its own VIPs (198.19.0.(N+1)/32
  and 2001:db8:ff::(N+1)/128), which the topology also lists in the NSP configuration file. A
  target names its namespace in its request (`--netns`), so NSM can remove its interface even
  after the target died.
* **out**: the outside host: one veth per LB (`lbN`), the host addresses 198.18.200.1 and
  2001:db8:200::1 on each (and on lo), and the VIP ranges routed back over the LBs that are
  *advertised* (a multipath route; an LB is advertised once it routes every VIP, and an LB
  stopped or deleted by the topology is withdrawn, as a router drops one whose BGP session
  goes). Because each LB has its own link here, the outside host sees which LB carried each
  packet. Only the outside host and the LBs route the way back: the proxy handles egress.
* **peers**: `lab ipam` (SQLite in the work directory), `lab nsp` (the configuration file the
  topology writes), `lab nsm` (registry, manager and kernel forwarder).

Everything is recorded in the state file before it is made (`proxy.lab.state`), so `down` (or
`meridio-proxy lab down` after the lab itself crashed) takes exactly that away.

The API is async (trio): the failure scenarios run a traffic stream while they break something
and wait for the proxy to react, all under deadlines; trio's nursery and cancel scopes give
that, and the proxy's own stack is trio. The CLI wraps it in `trio.run`.

    async with Topology.running(TopologySpec(name="t1")) as topo:
        print(topo.netns("proxy"), await topo.health())
        async with topo.udp_stream(target=0, version=4, rate=500) as stream:
            await topo.stop_lb(1)
        print(stream.report())
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from proxy.kernel.netlink import in_netns
from proxy.kernel.sysctl import write_proc
from proxy.lab import traffic
from proxy.lab.state import (
    NAME_PATTERN,
    LabState,
    LbRecord,
    ProcessRecord,
    StateError,
    TargetRecord,
    default_state_dir,
    netns_exists,
    process_alive,
    process_state,
    reclaim,
    start_time,
)

__all__ = [
    "HEALTH_SERVICES",
    "OUTSIDE_HOST",
    "PEERS",
    "VIP_RANGES",
    "FlowChoice",
    "Topology",
    "TopologyError",
    "TopologySpec",
    "describe_age",
    "ip",
    "ip_batch",
    "ip_json",
    "lb_outside_address",
    "target_vips",
]

TRENCH, CONDUIT, NAMESPACE, NODE = "trench-a", "conduit-a", "red", "node-1"
LB_SERVICE = f"{CONDUIT}.{TRENCH}.{NAMESPACE}"
PROXY_SERVICE = f"proxy.{LB_SERVICE}"
IPAM_PREFIXES = {4: "198.18.0.0/17", 6: "2001:db8:100::/48"}  # clear of the outside's addresses
OUTSIDE_HOST = {4: "198.18.200.1", 6: "2001:db8:200::1"}
VIP_RANGES = {4: "198.19.0.0/16", 6: "2001:db8:ff::/64"}
HOST_LENGTH = {4: 32, 6: 128}
DEFAULT_ROUTE = {4: "0.0.0.0/0", 6: "::/0"}
OUTSIDE_IFNAME = "outside"  # the LB's end of its outside link
TARGET_IFNAME = "nsm0"
PROXY_TABLE = 4096  # NSM_ROUTING_TABLE's default: the proxy's VIP rules point there
PEERS = ("ipam", "nsp", "nsm")
TRUST_DOMAIN = "lab.meridio"
# The SPIFFE ID path of each kind of workload, each with a Workload API socket of its own (all
# LBs share one identity, as pods of one service account do).
WORKLOADS = {
    "ipam": "/ipam",
    "nsp": "/nsp",
    "nsm": "/nsmgr",
    "proxy": "/proxy",
    "lb": "/load-balancer",
    "target": "/target",
}
HEALTH_SERVICES = ("Readiness", "Liveness", "IPAMCli", "NSPCli", "NSMEndpoint", "Egress")
FAMILY_NAMES = {(4,): "ipv4", (6,): "ipv6", (4, 6): "dualstack"}
OUTSIDE_SYSCTLS = (
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    ("net.ipv4.fib_multipath_hash_policy", "1"),
    ("net.ipv6.fib_multipath_hash_policy", "1"),
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
)
STOP_TIMEOUT = 15.0
POLL = 0.1
LOG_TAIL = 2000
T = TypeVar("T")


class TopologyError(Exception):
    """The lab could not be made, changed or taken down; the message says what and why."""


def _families(value: Any) -> tuple[int, ...]:
    families = tuple(sorted({int(v) for v in value}))
    if families not in FAMILY_NAMES:
        raise ValueError(f"families must be (4,), (6,) or (4, 6), not {value!r}")
    return families


def _check_name(_: Any, __: Any, value: str) -> None:
    if not NAME_PATTERN.match(value):
        raise ValueError(
            f"lab name {value!r}: 1-20 characters, lower-case letters, digits and '-'"
            " (it is part of the namespace names)"
        )


def _check_count(_: Any, attribute: Any, value: int) -> None:
    if not 1 <= value <= 200:
        raise ValueError(f"{attribute.name} must be from 1 to 200, not {value}")


@attrs.frozen
class TopologySpec:
    name: str = attrs.field(default="lab", validator=_check_name)
    lbs: int = attrs.field(default=2, validator=_check_count)
    targets: int = attrs.field(default=2, validator=_check_count)
    families: tuple[int, ...] = attrs.field(default=(4, 6), converter=_families)
    state_dir: Path | None = None  # None: $MERIDIO_PROXY_LAB_DIR or /run/meridio-proxy-lab
    proxy_env: Mapping[str, str] = attrs.field(factory=dict)  # NSM_* over the lab's own
    # The LBs' registration lifetime: how long a frozen LB stays registered, at most.
    lb_lifetime: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    # Mutual TLS everywhere with SVIDs from the lab's Workload API (`lab spire`); False: the
    # quick mode, plain text (the proxy with NSM_IDENTITY=insecure).
    secure: bool = True
    svid_rotate: float | None = None  # how often `lab spire` issues new SVIDs (None: 30 min)
    # The NSM manager's connection lifetime: how long a client that died without closing
    # keeps its connection (and the proxy its port and addresses), at most.
    nsm_lifetime: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))  # all of `up`

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lbs": self.lbs,
            "targets": self.targets,
            "families": list(self.families),
            "proxy_env": dict(self.proxy_env),
            "lb_lifetime": self.lb_lifetime,
            "nsm_lifetime": self.nsm_lifetime,
            "secure": self.secure,
            "svid_rotate": self.svid_rotate,
            "timeout": self.timeout,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], state_dir: Path | None) -> TopologySpec:
        return cls(
            name=data["name"],
            lbs=data["lbs"],
            targets=data["targets"],
            families=tuple(data["families"]),
            state_dir=state_dir,
            proxy_env=dict(data.get("proxy_env", {})),
            lb_lifetime=data.get("lb_lifetime", 60.0),
            nsm_lifetime=data.get("nsm_lifetime", 60.0),
            secure=data.get("secure", False),
            svid_rotate=data.get("svid_rotate"),
            timeout=data.get("timeout", 60.0),
        )


def lb_outside_address(index: int, version: int) -> str:
    return str(ipaddress.ip_address(OUTSIDE_HOST[version]) + 9 + index)


def target_vips(index: int, families: tuple[int, ...]) -> list[str]:
    """The VIPs of target `index`: one /32 and one /128 (of the families in use)."""
    found = []
    for version in families:
        base = ipaddress.ip_network(VIP_RANGES[version]).network_address
        found.append(f"{base + index + 1}/{HOST_LENGTH[version]}")
    return found


def _no_dad() -> None:
    """No duplicate address detection in this namespace, for the interfaces made later too: an
    LB forwarding a packet solicits its next hop from its link-local address, and while that is
    tentative (DAD: a second or two after the forwarder made the interface) the first packets of
    every new neighbour wait a whole retransmit timer (1 s)."""
    for name in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
        write_proc(name, "0")


def _version(address: str) -> int:
    return 6 if ":" in address else 4


def _tail(path: str | Path, size: int = LOG_TAIL) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return ""
    return data[-size:].decode(errors="replace")


async def _command(
    argv: list[str], *, check: bool = True, stdin: bytes | None = None, within: float = 30.0
) -> subprocess.CompletedProcess[bytes]:
    result: subprocess.CompletedProcess[bytes] | None = None
    with trio.move_on_after(within):
        result = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    if result is None:
        raise TopologyError(f"{' '.join(argv)}: did not finish within {within:g}s")
    if check and result.returncode != 0:
        raise TopologyError(
            f"{' '.join(argv)}: {result.stderr.decode(errors='replace').strip()}"
            f" (status {result.returncode})"
        )
    return result


async def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run `ip [-n netns] args...`; its output."""
    result = await _command(["ip", *(["-n", netns] if netns else []), *args], check=check)
    return result.stdout.decode()


async def ip_batch(
    lines: list[str], netns: str | None = None, *, force: bool = False, json_output: bool = False
) -> str:
    """`ip -batch -` with `lines`; `force`: go on after a failing line (and do not fail)."""
    argv = ["ip", *(["-n", netns] if netns else []), *(["-force"] if force else [])]
    argv += [*(["-j"] if json_output else []), "-batch", "-"]
    result = await _command(argv, stdin=("\n".join(lines) + "\n").encode(), check=not force)
    return result.stdout.decode()


async def ip_json(*args: str, netns: str | None = None) -> Any:
    text = await ip("-j", *args, netns=netns)
    return json.loads(text) if text.strip() else []


def _json_values(text: str) -> list[Any]:
    """The JSON documents of `ip -j -batch` output, one after the other."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while position < len(text):
        if text[position].isspace():
            position += 1
            continue
        value, position = decoder.raw_decode(text, position)
        values.append(value)
    return values


@attrs.frozen
class FlowChoice:
    """A flow as the proxy's kernel would route it (`ip route get ... iif bridge0`)."""

    protocol: str
    source: str
    sport: int
    lb: str | None  # the LB whose address is the chosen gateway; None: no route


class Topology:
    """A lab that is up (or being made). Make one with `await Topology.up(spec)` or
    `async with Topology.running(spec)`; attach to one made elsewhere with `Topology.load`."""

    def __init__(self, spec: TopologySpec, state: LabState) -> None:
        self.spec = spec
        self.state = state
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._step = "start"
        self._proxy_log_offset = 0  # where the running proxy's part of its log starts

    # -- making and taking down -----------------------------------------------------------------

    @classmethod
    async def up(
        cls, spec: TopologySpec, *, progress: Callable[[str], None] | None = None
    ) -> Topology:
        """Make the whole lab and wait until it works: the proxy's Readiness SERVING, every LB
        in its nexthop groups, every VIP rule installed, every target addressed, every LB's
        routes in place. On failure (or cancellation) everything made is taken down again and
        TopologyError says what did not come up, with the end of the relevant log."""
        state_dir = spec.state_dir or default_state_dir()
        state = LabState(name=spec.name, state_dir=str(state_dir), spec=spec.to_json())
        if state.file.exists():
            raise TopologyError(
                f"a lab named {spec.name!r} exists already ({state.file}); take it down with"
                f" `meridio-proxy lab down --name {spec.name}` or choose another --name"
            )
        os.makedirs(state_dir, exist_ok=True)
        if state.directory.exists():
            shutil.rmtree(state.directory)  # a work directory without a state file: leftovers
        state.directory.mkdir()
        topology = cls(spec, state)
        state.save()
        try:
            with trio.fail_after(spec.timeout):
                await topology._build(progress or (lambda _: None))
        except BaseException as exc:
            problems = await topology._reclaim()
            state.phase = "failed"
            note = topology._cleanup_note(problems)
            if isinstance(exc, trio.TooSlowError):
                raise TopologyError(
                    f"the lab did not come up within {spec.timeout:g}s (at: {topology._step})"
                    + note
                ) from None
            if isinstance(exc, TopologyError):
                raise TopologyError(str(exc) + note) from None
            raise
        return topology

    @classmethod
    @asynccontextmanager
    async def running(
        cls, spec: TopologySpec, *, progress: Callable[[str], None] | None = None
    ) -> AsyncIterator[Topology]:
        """The lab for the body of an `async with`, taken down after it whatever happens."""
        topology = await cls.up(spec, progress=progress)
        try:
            yield topology
        finally:
            await topology.down()

    @classmethod
    def load(cls, name: str, state_dir: Path | None = None) -> Topology:
        """The lab `name` as its state file records it (made by another process, maybe dead)."""
        state = LabState.load(name, state_dir)
        try:
            spec = TopologySpec.from_json(state.spec, state_dir)
        except (KeyError, ValueError, TypeError) as exc:
            raise StateError(f"{state.file}: bad spec: {exc}") from None
        return cls(spec, state)

    async def down(self) -> None:
        """Take down everything the state file records (processes, namespaces, files, the state
        file itself). Idempotent. TopologyError if something would not go."""
        problems = await self._reclaim()
        if problems:
            raise TopologyError("could not take everything down:\n  " + "\n  ".join(problems))

    async def _reclaim(self) -> list[str]:
        with trio.CancelScope(shield=True):
            problems = await trio.to_thread.run_sync(reclaim, self.state)
            for popen in self._children.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=0.1)
            self._children.clear()
        return problems

    def _cleanup_note(self, problems: list[str]) -> str:
        if not problems:
            return "\n(what was made has been taken down)"
        return "\nand taking down what was made left:\n  " + "\n  ".join(problems)

    async def _build(self, progress: Callable[[str], None]) -> None:
        spec = self.spec
        started = trio.current_time()

        def step(text: str) -> None:
            self._step = text
            progress(f"[{trio.current_time() - started:5.1f}s] {text}")

        step("namespaces")
        for role in ["out", "proxy"]:
            await self._add_netns(role)
        for index in range(spec.lbs):
            self.state.lbs[index] = self._lb_record(index)
            await self._add_netns(f"lb{index}")
        for index in range(spec.targets):
            self.state.targets[index] = TargetRecord(
                index, f"tg{index}", None, target_vips(index, spec.families)
            )
            await self._add_netns(f"tg{index}")
            self.state.targets[index].netns = self.netns(f"tg{index}")
        self.state.save()
        await self._prepare_outside()
        if spec.secure:
            step("identities: the lab's Workload API (spire)")
            self._spawn("spire", self._spire_argv())
            for workload in WORKLOADS:
                await self._wait_socket(f"spire-{workload}")
        step("peers: ipam, nsp, nsm")
        self._write_nsp_config()
        for peer in PEERS:
            self._spawn(peer, self._peer_argv(peer))
        for peer in PEERS:
            await self._wait_socket(peer)
        for index in self.state.lbs:
            await self._link_outside(index)
        step("proxy")
        self._start_proxy()
        step("targets")
        for index in self.state.targets:
            self._start_target(index)
        for index in self.state.targets:
            await self._wait_target_addresses(index)
        step("load-balancers")
        for index in self.state.lbs:
            self._start_lb(index)
        step("waiting for the proxy: Readiness, nexthops, VIP rules, LB routes")
        left = spec.timeout - (trio.current_time() - started)
        await self.wait_ready(within=max(1.0, left - 0.5))  # its own error says what is missing
        await self._note_proxy_socket_dir()
        for lb in self.state.lbs.values():
            lb.advertised = True  # only now: an LB without its VIP routes would loop replies
        await self._sync_outside()
        step("waiting for the proxy to settle (its LBs connected)")
        await self.wait_settled()
        await self._note_proxy_socket_dir()
        self.state.phase = "up"
        self.state.save()
        step("up")

    # -- names -----------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def directory(self) -> Path:
        return self.state.directory

    @property
    def families(self) -> tuple[int, ...]:
        return self.spec.families

    @property
    def proxy_name(self) -> str:
        return f"proxy-{self.name}"

    def netns(self, role: str) -> str:
        """The namespace of a role: "proxy", "out", "lb<i>", "tg<i>"."""
        try:
            return self.state.namespaces[role]
        except KeyError:
            raise TopologyError(f"the lab {self.name!r} has no namespace for {role!r}") from None

    def socket_path(self, name: str) -> Path:
        return self.directory / f"{name}.sock"

    def address(self, name: str) -> str:
        """The gRPC address of a peer ("ipam", "nsp", "nsm"), an LB ("lb0") or "health"."""
        return f"unix://{self.socket_path(name)}"

    @property
    def lbs(self) -> dict[int, LbRecord]:
        return self.state.lbs

    @property
    def targets(self) -> dict[int, TargetRecord]:
        return self.state.targets

    def process(self, role: str) -> ProcessRecord | None:
        return self.state.processes.get(role)

    def is_running(self, role: str) -> bool:
        """The role's process runs (a frozen one counts as running)."""
        record = self.state.processes.get(role)
        if record is None:
            return False
        popen = self._children.get(role)
        if popen is not None and popen.poll() is not None:
            return False
        return process_alive(record)

    def log(self, role: str) -> str:
        return _tail(self.directory / f"{role}.log", 1 << 20)

    # -- namespaces and the outside ---------------------------------------------------------------

    async def _add_netns(self, role: str) -> None:
        name = f"mp-{self.name}-{role}"
        if netns_exists(name):
            raise TopologyError(
                f"network namespace {name} exists already (another lab, or a leftover:"
                f" `ip netns del {name}` if it is one)"
            )
        self.state.namespaces[role] = name
        self.state.save()  # recorded before it exists
        await ip("netns", "add", name)
        await ip("link", "set", "lo", "up", netns=name)
        if role != "proxy":  # the proxy sets its own (and the tests check that it does)
            await trio.to_thread.run_sync(in_netns, name, _no_dad)

    async def _remove_netns(self, role: str) -> None:
        name = self.state.namespaces.get(role)
        if name is None:
            return
        if netns_exists(name):
            await ip("netns", "del", name)
        del self.state.namespaces[role]
        self.state.save()

    async def _prepare_outside(self) -> None:
        out = self.netns("out")

        def settings() -> None:
            for name, value in OUTSIDE_SYSCTLS:
                write_proc(name, value)

        await trio.to_thread.run_sync(in_netns, out, settings)
        lines = []
        for version in self.families:
            host = f"{OUTSIDE_HOST[version]}/{HOST_LENGTH[version]}"
            lines.append(f"address add {host} dev lo" + (" nodad" if version == 6 else ""))
        await ip_batch(lines, out)

    def _lb_record(self, index: int) -> LbRecord:
        return LbRecord(
            index=index,
            name=f"lb{index}",
            netns=f"mp-{self.name}-lb{index}",
            outside={v: lb_outside_address(index, v) for v in self.families},
        )

    async def _link_outside(self, index: int) -> None:
        """The veth between the outside host (`lb<i>`) and LB i (`outside`), addressed and routed
        both ways (host routes: each end knows the other's address is on the link)."""
        out, lb = self.netns("out"), self.netns(f"lb{index}")
        record = self.state.lbs[index]
        device = f"lb{index}"
        await ip(
            "link", "add", device, "type", "veth", "peer", "name", OUTSIDE_IFNAME, "netns", lb,
            netns=out,
        )  # fmt: skip
        lb_lines = [f"link set {OUTSIDE_IFNAME} up"]
        out_lines = [f"link set {device} up"]
        for version in self.families:
            nodad = " nodad" if version == 6 else ""
            length = HOST_LENGTH[version]
            host, own = OUTSIDE_HOST[version], record.outside[version]
            lb_lines += [
                f"address add {own}/{length} dev {OUTSIDE_IFNAME}{nodad}",
                f"route replace {host}/{length} dev {OUTSIDE_IFNAME}",
            ]
            out_lines += [
                f"address add {host}/{length} dev {device}{nodad}",
                f"route replace {own}/{length} dev {device}",
            ]
        await ip_batch(lb_lines, lb)
        await ip_batch(out_lines, out)

    async def _sync_outside(self) -> None:
        """The outside host routes the VIP ranges over the advertised LBs (one multipath route
        per family, replaced on every change), or not at all when none is.

        A plain multipath route, not nexthop objects: after a nexthop group is replaced or
        deleted, IPv6 TCP sockets that cached a route through it (the echo server's
        connections) keep a dead route (seen here: path MTU 68 and nothing sent), while a
        replaced route invalidates what sockets cached."""
        out = self.netns("out")
        members = [lb for lb in self.state.lbs.values() if lb.advertised and lb.netns is not None]
        for version in self.families:
            hops = " ".join(f"nexthop via {lb.outside[version]} dev lb{lb.index}" for lb in members)
            if members:
                await ip_batch([f"route replace {VIP_RANGES[version]} {hops}"], out)
            else:
                await ip_batch([f"route del {VIP_RANGES[version]}"], out, force=True)
        self.state.save()

    # -- processes -------------------------------------------------------------------------------

    def _spawn(self, role: str, argv: list[str], netns: str | None = None, **env: str) -> None:
        log = self.directory / f"{role}.log"
        inside = ["ip", "netns", "exec", netns] if netns else []
        with open(log, "ab") as output:
            popen = subprocess.Popen(
                [*inside, *argv],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env},
                start_new_session=True,  # outlives `lab up`; a Ctrl-C at the terminal spares it
            )
        self._children[role] = popen
        self.state.processes[role] = ProcessRecord(
            popen.pid, start_time(popen.pid) or 0, [*inside, *argv], str(log), netns
        )
        self.state.save()

    async def _stop(
        self, role: str, how: int = signal.SIGTERM, within: float = STOP_TIMEOUT
    ) -> None:
        """Signal a role's process and wait until it is gone (SIGKILL after `within`)."""
        record = self.state.processes.get(role)
        if record is None:
            return
        if self.is_running(role):
            os.kill(record.pid, how)
            if how not in (signal.SIGKILL, signal.SIGSTOP):
                os.kill(record.pid, signal.SIGCONT)  # a frozen process must see it
        deadline = trio.current_time() + within
        while self.is_running(role):
            if trio.current_time() > deadline:
                os.kill(record.pid, signal.SIGKILL)
                deadline = trio.current_time() + within
            await trio.sleep(0.02)
        popen = self._children.pop(role, None)
        if popen is not None:
            popen.wait()
        del self.state.processes[role]
        self.state.save()

    @staticmethod
    def _lab_argv(command: str, *args: str) -> list[str]:
        return [sys.executable, "-m", "proxy", "lab", command, *args]

    def _spire_argv(self) -> list[str]:
        sockets = [
            a
            for workload, path in WORKLOADS.items()
            for a in ("--socket", f"{self.socket_path(f'spire-{workload}')}={path}")
        ]
        rotate = ["--rotate", f"{self.spec.svid_rotate:g}s"] if self.spec.svid_rotate else []
        return self._lab_argv("spire", "--trust-domain", TRUST_DOMAIN, *sockets, *rotate)

    def _identity_args(self, workload: str) -> list[str]:
        """`--spiffe-socket` of a lab workload, in the secure mode."""
        if not self.spec.secure:
            return []
        return ["--spiffe-socket", self.address(f"spire-{workload}")]

    def _peer_argv(self, peer: str) -> list[str]:
        return [*self._peer_command(peer), *self._identity_args(peer)]

    def _peer_command(self, peer: str) -> list[str]:
        listen = ["--listen", self.address(peer)]
        if peer == "ipam":
            prefixes = [a for v in self.families for a in ("--prefix", IPAM_PREFIXES[v])]
            db = ["--db", str(self.directory / "ipam.db")]
            return self._lab_argv("ipam", *listen, *db, *prefixes, "--trench", TRENCH)
        if peer == "nsp":
            config = str(self.directory / "nsp.json")
            return self._lab_argv("nsp", *listen, "--config", config)
        return self._lab_argv("nsm", *listen, "--lifetime", f"{self.spec.nsm_lifetime:g}s")

    def _write_nsp_config(self) -> None:
        vips = [
            {"name": f"{target.name}-v{_version(vip)}", "address": vip, "trench": TRENCH}
            for target in self.state.targets.values()
            for vip in target.vips
        ]
        config = {
            "trench": {"name": TRENCH},
            "conduits": [{"name": CONDUIT, "trench": TRENCH}],
            "vips": vips,
        }
        path = self.directory / "nsp.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(temporary, path)  # the NSP never sees half a file

    def proxy_environment(self) -> dict[str, str]:
        """What the proxy's container would get."""
        return {
            "NSM_NAME": self.proxy_name,
            "NSM_HOST": NODE,
            **(
                {"NSM_IDENTITY": "spiffe", "SPIFFE_ENDPOINT_SOCKET": self.address("spire-proxy")}
                if self.spec.secure
                else {"NSM_IDENTITY": "insecure"}  # the quick mode: plain text everywhere
            ),
            "NSM_TRENCH": TRENCH,
            "NSM_CONDUIT": CONDUIT,
            "NSM_NAMESPACE": NAMESPACE,
            "NSM_SERVICE_NAME": PROXY_SERVICE,
            "NSM_NETWORK_SERVICE_NAME": LB_SERVICE,
            "NSM_IP_FAMILY": FAMILY_NAMES[self.families],
            "NSM_CONNECT_TO": self.address("nsm"),
            "NSM_IPAM_SERVICE": self.address("ipam"),
            "NSM_NSP_SERVICE": self.address("nsp"),
            "NSM_HEALTH_ADDRESS": self.address("health"),
            "NSM_STATE_DIR": str(self.directory),
            "NSM_REQUEST_TIMEOUT": "5s",
            "NSM_IP_RELEASE_DELAY": "1s",
            "NSM_MAX_TOKEN_LIFETIME": "1m",
            "NSM_SHUTDOWN_TIMEOUT": "5s",
            "NSM_LOG_FORMAT": "text",
            **self.spec.proxy_env,
        }

    def _start_proxy(self) -> None:
        log = self._log_path("proxy")
        self._proxy_log_offset = log.stat().st_size if log.exists() else 0
        self._spawn(
            "proxy",
            [sys.executable, "-m", "proxy"],
            self.netns("proxy"),
            **self.proxy_environment(),
        )

    def _start_target(self, index: int) -> None:
        target = self.state.targets[index]
        vips = [a for vip in target.vips for a in ("--vip", vip)]
        argv = self._lab_argv(
            "target", "--nsm", self.address("nsm"), "--name", target.name, "--node", NODE,
            "--service", PROXY_SERVICE, "--interface", TARGET_IFNAME, *vips,
            "--netns", self.netns(target.name), *self._identity_args("target"),
        )  # fmt: skip
        self._spawn(target.name, argv, self.netns(target.name))

    def _lb_routes(self) -> list[str]:
        routes = [f"{DEFAULT_ROUTE[v]}={OUTSIDE_HOST[v]}" for v in self.families]
        for target in self.state.targets.values():
            for vip in target.vips:
                gateway = target.addresses.get(_version(vip))
                if gateway is not None:
                    routes.append(f"{vip}={gateway}")
        return routes

    def _start_lb(self, index: int) -> None:
        lb = self.state.lbs[index]
        routes = [a for route in self._lb_routes() for a in ("--route", route)]
        argv = self._lab_argv(
            "lb", "--nsm", self.address("nsm"), "--listen", self.address(lb.name),
            "--name", lb.name, "--service", LB_SERVICE, "--outside", OUTSIDE_IFNAME, *routes,
            "--registration-lifetime", f"{self.spec.lb_lifetime:g}s", *self._identity_args("lb"),
        )  # fmt: skip
        self._spawn(lb.name, argv, self.netns(lb.name))

    # -- waiting ---------------------------------------------------------------------------------

    async def wait_until(
        self,
        what: str,
        check: Callable[[], Awaitable[T | None]],
        within: float,
        *,
        watch: tuple[str, ...] = (),
    ) -> T:
        """Poll `check` until it returns something true; TopologyError after `within`, or at once
        when a process of `watch` (roles) has exited, with the end of its log."""
        deadline = trio.current_time() + within
        while True:
            for role in watch:
                if role in self.state.processes and not self.is_running(role):
                    raise TopologyError(
                        f"{what}: the {role} process exited; the end of its log"
                        f" ({self.directory / (role + '.log')}):\n{_tail(self._log_path(role))}"
                    )
            with trio.move_on_at(deadline + 1.0):
                value = await check()
                if value:
                    return value
            if trio.current_time() > deadline:
                raise TopologyError(f"{what}: not within {within:g}s")
            await trio.sleep(POLL)

    def _log_path(self, role: str) -> Path:
        return self.directory / f"{role}.log"

    async def wait_settled(self, within: float | None = None) -> float:
        """Until the proxy started last has logged "connections settled": once the LBs
        registered at its start are connected (at most NSM_REQUEST_TIMEOUT after its control
        plane starts), it stops adopting what a previous instance may have left; until then an
        LB that goes keeps its nexthop. The seconds waited."""
        from proxy.config import parse_duration

        budget = float(parse_duration(self.proxy_environment()["NSM_REQUEST_TIMEOUT"])) + 15.0
        started = trio.current_time()
        log = self._log_path("proxy")

        def read() -> bytes:
            with open(log, "rb") as file:
                file.seek(self._proxy_log_offset)
                return file.read()

        async def settled() -> bool:
            return b"connections settled" in await trio.to_thread.run_sync(read)

        await self.wait_until(
            "the proxy settled (its log says 'connections settled')",
            settled,
            budget if within is None else within,
            watch=("proxy",),
        )
        return trio.current_time() - started

    async def _wait_socket(self, name: str, within: float = 20.0) -> None:
        path = self.socket_path(name)

        async def exists() -> bool:
            return path.exists()

        await self.wait_until(f"{name} listening on {path}", exists, within, watch=(name,))

    async def _wait_target_addresses(self, index: int, within: float = 30.0) -> None:
        target = self.state.targets[index]

        async def addressed() -> dict[int, str] | None:
            found = await self.target_addresses(index)
            return found if set(found) >= set(self.families) else None

        try:
            found = await self.wait_until(
                f"{target.name} connected (node-subnet addresses on {TARGET_IFNAME})",
                addressed,
                within,
                watch=(target.name, "proxy", "nsm"),
            )
        except TopologyError as exc:
            raise TopologyError(
                f"{exc}\n--- proxy log ---\n{_tail(self._log_path('proxy'))}"
            ) from None
        target.addresses = {v: found[v] for v in self.families}
        self.state.save()

    async def ready_problems(self) -> list[str]:
        """What keeps the lab from being ready (empty: it is): the proxy's Readiness, its
        nexthop groups (every advertised LB, per family), its VIP rules (every target's VIPs),
        the LBs' routes (every VIP)."""
        problems: list[str] = []
        readiness = await self.health(("Readiness",))
        if readiness["Readiness"] != "SERVING":
            problems.append(f"proxy Readiness is {readiness['Readiness']}")
        wanted_lbs = sorted(lb.name for lb in self.state.lbs.values() if self.is_running(lb.name))
        members = await self.group_members()
        for version in self.families:
            if sorted(members.get(version, [])) != wanted_lbs:
                problems.append(
                    f"IPv{version} nexthop group members are {members.get(version, [])},"
                    f" not {wanted_lbs}"
                )
        vips = {vip.split("/")[0] for t in self.state.targets.values() for vip in t.vips}
        rules = {rule["src"] for rule in await self.vip_rules()}
        if rules != vips:
            problems.append(f"VIP rules for {sorted(rules)}, not {sorted(vips)}")
        for lb in self.state.lbs.values():
            if self.is_running(lb.name) and lb.netns is not None:
                missing = vips - await self._lb_vip_routes(lb.netns)
                if missing:
                    problems.append(f"{lb.name} has no route to {sorted(missing)} yet")
        return problems

    async def wait_ready(self, within: float = 60.0) -> None:
        """Until `ready_problems()` is empty; TopologyError naming the problems left."""
        last: list[str] = []

        async def ready() -> bool:
            nonlocal last
            last = await self.ready_problems()
            return not last

        watch = ("proxy", *PEERS, *(f"lb{i}" for i in self.state.lbs), *self._target_roles())
        try:
            await self.wait_until("the lab ready", ready, within, watch=watch)
        except TopologyError as exc:
            detail = "; ".join(last)
            raise TopologyError(
                f"{exc}: {detail}\n--- proxy log ---\n{_tail(self._log_path('proxy'))}"
            ) from None

    def _target_roles(self) -> list[str]:
        return [t.name for t in self.state.targets.values() if t.name in self.state.processes]

    # -- reading the lab --------------------------------------------------------------------------

    async def health(self, services: tuple[str, ...] = HEALTH_SERVICES) -> dict[str, str]:
        """The proxy's health per service: SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN, or
        NO_ANSWER when its health socket does not answer."""
        from proxy.probe import EXIT_CONNECT, EXIT_SERVING, ask

        found: dict[str, str] = {}

        async def one(service: str) -> None:
            answer = await ask(self.address("health"), service, 1.0, 1.0)
            if answer.code == EXIT_SERVING:
                found[service] = "SERVING"
            elif "responded with " in answer.message:
                found[service] = answer.message.rsplit("responded with ", 1)[1].rstrip(")")
            elif "unknown to the server" in answer.message:
                found[service] = "SERVICE_UNKNOWN"
            else:
                found[service] = "NO_ANSWER" if answer.code == EXIT_CONNECT else "ERROR"

        async with trio.open_nursery() as nursery:
            for service in services:
                nursery.start_soon(one, service)
        return {service: found[service] for service in services}

    async def addresses(self, role: str, device: str | None = None) -> dict[str, list[str]]:
        """Global addresses in a role's namespace, by interface (only `device` if given)."""
        args = ["address", "show", *(["dev", device] if device else [])]
        try:
            links = await ip_json(*args, netns=self.netns(role))
        except TopologyError:
            return {}
        return {
            link["ifname"]: [
                a["local"] for a in link.get("addr_info", []) if a.get("scope") == "global"
            ]
            for link in links
        }

    async def target_addresses(self, index: int) -> dict[int, str]:
        """The node-subnet addresses of target `index` (by IP version), once it is connected."""
        target = self.state.targets[index]
        if target.netns is None:
            return {}
        vips = {vip.split("/")[0] for vip in target.vips}
        found: dict[int, str] = {}
        for addresses in (await self.addresses(target.name, TARGET_IFNAME)).values():
            for address in addresses:
                if address not in vips:
                    found.setdefault(_version(address), address)
        return found

    async def lb_addresses(self) -> dict[str, str]:
        """Conduit address -> LB name. An LB that stopped (its conduit interface went with its
        connection) or vanished is still named by the addresses it had when last seen, so a
        nexthop the proxy still holds for it is still recognised as its."""
        live: dict[str, str] = {}
        for lb in self.state.lbs.values():
            if lb.netns is None:
                continue
            seen = [
                address
                for device, addresses in (await self.addresses(lb.name)).items()
                if device not in ("lo", OUTSIDE_IFNAME)
                for address in addresses
            ]
            if seen and seen != lb.conduit:
                lb.conduit = seen
                self.state.save()
            live.update({address: lb.name for address in seen})
        remembered = {a: lb.name for lb in self.state.lbs.values() for a in lb.conduit}
        return {**remembered, **live}

    async def nexthops(self) -> list[dict[str, Any]]:
        return list(await ip_json("nexthop", "show", netns=self.netns("proxy")))

    async def group_members(self) -> dict[int, list[str]]:
        """The proxy's egress nexthop group members per IP version, as LB names (a gateway no
        LB holds is shown as the address itself); with legacy multipath egress
        (NSM_EGRESS_MODE=multipath) the gateways of the default route in the proxy's table."""
        nexthops = await self.nexthops()
        names = await self.lb_addresses()
        by_id = {nh["id"]: nh for nh in nexthops}
        found: dict[int, list[str]] = {v: [] for v in self.families}
        for nh in nexthops:
            for member in nh.get("group", []):
                gateway = by_id.get(member["id"], {}).get("gateway")
                if gateway:
                    found.setdefault(_version(gateway), []).append(names.get(gateway, gateway))
        multipath = await self.multipath_gateways()
        for version, gateways in multipath.items():
            found[version] += [names.get(gateway, gateway) for gateway in gateways]
        return {v: sorted(members) for v, members in found.items()}

    async def multipath_gateways(self) -> dict[int, list[str]]:
        """The gateways of the proxy's legacy multipath default routes (table PROXY_TABLE), per
        IP version (empty with nexthop-object egress, whose routes name a group instead)."""
        found: dict[int, list[str]] = {}
        for version in self.families:
            routes = await ip_json(
                f"-{version}", "route", "show", "table", str(PROXY_TABLE), "default",
                netns=self.netns("proxy"),
            )  # fmt: skip
            for route in routes:
                if route.get("type", "unicast") != "unicast" or "nhid" in route:
                    continue
                hops = route.get("nexthops") or [route]
                found[version] = [hop["gateway"] for hop in hops if "gateway" in hop]
        return found

    async def vip_rules(self) -> list[dict[str, Any]]:
        """The proxy's `from <VIP> lookup <table>` rules (both families)."""
        proxy = self.netns("proxy")
        rules: list[dict[str, Any]] = []
        for version in self.families:
            found = await ip_json(f"-{version}", "rule", "show", netns=proxy)
            rules += [r for r in found if r.get("table") == str(PROXY_TABLE) and "src" in r]
        return rules

    async def bridge_ports(self) -> list[dict[str, Any]]:
        links = await ip_json("link", "show", netns=self.netns("proxy"))
        return [link for link in links if link.get("master") == "bridge0"]

    async def _lb_vip_routes(self, netns: str) -> set[str]:
        found = set()
        for version in self.families:
            for route in await ip_json(f"-{version}", "route", "show", netns=netns):
                found.add(route.get("dst", ""))
        return found

    async def counters(self) -> dict[str, int]:
        """Packets each LB has sent to the outside host (tx of its outside link), by LB name."""
        found: dict[str, int] = {}
        for lb in self.state.lbs.values():
            if lb.netns is None:
                continue
            try:
                [link] = await ip_json("-s", "link", "show", OUTSIDE_IFNAME, netns=lb.netns)
            except (TopologyError, ValueError):
                continue
            found[lb.name] = int(link["stats64"]["tx"]["packets"])
        return found

    async def egress_choices(
        self, flows: list[tuple[str, str, int]], port: int = traffic.ECHO_PORT
    ) -> list[FlowChoice]:
        """Which LB the proxy's kernel picks for a packet of each flow (protocol, VIP, source
        port) to the outside host: `ip route get ... iif bridge0 ipproto P sport S dport D`.

        That is the decision for a packet that carries no flow hash yet, hashed on its 5-tuple.
        It is *not* where a target's own sockets' packets go: they arrive with the sending
        socket's random flow hash (`sk_txhash`, kept across veth and bridge), which the kernel
        uses instead of the 5-tuple; the same 5-tuple from a new socket may take another LB,
        and TCP picks a new hash after a retransmission timeout. Observe real traffic with
        `traffic.PathRecorder` or `udp_stream`'s report."""
        lines = [
            f"route get {OUTSIDE_HOST[_version(source)]} from {source} iif bridge0"
            f" ipproto {protocol} sport {sport} dport {port}"
            for protocol, source, sport in flows
        ]
        names = await self.lb_addresses()
        proxy = self.netns("proxy")
        answers = _json_values(await ip_batch(lines, proxy, force=True, json_output=True))
        if len(answers) != len(lines):  # an unroutable flow prints nothing: ask one by one
            answers = []
            for line in lines:
                text = await ip("-j", *line.split(), netns=proxy, check=False)
                answers.append(json.loads(text) if text.strip() else [])
        choices = []
        for (protocol, source, sport), answer in zip(flows, answers, strict=True):
            gateway = answer[0].get("gateway") if answer else None
            choices.append(
                FlowChoice(
                    protocol, source, sport, names.get(gateway, gateway) if gateway else None
                )
            )
        return choices

    def outside_interfaces(self) -> dict[int, str]:
        """ifindex -> name in the outside namespace (for IP_PKTINFO's interface index)."""
        pairs = in_netns(self.netns("out"), socket.if_nameindex)
        return dict(pairs)

    async def run(
        self, role: str, *command: str, check: bool = True, within: float = 30.0
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a program inside a role's namespace (`ip netns exec`)."""
        return await _command(
            ["ip", "netns", "exec", self.netns(role), *command], check=check, within=within
        )

    # -- changing the lab --------------------------------------------------------------------------

    async def restart_proxy(
        self,
        how: int = signal.SIGTERM,
        *,
        wait_ready: bool = True,
        down_for: float = 0.0,
        while_down: Callable[[], Awaitable[None]] | None = None,
    ) -> float:
        """Stop the proxy with `how` (SIGKILL: as a crash), then (after `while_down`, if any)
        start it again with the same environment; by default wait until the lab is ready again
        and the new proxy has settled. The seconds from the signal until ready (0 when not
        waiting)."""
        await self._note_proxy_socket_dir()
        started = trio.current_time()
        await self._stop("proxy", how)
        if while_down is not None:
            await while_down()
        await trio.sleep(down_for)
        self._start_proxy()
        if not wait_ready:
            return 0.0
        await self.wait_ready()
        ready = trio.current_time() - started
        await self._note_proxy_socket_dir()
        await self.wait_settled()
        return ready

    async def _note_proxy_socket_dir(self) -> None:
        """Record the proxy's private socket directory (/tmp/<NSM_NAME>-*), which a SIGKILLed
        proxy leaves behind, so `down` removes it."""
        record = self.state.processes.get("proxy")
        if record is None:
            return
        try:
            table = await trio.Path(f"/proc/{record.pid}/net/unix").read_text()
        except OSError:
            return
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 8:
                continue
            path = Path(fields[7])
            ours = path.name == "listen.on" and path.parent.name.startswith(f"{self.proxy_name}-")
            if ours and str(path.parent) not in self.state.paths:
                self.state.paths.append(str(path.parent))
                self.state.save()

    async def stop_lb(self, index: int, how: int = signal.SIGTERM) -> None:
        """Withdraw LB `index` from the outside host, and stop its process (SIGTERM: it
        unregisters from NSM; SIGKILL: it does not). Its namespace stays: `start_lb` again."""
        lb = self._lb(index)
        lb.advertised = False
        await self._sync_outside()
        await self._stop(lb.name, how)

    async def start_lb(self, index: int, *, wait: bool = True) -> None:
        """Start LB `index` again (in its namespace, with routes to every target's VIPs),
        advertise it, and (by default) wait until it is in the proxy's nexthop groups."""
        lb = self._lb(index)
        if lb.netns is None:
            raise TopologyError(f"{lb.name}'s namespace is gone; add_lb() makes a new LB")
        if self.is_running(lb.name):
            raise TopologyError(f"{lb.name} runs already")
        self._start_lb(index)
        await self._wait_lb_routes(index)
        lb.advertised = True
        await self._sync_outside()
        if wait:
            await self.wait_lb_member(lb.name, present=True)

    async def _wait_lb_routes(self, index: int, within: float = 30.0) -> None:
        """Until LB `index` routes every VIP to its target: only then may the outside host send
        it replies (without them it would send them back out its default route, a loop)."""
        lb = self.state.lbs[index]
        vips = {vip.split("/")[0] for t in self.state.targets.values() for vip in t.vips}

        async def routed() -> bool:
            return lb.netns is not None and vips <= await self._lb_vip_routes(lb.netns)

        await self.wait_until(f"{lb.name} routing every VIP", routed, within, watch=(lb.name,))

    async def delete_lb_namespace(self, index: int) -> None:
        """LB `index` vanishes as a node does: withdrawn from the outside host, its process
        killed (no unregister), its conduit interfaces deleted and its namespace with them.

        The interfaces are deleted first, explicitly: the lab's NSM holds the descriptor of the
        LB's namespace for as long as the connection lives (as NSM's forwarder does), so
        deleting the namespace's name alone would leave it, and the veth, alive."""
        lb = self._lb(index)
        lb.advertised = False
        await self._sync_outside()
        await self._stop(lb.name, signal.SIGKILL)
        if lb.netns is not None:
            links = await ip_json("link", "show", netns=lb.netns)
            conduits = [
                link["ifname"] for link in links if link["ifname"] not in ("lo", OUTSIDE_IFNAME)
            ]
            await ip_batch([f"link del {name}" for name in conduits], lb.netns, force=True)
        await self._remove_netns(lb.name)
        lb.netns = None
        self.state.save()

    async def freeze_lb(self, index: int) -> None:
        """LB `index` hangs as a whole pod does: its process gets SIGSTOP (returns once it is
        stopped) and answers nothing and refreshes no registration, while its namespace keeps
        forwarding; the outside host withdraws it, as a router does when the hung pod's BGP
        session (and BFD) goes quiet."""
        lb = self._lb(index)
        lb.advertised = False
        await self._sync_outside()
        await self._signal_until(lb.name, signal.SIGSTOP, stopped=True)

    async def thaw_lb(self, index: int) -> None:
        """SIGCONT a frozen LB (returns once it runs again) and advertise it again."""
        lb = self._lb(index)
        await self._signal_until(lb.name, signal.SIGCONT, stopped=False)
        lb.advertised = True
        await self._sync_outside()

    async def _signal_until(self, role: str, signum: int, *, stopped: bool) -> None:
        pid = self._process(role).pid
        os.kill(pid, signum)

        async def done() -> bool:
            return (process_state(pid) in ("T", "t")) == stopped

        await self.wait_until(f"{role} {'stopped' if stopped else 'running'}", done, 5.0)

    async def add_lb(self, *, wait: bool = True) -> int:
        """A new LB (namespace, outside link, process, advertised); its index."""
        index = max(self.state.lbs, default=-1) + 1
        self.state.lbs[index] = self._lb_record(index)
        await self._add_netns(f"lb{index}")
        await self._link_outside(index)
        await self.start_lb(index, wait=wait)
        return index

    async def restart_peer(
        self, peer: str, how: int = signal.SIGTERM, down_for: float = 0.0
    ) -> None:
        """Stop a peer ("ipam", "nsp" or "nsm") with `how`, wait `down_for`, start it again with
        the same arguments (IPAM keeps its database, NSP reads the same file; NSM starts with
        an empty registry) and wait until it listens."""
        if peer not in PEERS:
            raise TopologyError(f"no peer {peer!r}; peers are {', '.join(PEERS)}")
        await self._stop(peer, how)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path(peer).unlink()  # left by a SIGKILL
        await trio.sleep(down_for)
        self._spawn(peer, self._peer_argv(peer))
        await self._wait_socket(peer)

    async def add_target(self, *, wait: bool = True) -> int:
        """A new target with VIPs of its own (also added to the NSP configuration); once it is
        connected every LB gets routes to its VIPs. Its index."""
        index = max(self.state.targets, default=-1) + 1
        target = TargetRecord(index, f"tg{index}", None, target_vips(index, self.families))
        self.state.targets[index] = target
        await self._add_netns(target.name)
        target.netns = self.netns(target.name)
        self.state.save()
        self._write_nsp_config()
        self._start_target(index)
        await self._wait_target_addresses(index)
        await self._lb_target_routes(target, "replace")
        if wait:
            await self.wait_ready()
        return index

    async def remove_target(self, index: int) -> None:
        """Stop target `index` (it closes its connection), drop its VIPs from the NSP
        configuration and its routes from the LBs, delete its namespace."""
        target = self.state.targets.get(index)
        if target is None:
            raise TopologyError(f"no target {index}")
        await self._stop(target.name)
        await self._lb_target_routes(target, "del")
        del self.state.targets[index]
        self._write_nsp_config()
        await self._remove_netns(target.name)

    async def _lb_target_routes(self, target: TargetRecord, verb: str) -> None:
        """Routes to a target's VIPs in every LB (the LBs started before it do not keep them:
        an LB restarted later gets them as --route)."""
        lines = [
            f"route {verb} {vip} via {target.addresses[_version(vip)]}"
            for vip in target.vips
            if _version(vip) in target.addresses
        ]
        for lb in self.state.lbs.values():
            if lb.netns is not None and netns_exists(lb.netns):
                await ip_batch(lines, lb.netns, force=verb == "del")

    async def wait_lb_member(self, name: str, *, present: bool, within: float = 30.0) -> float:
        """Until LB `name` is (or is not) in the proxy's nexthop group of every family; the
        seconds it took."""
        started = trio.current_time()

        async def settled() -> bool:
            members = await self.group_members()
            return all((name in members.get(v, [])) == present for v in self.families)

        state = "in" if present else "out of"
        await self.wait_until(f"{name} {state} the proxy's nexthop groups", settled, within)
        return trio.current_time() - started

    def _lb(self, index: int) -> LbRecord:
        try:
            return self.state.lbs[index]
        except KeyError:
            raise TopologyError(f"no LB {index}") from None

    def _process(self, role: str) -> ProcessRecord:
        record = self.state.processes.get(role)
        if record is None or not self.is_running(role):
            raise TopologyError(f"{role} does not run")
        return record

    # -- traffic ---------------------------------------------------------------------------------

    def vip(self, target: int, version: int) -> str:
        """Target `target`'s VIP of IP version `version` (the address, no length)."""
        for vip in self.state.targets[target].vips:
            if _version(vip) == version:
                return vip.split("/")[0]
        raise TopologyError(f"target {target} has no IPv{version} VIP")

    @asynccontextmanager
    async def udp_stream(
        self, target: int = 0, version: int = 4, *, rate: float = 500.0, port: int = 7100
    ) -> AsyncIterator[traffic.Stream]:
        """A constant-rate UDP stream from target `target`'s VIP to the outside host (port
        `port`; use one per concurrent stream) while the body runs; `.report()` after it: loss,
        longest gap in ms, and which LB (outside interface `lb<i>`) carried each stretch."""
        async with traffic.udp_stream(
            source_netns=self.netns(self.state.targets[target].name),
            source=self.vip(target, version),
            destination_netns=self.netns("out"),
            destination=OUTSIDE_HOST[version],
            port=port,
            rate=rate,
            interface_names=self.outside_interfaces,
        ) as stream:
            yield stream


def describe_age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"
