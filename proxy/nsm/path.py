"""NSM connection paths (pure): what each hop does to `connection.path` and `connection.id`.

NSM's `updatepath` (wire-api §4.2): a server whose name is not the current segment's advances
`path.index` by one, appends its own segment `{name, id: <new UUID>}` when there is none of its
own at the new index (what followed the caller's segment is cut, as NSM does), and works on the
connection under that segment's id; its answer carries the caller's id and index again. A
refresh finds the server's segment already there and keeps its id, so a connection keeps its
identity at every hop.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import attrs

from proxy.api.networkservice.connection_pb2 import Connection, PathSegment


class PathError(ValueError):
    """The path is not one a hop can work with; the message says why."""


@attrs.frozen
class Hop:
    """A connection as seen at our hop, and how to answer the caller."""

    connection: Connection  # id = our segment's id, path.index = our index
    caller_id: str
    caller_index: int

    @property
    def segment(self) -> PathSegment:
        return self.connection.path.path_segments[self.connection.path.index]

    @property
    def first_id(self) -> str:
        """The first segment's id: the client's stable identity (a target's, across proxies)."""
        return self.connection.path.path_segments[0].id

    def answer(self, connection: Connection) -> Connection:
        """`connection` (as our hop has it) with the caller's id and index restored."""
        reply = Connection()
        reply.CopyFrom(connection)
        reply.id = self.caller_id
        reply.path.index = self.caller_index
        return reply


def server_hop(
    connection: Connection, name: str, new_id: Callable[[], str] = lambda: str(uuid.uuid4())
) -> Hop:
    """Apply updatepath as a server named `name`; raises PathError for an unusable path."""
    path = connection.path
    if not path.path_segments:
        raise PathError("the connection has no path")
    if path.index >= len(path.path_segments):
        raise PathError(f"path index {path.index} is beyond its {len(path.path_segments)} segments")
    current = path.path_segments[path.index]
    if current.id != connection.id:
        raise PathError(
            f"the connection id {connection.id!r} is not the id of path segment {path.index}"
        )
    ours = Connection()
    ours.CopyFrom(connection)
    if current.name != name:
        ours.path.index += 1
        segments = ours.path.path_segments
        if ours.path.index == len(segments) or segments[ours.path.index].name != name:
            del segments[ours.path.index :]
            segments.add(name=name, id=new_id())
    ours.id = ours.path.path_segments[ours.path.index].id
    return Hop(ours, caller_id=connection.id, caller_index=connection.path.index)
