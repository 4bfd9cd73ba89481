"""`meridio-proxy lab up|down|status|demo`: the lab topology from the command line.

    meridio-proxy lab up [--name NAME] [--lbs N] [--targets M] [--ipv4-only | --ipv6-only]
    meridio-proxy lab status [--name NAME] [--json]
    meridio-proxy lab down [--name NAME]
    meridio-proxy lab demo [--lbs N] [--targets M] [--udp F] [--tcp C]

Exit status: 0 done (demo: every check held); 1 failed (demo: a check failed), with a message;
2 bad usage. `up` leaves the lab running (its processes outlive the command); `down` takes away
what the state file records, also after a crash, and does nothing when there is nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NoReturn

import trio
from loguru import logger

from proxy.lab.state import STATE_DIR_VARIABLE, StateError, default_state_dir
from proxy.lab.topology import Topology, TopologyError, TopologySpec

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PROG = "meridio-proxy lab"
COMMANDS = ("up", "down", "status", "demo")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 200:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 200")
    return int(text)


def _flows(text: str) -> int:
    if not text.isdigit() or int(text) > 5000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 0 to 5000")
    return int(text)


def _common(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument(
        "--name",
        default=default_name,
        metavar="NAME",
        help=f"the lab's name, part of its namespace names mp-NAME-* (default: {default_name})",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help=f"where state files and work directories live (default: ${STATE_DIR_VARIABLE} or"
        " /run/meridio-proxy-lab)",
    )


def _shape(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lbs", type=_count, default=2, metavar="N", help="LBs (default: 2)")
    parser.add_argument(
        "--targets", type=_count, default=2, metavar="M", help="targets (default: 2)"
    )
    family = parser.add_mutually_exclusive_group()
    family.add_argument("--ipv4-only", action="store_true", help="IPv4 only (default: dual)")
    family.add_argument("--ipv6-only", action="store_true", help="IPv6 only (default: dual)")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="plain text everywhere (the proxy with NSM_IDENTITY=insecure); default: mutual TLS"
        " with SVIDs from the lab's own Workload API",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up (and take down what was made) after this long (default: 60)",
    )


def _parser(command: str) -> _Parser:
    about = {
        "up": "Make the lab: namespaces for the proxy, the LBs, the targets and an outside host,"
        " the peers (a SPIFFE Workload API, IPAM, NSP, NSM with the kernel forwarder) as"
        " processes, the real proxy, all on mutual TLS unless --insecure;"
        " wait until the proxy is ready and every target has its addresses, then print what was"
        " made. On failure, take it down again and say why.",
        "down": "Take down everything the lab's state file records (processes, namespaces,"
        " files), also after a crash of whatever made it. Nothing to take down is not an error.",
        "status": "Print the lab's processes, the proxy's health, its bridge ports, nexthop"
        " groups and VIP rules, the LBs and targets with their addresses.",
        "demo": "Bring a lab up, send TCP and UDP flows from every target's VIPs to the outside"
        " host, show how they spread over the LBs, stop one LB and show its flows moving and"
        " no other flow moving, bring it back, take the lab down. Exit 0 only if every check"
        " held.",
    }[command]
    parser = _Parser(prog=f"{PROG} {command}", description=about, allow_abbrev=False)
    _common(parser, "demo" if command == "demo" else "lab")
    if command in ("up", "demo"):
        _shape(parser)
    if command == "status":
        parser.add_argument("--json", action="store_true", help="one JSON document, for programs")
    if command == "demo":
        parser.add_argument(
            "--udp", type=_flows, default=200, metavar="F",
            help="UDP flows per target and family (default: 200)",
        )  # fmt: skip
        parser.add_argument(
            "--tcp", type=_flows, default=50, metavar="C",
            help="TCP connections per target and family (default: 50)",
        )  # fmt: skip
    return parser


def _spec(options: argparse.Namespace, proxy_env: dict[str, str] | None = None) -> TopologySpec:
    families = (4,) if options.ipv4_only else (6,) if options.ipv6_only else (4, 6)
    return TopologySpec(
        name=options.name,
        lbs=options.lbs,
        targets=options.targets,
        families=families,
        state_dir=options.state_dir,
        timeout=options.timeout,
        proxy_env=proxy_env or {},
        secure=not options.insecure,
    )


def _quiet_logs() -> None:
    # The lab's own modules log through loguru; a person reading tables wants warnings only.
    logger.remove()
    logger.add(sys.stderr, level="WARNING", format="{level}: {message}")


def _err(command: str, message: str) -> None:
    print(f"{PROG} {command}: {message}", file=sys.stderr)


async def _up(options: argparse.Namespace) -> int:
    from proxy.lab.status import collect, render

    spec = _spec(options)
    try:
        topology = await Topology.up(spec, progress=lambda line: print(line, file=sys.stderr))
    except TopologyError as exc:
        _err("up", f"failed: {exc}")
        return EXIT_FAILED
    print(render(await collect(topology)))
    print(f"\ntake it down with: meridio-proxy lab down --name {spec.name}")
    return EXIT_OK


async def _down(options: argparse.Namespace) -> int:
    try:
        topology = Topology.load(options.name, options.state_dir)
    except StateError as exc:
        print(f"nothing to take down: {exc}")
        return EXIT_OK
    try:
        await topology.down()
    except TopologyError as exc:
        _err("down", str(exc))
        return EXIT_FAILED
    print(f"lab {options.name!r} is down")
    return EXIT_OK


async def _status(options: argparse.Namespace) -> int:
    from proxy.lab.status import collect, render

    try:
        topology = Topology.load(options.name, options.state_dir)
    except StateError as exc:
        _err("status", str(exc))
        return EXIT_FAILED
    document = await collect(topology)
    print(json.dumps(document, indent=2, sort_keys=True) if options.json else render(document))
    return EXIT_OK


async def _demo(options: argparse.Namespace) -> int:
    from proxy.lab.demo import DEMO_PROXY_ENV, run_demo

    spec = _spec(options, proxy_env=DEMO_PROXY_ENV)
    try:
        previous = Topology.load(spec.name, options.state_dir)
    except StateError:
        pass
    else:
        if not _alive(previous.state.lab_pid):  # a demo that was killed: its lab is ours to take
            print(f"a previous demo (pid {previous.state.lab_pid}) left its lab; taking it down")
            await previous.down()
    try:
        ok = await run_demo(spec, udp=options.udp, tcp=options.tcp, out=_print_flush)
    except TopologyError as exc:
        _err("demo", f"failed: {exc}")
        return EXIT_FAILED
    return EXIT_OK if ok else EXIT_FAILED


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _until_signal(
    run: Callable[[argparse.Namespace], Awaitable[int]], options: argparse.Namespace
) -> int:
    """`run`, cancelled by SIGTERM or SIGHUP as by Ctrl-C, so that what it made is taken down
    (`up` on failure, `demo` always) instead of being left behind by a killed process."""
    status: list[int] = []
    async with trio.open_nursery() as nursery:

        async def body() -> None:
            status.append(await run(options))
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    _err(options.command, f"{signal.Signals(signum).name}: stopping")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch)
        nursery.start_soon(body)
    return status[0] if status else EXIT_FAILED


def _print_flush(line: str) -> None:
    print(line, flush=True)


def main(command: str, argv: list[str]) -> int:
    """`meridio-proxy lab COMMAND ARGV...` for the topology commands; the exit status."""
    try:
        options = _parser(command).parse_args(argv)
    except _UsageError as exc:
        _err(command, f"error: {exc} (see --help)")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        if command in ("up", "demo"):
            _spec(options)  # a bad name is a usage error, before anything is made
    except ValueError as exc:
        _err(command, f"error: {exc}")
        return EXIT_USAGE
    _quiet_logs()
    if options.state_dir is None:
        options.state_dir = default_state_dir()
    options.command = command
    run = {"up": _up, "down": _down, "status": _status, "demo": _demo}[command]
    try:
        return trio.run(_until_signal, run, options)
    except KeyboardInterrupt:
        _err(command, "interrupted")
        return EXIT_FAILED
