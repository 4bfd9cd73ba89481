"""The lab IPAM's storage: SQLite (stdlib), one small synchronous statement per step.

Tables, all keyed by trench and family:

* `layout`   how the trench prefix of a family is carved; a database refuses to be reopened with
             another layout for the same trench (its prefixes would no longer add up);
* `conduit`  the conduit prefix given to each conduit;
* `node`     the node prefix given to each (conduit, node);
* `child`    one address per (conduit, node, child name), with the time it was last allocated.

The calls are sub-millisecond (WAL journal, `synchronous=NORMAL`: a commit is not an fsync, a
crash of the process loses nothing, a power loss may lose the last commits, which a lab can
afford), so they run on the trio thread; `transaction()` groups the steps of one request.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

from proxy.lab.ipam_alloc import Address, Family, FamilyLayout, Network

_SCHEMA = """
CREATE TABLE IF NOT EXISTS layout (
    trench TEXT NOT NULL, family INTEGER NOT NULL, prefix TEXT NOT NULL,
    conduit_length INTEGER NOT NULL, node_length INTEGER NOT NULL,
    PRIMARY KEY (trench, family)
);
CREATE TABLE IF NOT EXISTS conduit (
    trench TEXT NOT NULL, family INTEGER NOT NULL, conduit TEXT NOT NULL, prefix TEXT NOT NULL,
    PRIMARY KEY (trench, family, conduit), UNIQUE (trench, family, prefix)
);
CREATE TABLE IF NOT EXISTS node (
    trench TEXT NOT NULL, family INTEGER NOT NULL, conduit TEXT NOT NULL, node TEXT NOT NULL,
    prefix TEXT NOT NULL,
    PRIMARY KEY (trench, family, conduit, node), UNIQUE (trench, family, prefix)
);
CREATE TABLE IF NOT EXISTS child (
    trench TEXT NOT NULL, family INTEGER NOT NULL, conduit TEXT NOT NULL, node TEXT NOT NULL,
    name TEXT NOT NULL, address TEXT NOT NULL, offset INTEGER NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (trench, family, conduit, node, name),
    UNIQUE (trench, family, conduit, node, offset)
);
CREATE INDEX IF NOT EXISTS child_updated_at ON child (updated_at);
"""


class StoreError(Exception):
    """The database cannot be used as asked; the message says why."""


@attrs.frozen
class ChildKey:
    """What names one allocation: Meridio's (trench, conduit, node, family, child name)."""

    trench: str
    conduit: str
    node: str
    family: Family
    name: str


@attrs.frozen
class ChildRecord:
    key: ChildKey
    address: Address
    updated_at: float


class IpamStore:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection

    @classmethod
    def open(cls, path: str) -> IpamStore:
        """Open (creating if needed) the database at `path`; `:memory:` for a private one."""
        try:
            connection = sqlite3.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            connection.close()
            raise StoreError(f"cannot use database {path}: {exc}") from None
        return cls(connection)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit: committed at the end, rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- layout --------------------------------------------------------------------------------

    def check_layout(self, trench: str, layout: FamilyLayout) -> None:
        """Record the layout of a trench's family, or check it is the one recorded."""
        row = self._db.execute(
            "SELECT prefix, conduit_length, node_length FROM layout WHERE trench=? AND family=?",
            (trench, layout.family),
        ).fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO layout VALUES (?, ?, ?, ?, ?)",
                (
                    trench,
                    layout.family,
                    str(layout.prefix),
                    layout.conduit_length,
                    layout.node_length,
                ),
            )
            return
        stored = FamilyLayout(ipaddress.ip_network(row[0]), row[1], row[2])
        if stored != layout:
            raise StoreError(
                f"the database holds trench {trench} with IPv{layout.family} prefix"
                f" {stored.describe()}, not {layout.describe()}: use the same settings or"
                " another database"
            )

    # -- conduit and node prefixes -------------------------------------------------------------

    def conduit_prefix(self, trench: str, family: Family, conduit: str) -> Network | None:
        return self._prefix(
            "SELECT prefix FROM conduit WHERE trench=? AND family=? AND conduit=?",
            (trench, family, conduit),
        )

    def conduit_prefixes(self, trench: str, family: Family) -> list[Network]:
        return self._prefixes(
            "SELECT prefix FROM conduit WHERE trench=? AND family=?", (trench, family)
        )

    def add_conduit(self, trench: str, family: Family, conduit: str, prefix: Network) -> None:
        self._db.execute(
            "INSERT INTO conduit VALUES (?, ?, ?, ?)", (trench, family, conduit, str(prefix))
        )

    def node_prefix(self, trench: str, family: Family, conduit: str, node: str) -> Network | None:
        return self._prefix(
            "SELECT prefix FROM node WHERE trench=? AND family=? AND conduit=? AND node=?",
            (trench, family, conduit, node),
        )

    def node_prefixes(self, trench: str, family: Family, conduit: str) -> list[Network]:
        return self._prefixes(
            "SELECT prefix FROM node WHERE trench=? AND family=? AND conduit=?",
            (trench, family, conduit),
        )

    def add_node(
        self, trench: str, family: Family, conduit: str, node: str, prefix: Network
    ) -> None:
        self._db.execute(
            "INSERT INTO node VALUES (?, ?, ?, ?, ?)", (trench, family, conduit, node, str(prefix))
        )

    # -- children ------------------------------------------------------------------------------

    def child_address(self, key: ChildKey) -> Address | None:
        row = self._db.execute(
            "SELECT address FROM child"
            " WHERE trench=? AND family=? AND conduit=? AND node=? AND name=?",
            _key_values(key),
        ).fetchone()
        return None if row is None else ipaddress.ip_address(row[0])

    def node_offsets(self, trench: str, family: Family, conduit: str, node: str) -> list[int]:
        """Where the addresses in use are in the node prefix (integers: no parsing)."""
        rows = self._db.execute(
            "SELECT offset FROM child WHERE trench=? AND family=? AND conduit=? AND node=?",
            (trench, family, conduit, node),
        )
        return [offset for (offset,) in rows]

    def add_child(self, key: ChildKey, address: Address, offset: int, updated_at: float) -> None:
        self._db.execute(
            "INSERT INTO child (trench, family, conduit, node, name, address, offset, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*_key_values(key), str(address), offset, updated_at),
        )

    def touch_child(self, key: ChildKey, updated_at: float) -> None:
        self._db.execute(
            "UPDATE child SET updated_at=?"
            " WHERE trench=? AND family=? AND conduit=? AND node=? AND name=?",
            (updated_at, *_key_values(key)),
        )

    def delete_child(self, key: ChildKey) -> Address | None:
        """Delete a child's record; the address it held, or None if there was none."""
        row = self._db.execute(
            "DELETE FROM child WHERE trench=? AND family=? AND conduit=? AND node=? AND name=?"
            " RETURNING address",
            _key_values(key),
        ).fetchone()
        return None if row is None else ipaddress.ip_address(row[0])

    def children(self) -> list[ChildRecord]:
        """Every record (for garbage collection, tests and debugging), oldest first."""
        rows = self._db.execute(
            "SELECT trench, family, conduit, node, name, address, updated_at FROM child"
            " ORDER BY updated_at"
        )
        return [_record(row) for row in rows]

    def delete_stale(self, before: float) -> list[ChildRecord]:
        """Delete the records last allocated before `before`; returns them."""
        rows = self._db.execute(
            "DELETE FROM child WHERE updated_at < ?"
            " RETURNING trench, family, conduit, node, name, address, updated_at",
            (before,),
        ).fetchall()
        return [_record(row) for row in rows]

    # -- helpers -------------------------------------------------------------------------------

    def _prefix(self, query: str, values: tuple[object, ...]) -> Network | None:
        row = self._db.execute(query, values).fetchone()
        return None if row is None else ipaddress.ip_network(row[0])

    def _prefixes(self, query: str, values: tuple[object, ...]) -> list[Network]:
        return [ipaddress.ip_network(prefix) for (prefix,) in self._db.execute(query, values)]


def _key_values(key: ChildKey) -> tuple[str, int, str, str, str]:
    return (key.trench, key.family, key.conduit, key.node, key.name)


def _record(row: tuple[str, Family, str, str, str, str, float]) -> ChildRecord:
    trench, family, conduit, node, name, address, updated_at = row
    return ChildRecord(
        ChildKey(trench, conduit, node, family, name), ipaddress.ip_address(address), updated_at
    )
