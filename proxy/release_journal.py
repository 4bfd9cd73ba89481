"""The IPAM releases still owed, in a file that outlives the proxy process.

A target that leaves gets its addresses released `NSM_IP_RELEASE_DELAY` later (20 s by
default). A proxy killed in that window (OOM, a failed liveness probe, SIGKILL) used to forget
the release, and IPAM kept the addresses until its garbage collector reaped them (up to 2 h 40 m
with its defaults). The IPAM client writes here every release it owes (the connection key and
when it is due, wall clock) and forgets it once done, or once the key is wanted again; the next
instance starts by doing what is left. The file lives in `NSM_STATE_DIR` (`/tmp`, an emptyDir
in the manifests, which container restarts keep).

The file is replaced atomically (a temporary file renamed over it), and removed when nothing is
owed. One that cannot be read is logged and set aside: the releases in it are lost, as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from loguru import logger

VERSION = 1


def journal_text(owed: Mapping[str, float]) -> str:
    """The file's content: the keys owed a release, each with its due time (wall clock)."""
    return json.dumps({"version": VERSION, "releases": dict(sorted(owed.items()))}, indent=1)


def parse_journal(text: str) -> dict[str, float]:
    """The releases a journal holds; ValueError naming what is wrong."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} release journal")
    releases = data.get("releases")
    if not isinstance(releases, dict):
        raise ValueError("no releases object")
    owed: dict[str, float] = {}
    for key, due in releases.items():
        if not key or isinstance(due, bool) or not isinstance(due, int | float):
            raise ValueError(f"bad entry {key!r}: {due!r}")
        owed[key] = float(due)
    return owed


class ReleaseJournal:
    """The file `path`; I/O errors are logged, never raised (the releases go on in memory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    def load(self) -> dict[str, float]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            logger.warning("release journal unreadable", path=str(self.path), reason=str(exc))
            return {}
        try:
            return parse_journal(text)
        except ValueError as exc:
            aside = self.path.with_name(self.path.name + ".bad")
            logger.warning("release journal set aside", path=str(aside), reason=str(exc))
            try:
                os.replace(self.path, aside)
            except OSError as error:  # (then it is overwritten at the next save)
                logger.warning("release journal not set aside", reason=str(error))
            return {}

    def save(self, owed: Mapping[str, float]) -> None:
        try:
            if not owed:
                self.path.unlink(missing_ok=True)
            else:
                temporary = self.path.with_name(self.path.name + ".tmp")
                temporary.write_text(journal_text(owed))
                os.replace(temporary, self.path)
        except OSError as exc:
            if not self._failing:  # once per spell of failures, not once per release
                logger.warning("release journal not written", path=str(self.path),
                               reason=str(exc))  # fmt: skip
            self._failing = True
        else:
            self._failing = False
