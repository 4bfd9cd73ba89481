"""`meridio-proxy lab ...`: the peers the proxy talks to, as processes, for running it without
Kubernetes.

    meridio-proxy lab ipam --listen unix:///tmp/lab/ipam.sock --db /tmp/lab/ipam.db
    meridio-proxy lab nsp --listen unix:///tmp/lab/nsp.sock --config trench.yaml
    meridio-proxy lab nsm --listen unix:///tmp/lab/nsm.sock [--no-kernel]
    meridio-proxy lab lb --nsm unix:///tmp/lab/nsm.sock --listen unix:///tmp/lab/lb-a.sock \
        --name lb-a --service conduit-a.trench-a.red --outside ext0 --route 0.0.0.0/0=198.18.9.1
    meridio-proxy lab target --nsm unix:///tmp/lab/nsm.sock --name target-a --node node-1 \
        --service proxy.conduit-a.trench-a.red --interface nsm-1 --vip 198.19.0.1/32

Each serves until SIGTERM or SIGINT (exit 0, its socket file removed). Bad arguments, an invalid
configuration file or a database made with other settings: exit 2 with a one-line message.
Cannot listen: exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, NoReturn

import trio
from loguru import logger

from proxy import log
from proxy.config import parse_duration
from proxy.lab.ipam import (
    DEFAULT_GC_INTERVAL,
    DEFAULT_GC_THRESHOLD,
    DEFAULT_PREFIXES,
    DEFAULT_TRENCH,
    IpamSettings,
    serve_ipam,
)
from proxy.lab.ipam_alloc import (
    DEFAULT_CONDUIT_PREFIX_LENGTH,
    DEFAULT_NODE_PREFIX_LENGTH,
    LayoutError,
    Network,
)
from proxy.lab.ipam_store import StoreError
from proxy.lab.nsm.forwarding import Forwarder, NoKernel
from proxy.lab.nsm.registry import DEFAULT_LIFETIME
from proxy.lab.nsm.server import serve_nsm
from proxy.lab.nsp import DEFAULT_POLL_INTERVAL, serve_nsp
from proxy.lab.nsp_config import ConfigFileError
from proxy.rpc import Address, AddressError, UnixAddress, parse_address
from proxy.security.identity import follow_workload_api
from proxy.security.spiffe import Identity, IdentityError, SpiffeId
from proxy.security.tls import SpiffeTls
from proxy.watched import Watched

PROG = "meridio-proxy lab"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_USAGE = f"""\
usage: {PROG} {{up,down,status,demo,spire,ipam,nsp,nsm,lb,target}} [options]   (each has --help)

  up     make the lab topology (namespaces, peers, the real proxy, LBs, targets) and wait for it
  down   take a lab down (by its state file: also after a crash)
  status a lab's processes, the proxy's health, ports, nexthops and VIP rules (--json)
  demo   up, traffic over the LBs, one LB stopped and back, every claim checked, down

  spire  a SPIFFE Workload API with its own CA: an SVID per workload socket, rotated
  ipam   the IPAM service (ipam.v1.Ipam): node subnets and addresses, kept in SQLite
  nsp    the NSP configuration service (nsp.v1.ConfigurationManager), from a YAML/JSON file
  nsm    the node's NSM: registry, manager and kernel forwarder on one socket, like nsmgr
  lb     a load-balancer stand-in: an NSE of the conduit's service that routes
  target an application pod stand-in: an NSC of the proxy's service with VIPs"""
_TOPOLOGY_COMMANDS = ("up", "down", "status", "demo")
KERNEL_MODULE = "proxy.lab.nsm.kernel"
_TARGET_TABLE = 1000  # proxy.lab.target.DEFAULT_TABLE (not imported here: pyroute2 is heavy)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


# -- argument types --------------------------------------------------------------------------------


def _listen_address(text: str) -> Address:
    try:
        return parse_address(text, listen=True)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _duration(text: str) -> float:
    try:
        seconds = float(parse_duration(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (like 500ms, 40m, 2h)"
        ) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return seconds


def _prefix(text: str) -> Network:
    try:
        return ipaddress.ip_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _length(text: str) -> int:
    if not text.isdigit() or int(text) > 128:
        raise argparse.ArgumentTypeError(f"{text!r} is not a prefix length")
    return int(text)


def _add_listen(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--listen", required=True, type=_listen_address, metavar="ADDRESS", help=what
    )


def _add_nsm(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--nsm", required=True, type=_dial_address, metavar="ADDRESS", help=what)


def _add_identity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--spiffe-socket",
        type=_unix_url,
        metavar="unix:///PATH",
        help="the SPIFFE Workload API (`lab spire`) to get an identity from: then every"
        " connection is mutual TLS; default: plain text",
    )


def _unix_url(text: str) -> str:
    if not text.startswith("unix:///"):
        raise argparse.ArgumentTypeError(f"{text!r} is not unix:///path")
    return text


def _add_logging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", choices=log.LEVELS, help="default: INFO")
    parser.add_argument("--log-format", default="text", choices=log.FORMATS, help="default: text")


# -- parsers ---------------------------------------------------------------------------------------


def _ipam_parser() -> _Parser:
    parser = _Parser(
        prog=f"{PROG} ipam",
        allow_abbrev=False,
        description="Serve ipam.v1.Ipam with Meridio's semantics for one trench: the trench"
        " prefix of each family is carved into conduit prefixes, those into node prefixes,"
        " both assigned on first use and kept; Allocate gives each child (idempotently) the"
        " lowest free address of its node prefix, never the first or last one. Records not"
        " refreshed within --gc-threshold are deleted every --gc-interval.",
    )
    _add_listen(parser, "unix:///path or host:port ([v6]:port, :port for every address)")
    parser.add_argument(
        "--db",
        default=":memory:",
        metavar="PATH",
        help="SQLite database of the allocations; a restart with the same file gives the same"
        " children the same addresses (default: :memory:, nothing kept)",
    )
    parser.add_argument(
        "--prefix",
        action="append",
        type=_prefix,
        metavar="CIDR",
        help="the trench prefix of a family; give one per family (default:"
        f" {' and '.join(str(prefix) for prefix in DEFAULT_PREFIXES)})",
    )
    parser.add_argument(
        "--trench",
        default=DEFAULT_TRENCH,
        metavar="NAME",
        help=f"the trench served; requests for another get NOT_FOUND (default: {DEFAULT_TRENCH})",
    )
    for kind, defaults in (
        ("conduit", DEFAULT_CONDUIT_PREFIX_LENGTH),
        ("node", DEFAULT_NODE_PREFIX_LENGTH),
    ):
        for family in (4, 6):
            parser.add_argument(
                f"--{kind}-prefix-length-ipv{family}",
                type=_length,
                default=defaults[family],
                metavar="N",
                help=f"length of the {kind} prefixes (default: {defaults[family]})",
            )
    parser.add_argument(
        "--gc-threshold",
        type=_duration,
        default=DEFAULT_GC_THRESHOLD,
        metavar="DURATION",
        help="delete records not allocated again for this long (default: 40m, as upstream)",
    )
    parser.add_argument(
        "--gc-interval",
        type=_duration,
        default=DEFAULT_GC_INTERVAL,
        metavar="DURATION",
        help="how often garbage is collected; 0 turns it off (default: 2h, as upstream)",
    )
    _add_identity(parser)
    _add_logging(parser)
    return parser


def _nsp_parser() -> _Parser:
    parser = _Parser(
        prog=f"{PROG} nsp",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve nsp.v1.ConfigurationManager (every Watch method, with Meridio's"
        " filters)\nfrom a YAML or JSON file, and stream each valid change of the file to the"
        " watchers.\nAn invalid file is logged once and the last good configuration kept.",
        epilog="file format (see proxy/lab/nsp_config.py for every field):\n\n"
        "  trench: {name: trench-a}\n"
        "  conduits: [{name: conduit-a, trench: trench-a}]\n"
        "  streams: [{name: stream-a, conduit: conduit-a, max-targets: 100}]\n"
        "  flows:\n"
        "    - {name: flow-a, stream: stream-a, vips: [vip-v4], protocols: [tcp],\n"
        "       source-subnets: [0.0.0.0/0], destination-port-ranges: ['80'],\n"
        "       source-port-ranges: ['1024-65535'], priority: 1}\n"
        "  vips:\n"
        "    - {name: vip-v4, address: 198.19.0.1/32, trench: trench-a}\n"
        "    - {name: vip-v6, address: '2001:db8:ff::1/128', trench: trench-a}\n"
        "  attractors: [{name: attractor-a, trench: trench-a, vips: [vip-v4], gateways: []}]\n"
        "  gateways: []\n\n"
        "Names and references are checked; VIP addresses are passed through verbatim.",
    )
    _add_listen(parser, "unix:///path or host:port ([v6]:port, :port for every address)")
    parser.add_argument(
        "--config", required=True, metavar="FILE", help="the trench configuration (YAML/JSON)"
    )
    parser.add_argument(
        "--poll",
        type=_duration,
        default=DEFAULT_POLL_INTERVAL,
        metavar="DURATION",
        help="how often the file is checked for changes (default: 500ms)",
    )
    _add_identity(parser)
    _add_logging(parser)
    return parser


def _nsm_parser() -> _Parser:
    parser = _Parser(
        prog=f"{PROG} nsm",
        allow_abbrev=False,
        description="Serve what a node's nsmgr serves its clients and endpoints, on one UNIX"
        " socket: the NS and NSE registries (Register, Find with watch, Unregister; NSE"
        " registrations expire), and the manager (Request, Close, MonitorConnections): it"
        " selects an endpoint (by name, or by the network service's label matches), forwards"
        " the request to it, and wires the connection with a veth pair between the client's"
        " and the endpoint's network namespaces (root needed, unless --no-kernel).",
    )
    _add_listen(
        parser,
        "unix:///path (a UNIX socket: clients pass their namespaces on it as file descriptors,"
        " or are known by their process)",
    )
    parser.add_argument(
        "--no-kernel",
        action="store_true",
        help="wire nothing: the control plane only (runs without root)",
    )
    parser.add_argument(
        "--lifetime",
        type=_duration,
        default=DEFAULT_LIFETIME,
        metavar="DURATION",
        help="how long an NSE registration without expiration time, and a connection not"
        " refreshed, last (default: 1m)",
    )
    parser.add_argument(
        "--map-path",
        type=_path_map,
        metavar="INSIDE=OUTSIDE",
        help="dial an endpoint registered at unix://INSIDE/... at unix://OUTSIDE/... (for"
        " endpoints in containers that register a path; one that passes its socket as a file"
        " descriptor, as NSM's do, is dialled through that)",
    )
    _add_identity(parser)
    _add_logging(parser)
    return parser


def _path_map(text: str) -> tuple[str, str]:
    inside, equals, outside = text.partition("=")
    if not equals or not inside.startswith("/") or not outside.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not /inside=/outside")
    return inside, outside


def _service_name(text: str) -> str:
    parts = text.split(".")
    if len(parts) < 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not <conduit>.<trench>.<namespace>")
    return text


def _proxy_service_name(text: str) -> str:
    parts = text.split(".")
    if len(parts) < 4 or parts[0] != "proxy" or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not proxy.<conduit>.<trench>.<namespace>")
    return text


def _ifname(text: str) -> str:
    if not text or len(text) > 15 or any(c in text for c in "/: \t\n") or text in (".", ".."):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an interface name (1-15 characters, no '/', ':' or spaces)"
        )
    return text


def _dial_address(text: str) -> Address:
    try:
        return parse_address(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _route(text: str) -> tuple[Network, IPAddress]:
    prefix, _, gateway = text.partition("=")
    try:
        network, address = ipaddress.ip_network(prefix), ipaddress.ip_address(gateway)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not CIDR=GATEWAY: {exc}") from None
    if network.version != address.version:
        raise argparse.ArgumentTypeError(f"{text!r}: the gateway is not of the prefix's family")
    return network, address


def _vip(text: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address/length") from None


def _add_netns(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument(
        "--netns",
        metavar="NAME",
        help=f"the network namespace the {who} works in (an `ip netns` name or a path); default:"
        " the process's own (e.g. under `ip netns exec`)",
    )


def _lb_parser() -> _Parser:
    parser = _Parser(
        prog=f"{PROG} lb",
        allow_abbrev=False,
        description="A load-balancer stand-in: an NSM endpoint of the conduit's network service"
        " that registers itself (refreshed at 2/3 of its lifetime, unregistered at stop),"
        " accepts the proxies' KERNEL connections (it keeps the IP context they set and answers"
        " with its path segment and its interface name), and routes: IPv4/IPv6 forwarding on,"
        " rp_filter off, the --outside interface up, and each --route kept in the main table"
        " (retried until its gateway is reachable).",
    )
    _add_nsm(parser, "the NSM manager (registry) to register with: unix:///path or host:port")
    _add_listen(parser, "the endpoint's own socket (registered as its url): unix:///path")
    parser.add_argument("--name", required=True, metavar="NAME", help="the endpoint's name")
    parser.add_argument(
        "--service",
        required=True,
        type=_service_name,
        metavar="SERVICE",
        help="the conduit's network service: <conduit>.<trench>.<namespace>",
    )
    parser.add_argument(
        "--outside",
        type=_ifname,
        metavar="IFNAME",
        help="the interface towards the outside (made by the topology; brought up here)",
    )
    parser.add_argument(
        "--route",
        action="append",
        type=_route,
        default=[],
        metavar="CIDR=GATEWAY",
        help="a route to keep in the main table; repeat it (the same CIDR twice: multipath)",
    )
    parser.add_argument(
        "--registration-lifetime",
        type=_duration,
        default=60.0,
        metavar="DURATION",
        help="the registration lifetime asked of the registry (default: 1m); a frozen LB drops"
        " out of the registry after at most this long",
    )
    _add_netns(parser, "LB")
    _add_identity(parser)
    _add_logging(parser)
    return parser


def _target_parser() -> _Parser:
    parser = _Parser(
        prog=f"{PROG} target",
        allow_abbrev=False,
        description="A target (application pod) stand-in: asks NSM for the proxy's network"
        " service on its node (labels nodeName, KERNEL, id <name>-<namespace>-0), refreshes the"
        " connection at 1/3 of its remaining lifetime, puts its VIPs on its interface and routes"
        " their egress via the gateways the proxy returns (a default route per family in table"
        f" {_TARGET_TABLE}, `from <VIP> lookup {_TARGET_TABLE}` rules); at stop it closes the"
        " connection and removes them.",
    )
    _add_nsm(parser, "the NSM manager: unix:///path or host:port")
    parser.add_argument("--name", required=True, metavar="NAME", help="the target's name")
    parser.add_argument(
        "--node", required=True, metavar="NODE", help="its node (the nodeName label)"
    )
    parser.add_argument(
        "--service",
        required=True,
        type=_proxy_service_name,
        metavar="SERVICE",
        help="the proxy's network service: proxy.<conduit>.<trench>.<namespace>",
    )
    parser.add_argument(
        "--interface",
        required=True,
        type=_ifname,
        metavar="IFNAME",
        help="the name of its NSM interface (at most 15 characters)",
    )
    parser.add_argument(
        "--vip",
        required=True,
        action="append",
        type=_vip,
        metavar="CIDR",
        help="a VIP to serve, as address/length (e.g. 198.19.0.1/32); repeat it",
    )
    _add_netns(parser, "target")
    _add_identity(parser)
    _add_logging(parser)
    return parser


# -- running ---------------------------------------------------------------------------------------


async def _serve_until_signal(
    name: str, start: Callable[..., Awaitable[Any]], spiffe_socket: str | None = None
) -> tuple[int, str | None]:
    """Run `start` (a task for `nursery.start`) until SIGTERM/SIGINT, with mutual TLS from the
    Workload API at `spiffe_socket` when given (once it gave an identity); (exit status,
    message for stderr when it could not start)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            if spiffe_socket is not None:
                identity: Watched[Identity | None] = Watched(None)
                await nursery.start(partial(follow_workload_api, spiffe_socket, identity))
                start = partial(start, tls=SpiffeTls(identity))
            try:
                await nursery.start(start)
            except (LayoutError, StoreError) as exc:
                return EXIT_USAGE, str(exc)
            except ConfigFileError as exc:
                return EXIT_USAGE, f"invalid configuration: {exc}"
            except OSError as exc:
                logger.error("cannot serve", service=name, reason=str(exc))
                return EXIT_FAILED, f"cannot serve: {exc}"
            async for signum in signals:
                logger.info("stopping", service=name, signal=signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    logger.info("stopped", service=name)
    return EXIT_OK, None


def _ipam_task(options: argparse.Namespace) -> Callable[..., Awaitable[Any]]:
    settings = IpamSettings(
        trench=options.trench,
        prefixes=tuple(options.prefix or DEFAULT_PREFIXES),
        conduit_prefix_length={
            4: options.conduit_prefix_length_ipv4,
            6: options.conduit_prefix_length_ipv6,
        },
        node_prefix_length={4: options.node_prefix_length_ipv4, 6: options.node_prefix_length_ipv6},
        db=options.db,
        gc_threshold=options.gc_threshold,
        gc_interval=options.gc_interval,
    )
    settings.layouts()  # a LayoutError here is a usage error, reported before anything runs
    return partial(serve_ipam, options.listen, settings)


def _nsp_task(options: argparse.Namespace) -> Callable[..., Awaitable[Any]]:
    if options.poll <= 0:
        raise _UsageError("--poll must be more than 0")
    return partial(serve_nsp, options.listen, options.config, poll_interval=options.poll)


def _kernel_forwarder() -> Callable[[], Forwarder]:
    """`KernelForwarder`, imported only when wanted (it needs root and pyroute2)."""
    try:
        module = importlib.import_module(KERNEL_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != KERNEL_MODULE:
            raise
        raise _UsageError(
            f"the kernel forwarder ({KERNEL_MODULE}) is not available; use --no-kernel"
        ) from None
    factory: Callable[[], Forwarder] = module.KernelForwarder
    return factory


def _nsm_task(options: argparse.Namespace) -> Callable[..., Awaitable[Any]]:
    if not isinstance(options.listen, UnixAddress):
        raise _UsageError(
            "--listen must be unix:///path: clients pass their namespaces on it as file"
            " descriptors (or are known by their process)"
        )
    if options.lifetime <= 0:
        raise _UsageError("--lifetime must be more than 0")
    make_forwarder: Callable[[], Forwarder] = NoKernel if options.no_kernel else _kernel_forwarder()
    return partial(
        _serve_nsm, options.listen.path, make_forwarder, options.lifetime, options.map_path
    )


async def _serve_nsm(
    path: str,
    make_forwarder: Callable[[], Forwarder],
    lifetime: float,
    path_map: tuple[str, str] | None,
    *,
    tls: SpiffeTls | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The forwarder (running its `run` task if it has one) and the NSM server on `path`."""
    forwarder = make_forwarder()
    failure: OSError | None = None
    async with trio.open_nursery() as nursery:
        try:
            run = getattr(forwarder, "run", None)
            if run is not None:
                await nursery.start(run)
            await nursery.start(
                partial(
                    serve_nsm,
                    path,
                    forwarder=forwarder,
                    default_lifetime=lifetime,
                    path_map=path_map,
                    tls=tls,
                )
            )
        except OSError as exc:
            failure = exc  # raised bare below, not in an exception group
            nursery.cancel_scope.cancel()
        else:
            task_status.started()
    if failure is not None:
        raise failure


def _existing_netns(name: str | None) -> str | None:
    if name is None:
        return None
    path = name if name.startswith("/") else f"/run/netns/{name}"
    if not os.path.exists(path):
        raise _UsageError(f"--netns {name}: no such network namespace ({path})")
    return name


def _lb_task(options: argparse.Namespace) -> Callable[..., Awaitable[Any]]:
    from proxy.kernel.netlink import in_netns
    from proxy.lab.lb import LbSettings, run_lb

    netns = _existing_netns(options.netns)
    if options.outside is not None:
        try:
            in_netns(netns, partial(socket.if_nametoindex, options.outside))
        except OSError:
            where = f"namespace {netns}" if netns else "this namespace"
            raise _UsageError(
                f"--outside {options.outside}: no such interface in {where}"
            ) from None
    routes: dict[Network, frozenset[IPAddress]] = {}
    for prefix, gateway in options.route:
        routes[prefix] = routes.get(prefix, frozenset()) | {gateway}
    settings = LbSettings(
        name=options.name,
        service=options.service,
        nsm=options.nsm,
        listen=options.listen,
        outside=options.outside,
        routes=routes,
        netns=netns,
        registration_lifetime=options.registration_lifetime,
    )
    return partial(run_lb, settings)


def _target_task(options: argparse.Namespace) -> Callable[..., Awaitable[Any]]:
    from proxy.lab.target import TargetSettings, run_target

    settings = TargetSettings(
        name=options.name,
        node=options.node,
        service=options.service,
        nsm=options.nsm,
        interface=options.interface,
        vips=tuple(options.vip),
        netns=_existing_netns(options.netns),
    )
    return partial(run_target, settings)


def _spire_parser() -> _Parser:
    parser = _Parser(
        prog=f"{PROG} spire",
        allow_abbrev=False,
        description="A SPIFFE Workload API server (a SPIRE agent stand-in) with its own CA for"
        " one trust domain: each --socket stands for one workload and gives it its SPIFFE ID"
        " (SPIRE attests the caller; the lab gives each workload a socket of its own). SVIDs"
        " (EC P-256) are rotated every --rotate; open FetchX509SVID streams get the new ones.",
    )
    parser.add_argument(
        "--trust-domain", default="lab.meridio", metavar="DOMAIN", help="default: lab.meridio"
    )
    parser.add_argument(
        "--socket",
        action="append",
        required=True,
        type=_workload_socket,
        metavar="PATH=/ID/PATH",
        help="serve the Workload API of spiffe://DOMAIN/ID/PATH on the UNIX socket PATH; repeat",
    )
    parser.add_argument(
        "--svid-lifetime", type=_duration, default=3600.0, metavar="DURATION", help="default: 1h"
    )
    parser.add_argument(
        "--rotate",
        type=_duration,
        metavar="DURATION",
        help="issue every workload a new SVID this often (default: half the SVID lifetime)",
    )
    _add_logging(parser)
    return parser


def _workload_socket(text: str) -> tuple[str, str]:
    path, equals, workload = text.partition("=")
    if not equals or not path.startswith("/") or not workload.startswith("/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not /socket/path=/workload/path")
    try:
        SpiffeId.parse(f"spiffe://x{workload}")
    except IdentityError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return path, workload


def _spire_task(options: argparse.Namespace) -> Callable[..., Awaitable[Any]]:
    import datetime

    from proxy.lab.spiffe_ca import LabCa
    from proxy.lab.workload import Issuer, serve_workload_api

    try:
        ca = LabCa.create(options.trust_domain)
    except IdentityError as exc:
        raise _UsageError(f"--trust-domain: {exc}") from None
    sockets = dict(options.socket)
    lifetime = datetime.timedelta(seconds=options.svid_lifetime)
    issuer = Issuer(ca, tuple(sorted(set(sockets.values()))), lifetime)
    rotate = options.rotate or options.svid_lifetime / 2
    return partial(serve_workload_api, issuer, sockets, rotate=rotate)


_COMMANDS = {
    "spire": (_spire_parser, _spire_task),
    "ipam": (_ipam_parser, _ipam_task),
    "nsp": (_nsp_parser, _nsp_task),
    "nsm": (_nsm_parser, _nsm_task),
    "lb": (_lb_parser, _lb_task),
    "target": (_target_parser, _target_task),
}


def main(argv: list[str]) -> int:
    """`meridio-proxy lab ARGV...`; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE, file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    command, args = argv[0], argv[1:]
    if command in _TOPOLOGY_COMMANDS:
        from proxy.lab.topology_cli import main as topology_main

        return topology_main(command, args)
    if command not in _COMMANDS:
        print(_USAGE, file=sys.stderr)
        print(f"{PROG}: error: unknown subcommand {command!r}", file=sys.stderr)
        return EXIT_USAGE
    make_parser, make_task = _COMMANDS[command]
    prog = f"{PROG} {command}"
    try:
        options = make_parser().parse_args(args)
        task = make_task(options)
    except (_UsageError, LayoutError) as exc:
        print(f"{prog}: error: {exc} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    log.setup(options.log_level, options.log_format)
    spiffe_socket = getattr(options, "spiffe_socket", None)
    status, message = trio.run(_serve_until_signal, command, task, spiffe_socket)
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return status
