"""The URL forms of fd passing (proxy/rpc/fdpass.py): `inode://<st_dev>/<st_ino>` on the wire,
`file://path` (a mechanism's inodeURL) and `unix://path` (an endpoint URL) locally.

A wrong URL is a descriptor that never arrives, or the wrong file entered as a namespace; the
passing itself is in tests/integration/test_fdpass.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rpc.fdpass import (
    FdUrlError,
    format_inode_url,
    inode_url_of,
    inode_url_of_fd,
    inode_url_of_path,
    is_inode_url,
    parse_inode_url,
    path_of_url,
    proc_fd_url,
)

pytestmark = pytest.mark.timeout(30)

U64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(U64, U64)
def test_inode_url_round_trip(dev: int, ino: int) -> None:
    url = format_inode_url(dev, ino)
    assert url == f"inode://{dev}/{ino}"  # grpcfd: url.URL{Scheme: "inode", Host: dev, Path: ino}
    assert is_inode_url(url)
    assert parse_inode_url(url) == (dev, ino)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "inode://",
        "inode://1",
        "inode://1/",
        "inode:///2",
        "inode://-1/2",
        "inode://1/2/3",
        "inode://0x10/2",
        "inode://1/2?x=y",
        "file://1/2",
        "inode://18446744073709551616/1",  # 2**64
        "inode://1/" + "9" * 21,
    ],
)
def test_not_an_inode_url(url: str) -> None:
    with pytest.raises(FdUrlError):
        parse_inode_url(url)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("file:///proc/thread-self/ns/net", "/proc/thread-self/ns/net"),
        ("unix:///tmp/nse12/listen.on", "/tmp/nse12/listen.on"),
        ("file:///run/netns/a%20b", "/run/netns/a b"),
    ],
)
def test_path_of_local_urls(url: str, path: str) -> None:
    assert path_of_url(url) == path


@pytest.mark.parametrize(
    "url",
    [
        "inode://1/2",
        "tcp://127.0.0.1:5000",
        "file://host/etc/x",  # a host: not a local path
        "file:relative",
        "unix://",
        "file:///a?b",
        "/plain/path",
    ],
)
def test_not_a_local_url(url: str) -> None:
    with pytest.raises(FdUrlError):
        path_of_url(url)


def test_inode_url_of_files_and_descriptors(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target)
    info = os.stat(target)
    expected = f"inode://{info.st_dev}/{info.st_ino}"
    assert inode_url_of_path(str(target)) == expected
    assert inode_url_of_path(str(link)) == expected  # followed, as grpcfd's os.Stat
    assert inode_url_of(f"file://{target}") == expected
    fd = os.open(target, os.O_PATH)
    try:
        assert inode_url_of_fd(fd) == expected
        assert proc_fd_url(fd) == f"file:///proc/{os.getpid()}/fd/{fd}"
        assert proc_fd_url(fd, "unix") == f"unix:///proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        inode_url_of(f"unix://{tmp_path}/missing.sock")
