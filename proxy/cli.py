"""Command line: `meridio-proxy [--help | --version]` runs the proxy; subcommands probe/debug/lab.

The run mode takes its configuration from `NSM_*` environment variables only (as upstream); the
flags are upstream's, in both Go spellings (`-version` and `--version`). Subcommands are picked
from argv[0] before argparse sees anything, so each owns its own flags.
"""

import argparse
import os
import sys
import textwrap
from functools import partial
from typing import NoReturn

import proxy
from proxy import config

PROG = "meridio-proxy"
WIDTH = 100

_ABOUT = """\
The Meridio proxy: one per node and conduit. It owns the node's subnet from IPAM, builds bridge0,
keeps an NSM connection to every load-balancer of its conduit, serves the targets of its node as
the NSM endpoint proxy.<conduit>.<trench>.<namespace>, and routes their egress from each VIP over
the load-balancers. It reports its health over the gRPC health protocol.

It takes no arguments: it is configured by the environment variables below."""

_COMMANDS = """\
subcommands:
  probe   check the health of a running proxy (for Kubernetes exec probes); see `probe --help`
  debug   print the network state of the proxy's namespace as JSON; see `debug --help`
  lab     the lab without Kubernetes: its peers (`lab ipam|nsp|nsm|lb|target`) or the
          whole topology (`lab up|down|status|demo`); see `lab --help`

options:
  -h, --help     print this help and exit
  --version      print the version and exit
  (Go's single-dash spellings -help and -version work too)"""

_SIGNALS = """\
signals:
  SIGTERM, SIGINT, SIGQUIT  stop gracefully within NSM_SHUTDOWN_TIMEOUT
  SIGHUP                    re-read NSM_CONFIG_FILE; apply the variables marked [SIGHUP]
  SIGUSR1                   set the log level back to NSM_LOG_LEVEL
  SIGUSR2                   set the log level to TRACE"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise _UsageError(message)


def _parser() -> _Parser:
    parser = _Parser(prog=PROG, add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", "-help", action="store_true")
    parser.add_argument("--version", "-version", action="store_true")
    parser.add_argument("--debug", "-debug", action="store_true")  # upstream's, = `debug`
    parser.usage = f"{PROG} [-h | --help] [--version]\n       {PROG} {{probe,debug,lab}} ..."
    return parser


def _variable_help(var: config.Var) -> str:
    name = var.env + (f", or {var.alt}" if var.alt else "")
    default = "required" if var.required else f"default: {var.default or '(empty)'}"
    head = f"  {name}  ({var.kind}; {default})" + ("  [SIGHUP]" if var.reloadable else "")
    body = textwrap.fill(var.help, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return f"{head}\n{body}"


def help_text() -> str:
    """The `--help` text: what the program is, then every variable from the config metadata."""
    intro = (
        "environment variables (a variable set to an empty value is an error: unset it to get "
        "the default; [SIGHUP] marks what SIGHUP applies at once, the others wait for a "
        "restart):"
    )
    variables = "\n".join(_variable_help(var) for var in config.variables())
    return "\n\n".join(
        [
            _parser().format_usage().rstrip(),
            _ABOUT,
            _COMMANDS,
            textwrap.fill(intro, WIDTH) + "\n" + variables,
            _SIGNALS,
        ]
    )


def _not_implemented(command: str) -> int:
    print(f"{PROG} {command}: not implemented yet", file=sys.stderr)
    return 2


def _run() -> int:
    try:
        cfg = config.load_environment(os.environ)
    except config.ConfigError as exc:
        print(f"{PROG}: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    from proxy.app import main as app_main

    # SIGHUP re-reads with the same loader: the environment is fixed, NSM_CONFIG_FILE may change.
    return app_main(cfg, partial(config.load_environment, os.environ))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `meridio-proxy` and `python -m proxy`; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "probe":
        from proxy.probe import main as probe_main

        return probe_main(args[1:])
    if args and args[0] == "lab":
        from proxy.lab.cli import main as lab_main

        return lab_main(args[1:])
    if args and args[0] in ("debug", "--debug", "-debug"):  # the flags are upstream's
        from proxy.kernel.debug import main as debug_main

        return debug_main(args[1:])
    try:
        options = _parser().parse_args(args)
    except _UsageError:
        return 2
    if options.help:
        print(help_text())
        return 0
    if options.version:
        print(f"{PROG} {proxy.__version__}")
        return 0
    if options.debug:  # `--debug` after other flags
        from proxy.kernel.debug import main as debug_main

        return debug_main([])
    return _run()
