"""The lab topology's state file, and taking down everything it records (also after a crash).

Every namespace name is written to the state file *before* the namespace is made, and every
process's pid (with its start time, so a recycled pid is never mistaken for ours) right after it
is spawned. `reclaim` needs nothing else: it stops exactly those processes, deletes exactly those
namespaces (which takes every link in them along), removes the recorded paths and the work
directory, and the state file last. It never looks for things by pattern, and it is idempotent:
a thing already gone is skipped.

The file is `<state dir>/<name>.json` (default state dir `/run/meridio-proxy-lab`, or
`$MERIDIO_PROXY_LAB_DIR`); the work directory with the peers' sockets, databases and logs is
`<state dir>/<name>/`. The file is replaced atomically (write, fsync, rename) on every change.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import attrs
import cattrs

__all__ = [
    "DEFAULT_STATE_DIR",
    "NAME_PATTERN",
    "LabState",
    "LbRecord",
    "ProcessRecord",
    "StateError",
    "TargetRecord",
    "default_state_dir",
    "leftovers",
    "netns_exists",
    "process_alive",
    "process_state",
    "reclaim",
    "start_time",
]

DEFAULT_STATE_DIR = Path("/run/meridio-proxy-lab")
STATE_DIR_VARIABLE = "MERIDIO_PROXY_LAB_DIR"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
FORMAT = 1
TERM_GRACE = 3.0  # SIGTERM, then SIGKILL after this long
KILL_WAIT = 3.0
PEER_ROLES = ("spire", "ipam", "nsp", "nsm")


class StateError(Exception):
    """No such lab, or a state file that cannot be read."""


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_VARIABLE) or DEFAULT_STATE_DIR)


@attrs.define
class ProcessRecord:
    pid: int
    start_time: int  # /proc/<pid>/stat field 22: tells a recycled pid apart
    argv: list[str]
    log: str
    netns: str | None = None


@attrs.define
class LbRecord:
    index: int
    name: str
    netns: str | None  # None once the namespace was deleted
    outside: dict[int, str]  # IP version -> the LB's address on its outside link
    advertised: bool = False  # the outside host routes the VIPs through it
    conduit: list[str] = attrs.field(factory=list)  # its conduit addresses, as last seen


@attrs.define
class TargetRecord:
    index: int
    name: str
    netns: str | None
    vips: list[str]  # address/length
    addresses: dict[int, str] = attrs.field(factory=dict)  # version -> node-subnet address


@attrs.define
class LabState:
    name: str
    state_dir: str
    phase: str = "creating"  # creating, up, failed
    created: float = attrs.field(factory=time.time)
    lab_pid: int = attrs.field(factory=os.getpid)
    format: int = FORMAT
    spec: dict[str, Any] = attrs.field(factory=dict)
    namespaces: dict[str, str] = attrs.field(factory=dict)  # role -> namespace name
    processes: dict[str, ProcessRecord] = attrs.field(factory=dict)  # role -> process
    paths: list[str] = attrs.field(factory=list)  # more to remove (a killed proxy's socket dir)
    lbs: dict[int, LbRecord] = attrs.field(factory=dict)
    targets: dict[int, TargetRecord] = attrs.field(factory=dict)

    @property
    def file(self) -> Path:
        return Path(self.state_dir) / f"{self.name}.json"

    @property
    def directory(self) -> Path:
        """The work directory: sockets, databases, configuration and logs."""
        return Path(self.state_dir) / self.name

    def save(self) -> None:
        data = json.dumps(_converter.unstructure(self), indent=2, sort_keys=True)
        temporary = self.file.with_suffix(".json.tmp")
        with open(temporary, "w") as file:
            file.write(data + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.file)

    @classmethod
    def load(cls, name: str, state_dir: Path | None = None) -> LabState:
        directory = state_dir or default_state_dir()
        path = directory / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise StateError(f"no lab named {name!r} ({path} does not exist)") from None
        except (OSError, ValueError) as exc:
            raise StateError(f"cannot read {path}: {exc}") from None
        try:
            state = _converter.structure(data, cls)
        except Exception as exc:
            raise StateError(f"{path} is not a lab state file: {exc}") from None
        state.state_dir = str(directory)  # the file may have been moved with its directory
        return state


_converter = cattrs.Converter()


# -- processes -----------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot); None when there is no such process or
    it is a zombie (dead, waiting for its parent)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_state(pid: int) -> str | None:
    """The state letter of `pid` (R, S, T for stopped, Z, ...); None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2]


def process_alive(record: ProcessRecord) -> bool:
    """The recorded process still runs (and is the one we started, not a recycled pid)."""
    return start_time(record.pid) == record.start_time


def _reap(pid: int) -> None:
    """Collect a dead child of ours (a zombie otherwise); not our child: nothing to do."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(record: ProcessRecord, signum: int) -> None:
    if process_alive(record):
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signum)


def stop_processes(records: list[ProcessRecord], grace: float = TERM_GRACE) -> list[int]:
    """SIGTERM (and SIGCONT, for a frozen one), SIGKILL what still runs after `grace`; the pids
    that would not die."""
    for record in records:
        _signal(record, signal.SIGTERM)
        _signal(record, signal.SIGCONT)
    for signum, wait in ((signal.SIGKILL, grace), (None, KILL_WAIT)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            for record in records:
                _reap(record.pid)
            if not any(process_alive(record) for record in records):
                return []
            time.sleep(0.05)
        if signum is not None:
            for record in records:
                _signal(record, signum)
    return [record.pid for record in records if process_alive(record)]


# -- namespaces ----------------------------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def delete_netns(name: str) -> str | None:
    """Delete a named namespace; None when done or already gone, else why not."""
    if not netns_exists(name):
        return None
    result = subprocess.run(
        ["ip", "netns", "del", name], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0 and netns_exists(name):
        return result.stderr.strip() or f"ip netns del {name}: status {result.returncode}"
    return None


def _remove_path(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise


def leftovers(state: LabState) -> list[str]:
    """What of the lab `state` records still exists: namespaces, processes, files."""
    left = [f"namespace {name}" for name in state.namespaces.values() if netns_exists(name)]
    left += [f"{role} (pid {p.pid})" for role, p in state.processes.items() if process_alive(p)]
    paths = [str(state.file), str(state.directory), *state.paths]
    return left + [path for path in paths if os.path.exists(path)]


def reclaim(state: LabState) -> list[str]:
    """Take down everything `state` records; the problems left (empty: nothing is left)."""
    problems = []
    # The peers last: the others talk to them while they stop (unregister, close connections).
    peers = [p for role, p in state.processes.items() if role in PEER_ROLES]
    others = [p for role, p in state.processes.items() if role not in PEER_ROLES]
    stubborn = stop_processes(others) + stop_processes(peers)
    problems += [f"process {pid} would not die" for pid in stubborn]
    for name in state.namespaces.values():
        problem = delete_netns(name)
        if problem:
            problems.append(f"namespace {name}: {problem}")
    for path in [*state.paths, str(state.directory)]:
        try:
            _remove_path(Path(path))
        except OSError as exc:
            problems.append(f"{path}: {exc}")
    if not problems:
        with contextlib.suppress(FileNotFoundError):
            state.file.unlink()
        with contextlib.suppress(FileNotFoundError):
            state.file.with_suffix(".json.tmp").unlink()
    return problems
