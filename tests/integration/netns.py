"""Throw-away network namespaces for kernel tests: made with `ip`, removed by exact name."""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")
    return result.stdout


def ip_json(*args: str, netns: str | None = None) -> Any:
    out = ip("-j", *args, netns=netns)
    return json.loads(out) if out.strip() else []


def sysctl(netns: str, name: str, value: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{name}={value}"],
        check=True,
        timeout=30,
    )


MADE: list[str] = []  # every namespace `namespaces()` made in this process, for leak checks


@contextmanager
def namespaces(*roles: str) -> Iterator[dict[str, str]]:
    """Namespaces `mp-<role>-<random>`, deleted whatever happens (deleting a namespace takes
    its links with it)."""
    token = secrets.token_hex(3)
    names = {role: f"mp-{role}-{token}" for role in roles}
    made: list[str] = []
    try:
        for name in names.values():
            ip("netns", "add", name)
            made.append(name)
            MADE.append(name)
            ip("link", "set", "lo", "up", netns=name)
        yield names
    finally:
        for name in made:
            ip("netns", "del", name, check=False)


def veth(netns_a: str, name_a: str, netns_b: str, name_b: str) -> None:
    """A veth pair with one end in each namespace, both up."""
    ip(
        "link",
        "add",
        name_a,
        "type",
        "veth",
        "peer",
        "name",
        name_b,
        "netns",
        netns_b,
        netns=netns_a,
    )
    ip("link", "set", name_a, "up", netns=netns_a)
    ip("link", "set", name_b, "up", netns=netns_b)
