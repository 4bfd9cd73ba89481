"""The sysctls the proxy's network namespace needs: check them, set the wrong ones, say what failed.

Upstream's process sets none; a privileged init container does (behaviour reference §2.6). The
proxy checks them itself at start, because a namespace without them fails quietly: no forwarding
(targets' egress goes nowhere), L3-only ECMP hashing (every flow between two hosts on one LB),
DAD holding the bridge's IPv6 address back, or rp_filter dropping traffic that arrives on the
bridge from a VIP the kernel has no route back to.

`/proc/sys/net` shows the network namespace of the *thread* that opens the file, not the
process's, so `ensure` must run on a thread inside the proxy's namespace: the netlink worker's
(`await worker.call(lambda ipr: ensure(families))`), or `ensure_and_log`, which does exactly that.

The pure part (`REQUIRED`, `required`, `check`, `ensure` with injected read/write) has no I/O;
`read_proc` and `write_proc` are the only functions that touch /proc/sys.
"""

from __future__ import annotations

import errno as _errno
import os
from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING

import attrs
from loguru import logger

from proxy.kernel.model import FAMILIES, Family

if TYPE_CHECKING:
    from proxy.kernel.netlink import NetlinkWorker

__all__ = [
    "GRANT_HINT",
    "PROC_SYS",
    "REQUIRED",
    "Mismatch",
    "Outcome",
    "Report",
    "Result",
    "Sysctl",
    "check",
    "describe_error",
    "ensure",
    "ensure_and_log",
    "log_report",
    "path_of",
    "read_proc",
    "required",
    "write_proc",
]

PROC_SYS = "/proc/sys"
GRANT_HINT = (
    "set it in the pod's init container (privileged) or in securityContext.sysctls "
    "(the kubelet must allow it with --allowed-unsafe-sysctls)"
)

Read = Callable[[str], str | None]
Write = Callable[[str, str], None]


@attrs.frozen
class Sysctl:
    name: str  # dotted, as sysctl(8) spells it
    value: str  # the value the proxy needs
    family: Family
    why: str  # one short reason, shown to users when it cannot be set


REQUIRED: tuple[Sysctl, ...] = (
    Sysctl(
        "net.ipv4.conf.all.forwarding",
        "1",
        Family.V4,
        "targets' IPv4 traffic is routed through the proxy to the load-balancers",
    ),
    Sysctl(
        "net.ipv4.fib_multipath_hash_policy",
        "1",
        Family.V4,
        "ECMP over the load-balancers must hash on ports (L4), or each pair of hosts sticks "
        "to one LB",
    ),
    Sysctl(
        "net.ipv4.conf.all.rp_filter",
        "0",
        Family.V4,
        "reverse-path filtering drops VIP-sourced packets from targets",
    ),
    Sysctl(
        "net.ipv4.conf.default.rp_filter",
        "0",
        Family.V4,
        "new interfaces (bridge0, its ports) inherit it; reverse-path filtering drops "
        "VIP-sourced packets",
    ),
    Sysctl(
        "net.ipv6.conf.all.forwarding",
        "1",
        Family.V6,
        "targets' IPv6 traffic is routed through the proxy to the load-balancers",
    ),
    Sysctl(
        "net.ipv6.fib_multipath_hash_policy",
        "1",
        Family.V6,
        "ECMP over the load-balancers must hash on ports (L4), or each pair of hosts sticks "
        "to one LB",
    ),
    Sysctl(
        "net.ipv6.conf.all.accept_dad",
        "0",
        Family.V6,
        "duplicate address detection holds IPv6 addresses back (tentative) for seconds",
    ),
    Sysctl(
        "net.ipv6.conf.default.accept_dad",
        "0",
        Family.V6,
        "new interfaces inherit it: the effective DAD mode is the larger of 'all' and the "
        "interface's own",
    ),
)


def required(families: Iterable[Family] = FAMILIES) -> tuple[Sysctl, ...]:
    """The sysctls needed for `families` (an IPv4-only proxy does not need the IPv6 ones)."""
    wanted = set(families)
    return tuple(sysctl for sysctl in REQUIRED if sysctl.family in wanted)


def path_of(name: str, root: str = PROC_SYS) -> str:
    """`net.ipv4.conf.all.forwarding` -> `/proc/sys/net/ipv4/conf/all/forwarding`."""
    return os.path.join(root, *name.split("."))


def _same(found: str | None, wanted: str) -> bool:
    # Multi-field sysctls read back tab-separated; compare field by field.
    return found is not None and found.split() == wanted.split()


# -- the check (pure) ----------------------------------------------------------------------------


@attrs.frozen
class Mismatch:
    sysctl: Sysctl
    found: str | None  # None: could not be read (absent in this kernel, IPv6 disabled, ...)


def check(read: Read, families: Iterable[Family] = FAMILIES) -> list[Mismatch]:
    """The required sysctls whose value (as `read` returns it) is not the needed one."""
    mismatches = []
    for sysctl in required(families):
        found = read(sysctl.name)
        if not _same(found, sysctl.value):
            mismatches.append(Mismatch(sysctl, found))
    return mismatches


# -- ensure: read, write the wrong ones, report ---------------------------------------------------


class Outcome(Enum):
    ALREADY = "already right"
    SET = "set"
    FAILED = "could not set"


@attrs.frozen
class Result:
    sysctl: Sysctl
    outcome: Outcome
    found: str | None  # the value before any write (None: unreadable)
    error: str | None = None  # why it could not be set: "EROFS: Read-only file system"


@attrs.frozen
class Report:
    results: tuple[Result, ...]

    def _with(self, outcome: Outcome) -> list[Result]:
        return [result for result in self.results if result.outcome is outcome]

    @property
    def fixed(self) -> list[Result]:
        return self._with(Outcome.SET)

    @property
    def already(self) -> list[Result]:
        return self._with(Outcome.ALREADY)

    @property
    def failed(self) -> list[Result]:
        return self._with(Outcome.FAILED)

    @property
    def ok(self) -> bool:
        return not self.failed


def describe_error(error: OSError) -> str:
    """`EROFS: Read-only file system` (the errno's name first: it is what people search for)."""
    if error.errno is None:
        return str(error)
    name = _errno.errorcode.get(error.errno, f"errno {error.errno}")
    return f"{name}: {error.strerror or os.strerror(error.errno)}"


def read_proc(name: str, root: str = PROC_SYS) -> str | None:
    """The value of a sysctl in the calling thread's network namespace; None when unreadable."""
    try:
        with open(path_of(name, root)) as file:
            return file.read().strip()
    except OSError:
        return None


def write_proc(name: str, value: str, root: str = PROC_SYS) -> None:
    """Write a sysctl in the calling thread's network namespace; raises OSError."""
    with open(path_of(name, root), "w") as file:
        file.write(value + "\n")


def ensure(
    families: Iterable[Family] = FAMILIES,
    *,
    read: Read = read_proc,
    write: Write = write_proc,
) -> Report:
    """Set every wrong sysctl of `families`, and report what was set, right, or not settable.

    With the default read/write it must run on a thread inside the proxy's namespace. A write
    counts only when the value reads back right afterwards.
    """
    results = []
    for sysctl in required(families):
        found = read(sysctl.name)
        if _same(found, sysctl.value):
            results.append(Result(sysctl, Outcome.ALREADY, found))
            continue
        if found is None:
            error = "ENOENT: not present (this kernel or namespace does not have it)"
            results.append(Result(sysctl, Outcome.FAILED, found, error))
            continue
        try:
            write(sysctl.name, sysctl.value)
        except OSError as exc:
            results.append(Result(sysctl, Outcome.FAILED, found, describe_error(exc)))
            continue
        after = read(sysctl.name)
        if _same(after, sysctl.value):
            results.append(Result(sysctl, Outcome.SET, found))
        else:
            error = f"the write was accepted but it reads back {after!r}"
            results.append(Result(sysctl, Outcome.FAILED, found, error))
    return Report(tuple(results))


# -- at start: ensure on the worker's thread and log the outcome once --------------------------


def log_report(report: Report) -> None:
    """One INFO line with what was set, and one WARNING line for each sysctl left wrong."""
    fixed = ",".join(f"{r.sysctl.name}={r.sysctl.value}" for r in report.fixed) or "none"
    logger.info(
        "sysctls checked",
        set=fixed,
        already_right=len(report.already),
        not_set=len(report.failed),
    )
    for result in report.failed:
        sysctl = result.sysctl
        logger.warning(
            "sysctl is wrong and could not be set",
            sysctl=sysctl.name,
            found="(unreadable)" if result.found is None else result.found,
            needed=sysctl.value,
            why=sysctl.why,
            error=result.error,
            fix=f"{GRANT_HINT}: {sysctl.name}={sysctl.value}",
        )


async def ensure_and_log(worker: NetlinkWorker, families: Iterable[Family]) -> Report:
    """What the app calls at start: ensure the sysctls inside the worker's namespace, log once."""
    wanted = tuple(families)
    report = await worker.call(lambda _ipr: ensure(wanted))
    log_report(report)
    return report
