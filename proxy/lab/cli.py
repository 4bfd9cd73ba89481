"""`meridio-proxy lab ...`: the peers the proxy talks to, as processes, for running it without
Kubernetes.

    meridio-proxy lab ipam --listen unix:///tmp/lab/ipam.sock --db /tmp/lab/ipam.db
    meridio-proxy lab nsp --listen unix:///tmp/lab/nsp.sock --config trench.yaml

Each serves until SIGTERM or SIGINT (exit 0, its socket file removed). Bad arguments, an invalid
configuration file or a database made with other settings: exit 2 with a one-line message.
Cannot listen: exit 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
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
from proxy.lab.nsp import DEFAULT_POLL_INTERVAL, serve_nsp
from proxy.lab.nsp_config import ConfigFileError
from proxy.rpc import Address, AddressError, parse_address

PROG = "meridio-proxy lab"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_USAGE = f"""\
usage: {PROG} {{ipam,nsp}} [options]   (each has --help)

  ipam   the IPAM service (ipam.v1.Ipam): node subnets and addresses, kept in SQLite
  nsp    the NSP configuration service (nsp.v1.ConfigurationManager), from a YAML/JSON file"""
_LATER = "nsm, up, down, status, demo"


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
    parser.add_argument(
        "--listen",
        required=True,
        type=_listen_address,
        metavar="ADDRESS",
        help="unix:///path or host:port ([v6]:port, :port for every address)",
    )
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
    parser.add_argument(
        "--listen",
        required=True,
        type=_listen_address,
        metavar="ADDRESS",
        help="unix:///path or host:port ([v6]:port, :port for every address)",
    )
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
    _add_logging(parser)
    return parser


# -- running ---------------------------------------------------------------------------------------


async def _serve_until_signal(
    name: str, start: Callable[..., Awaitable[Any]]
) -> tuple[int, str | None]:
    """Run `start` (a task for `nursery.start`) until SIGTERM/SIGINT; (exit status, message
    for stderr when it could not start)."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
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


_COMMANDS = {"ipam": (_ipam_parser, _ipam_task), "nsp": (_nsp_parser, _nsp_task)}


def main(argv: list[str]) -> int:
    """`meridio-proxy lab ARGV...`; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE, file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    command, args = argv[0], argv[1:]
    if command not in _COMMANDS:
        print(_USAGE, file=sys.stderr)
        print(
            f"{PROG}: error: unknown subcommand {command!r} ({_LATER}: not implemented yet)",
            file=sys.stderr,
        )
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
    status, message = trio.run(_serve_until_signal, command, task)
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return status
