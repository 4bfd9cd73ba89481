"""NSM's updatepath as a server hop (pure)."""

from __future__ import annotations

import pytest

from proxy.api.networkservice.connection_pb2 import Connection, PathSegment
from proxy.nsm.path import PathError, server_hop


def connection(
    *segments: tuple[str, str], index: int = 0, conn_id: str | None = None
) -> Connection:
    conn = Connection()
    for name, seg_id in segments:
        conn.path.path_segments.append(PathSegment(name=name, id=seg_id))
    conn.path.index = index
    conn.id = conn_id if conn_id is not None else segments[index][1]
    return conn


def test_first_request_appends_our_segment_and_answers_with_the_callers_id() -> None:
    hop = server_hop(connection(("nsmgr", "m-1")), "proxy-a", new_id=lambda: "p-1")
    assert [s.name for s in hop.connection.path.path_segments] == ["nsmgr", "proxy-a"]
    assert (hop.connection.id, hop.connection.path.index) == ("p-1", 1)
    assert hop.first_id == "m-1"
    answer = hop.answer(hop.connection)
    assert (answer.id, answer.path.index) == ("m-1", 0)
    assert len(answer.path.path_segments) == 2


def test_refresh_keeps_our_segment_id() -> None:
    hop = server_hop(connection(("tapa", "t-1"), ("proxy-a", "p-1")), "proxy-a", new_id=lambda: "X")
    assert hop.connection.id == "p-1"
    assert len(hop.connection.path.path_segments) == 2


def test_a_request_already_at_our_segment_stays_there() -> None:
    hop = server_hop(connection(("tapa", "t-1"), ("proxy-a", "p-1"), index=1), "proxy-a")
    assert (hop.connection.id, hop.connection.path.index) == ("p-1", 1)


@pytest.mark.parametrize(
    ("conn", "reason"),
    [
        (Connection(id="x"), "no path"),
        (connection(("tapa", "t-1"), conn_id="other"), "is not the id of path segment 0"),
        (connection(("tapa", "t-1"), index=0, conn_id="t-1"), None),
    ],
)
def test_unusable_paths_are_refused_with_the_reason(conn: Connection, reason: str | None) -> None:
    if reason is None:
        server_hop(conn, "proxy-a")
        return
    with pytest.raises(PathError, match=reason):
        server_hop(conn, "proxy-a")


def test_the_input_is_not_modified() -> None:
    original = connection(("tapa", "t-1"))
    before = Connection()
    before.CopyFrom(original)
    server_hop(original, "proxy-a")
    assert original == before


def test_a_foreign_segment_after_the_callers_is_replaced_by_ours() -> None:
    """As NSM: what follows the caller's segment and is not ours is cut."""
    hop = server_hop(
        connection(("tapa", "t-1"), ("someone", "s-1"), ("more", "m-1")), "proxy-a", lambda: "p-9"
    )
    assert [(s.name, s.id) for s in hop.connection.path.path_segments] == [
        ("tapa", "t-1"),
        ("proxy-a", "p-9"),
    ]
