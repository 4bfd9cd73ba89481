"""The sysctl check and ensure logic, with fake /proc/sys readers and writers (no root)."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from loguru import logger

from proxy.kernel import sysctl
from proxy.kernel.model import Family
from proxy.kernel.sysctl import REQUIRED, Outcome

RIGHT = {s.name: s.value for s in REQUIRED}


class FakeProc:
    """A /proc/sys of a dict; names in `read_only` raise `error` on write."""

    def __init__(self, values: dict[str, str], read_only=(), error=None, ignore=()):
        self.values = dict(values)
        self.read_only = set(read_only)
        self.ignore = set(ignore)  # writes that are accepted but change nothing
        self.error = error or PermissionError(errno.EACCES, "Permission denied")
        self.writes: list[tuple[str, str]] = []

    def read(self, name: str) -> str | None:
        return self.values.get(name)

    def write(self, name: str, value: str) -> None:
        self.writes.append((name, value))
        if name in self.read_only:
            raise self.error
        if name not in self.ignore:
            self.values[name] = value


def test_required_covers_both_families_with_reasons():
    names = {s.name for s in REQUIRED}
    assert names == {
        "net.ipv4.conf.all.forwarding",
        "net.ipv6.conf.all.forwarding",
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
        "net.ipv4.fib_multipath_hash_policy",
        "net.ipv6.fib_multipath_hash_policy",
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.default.rp_filter",
    }
    for s in REQUIRED:
        assert s.why and len(s.why) < 120
        assert s.family is (Family.V4 if ".ipv4." in s.name else Family.V6)


def test_required_only_for_families_in_use():
    v4 = sysctl.required((Family.V4,))
    assert v4 and all(".ipv4." in s.name for s in v4)
    v6 = sysctl.required((Family.V6,))
    assert v6 and all(".ipv6." in s.name for s in v6)
    assert len(v4) + len(v6) == len(REQUIRED)


def test_path_of():
    assert (
        sysctl.path_of("net.ipv4.conf.all.forwarding") == "/proc/sys/net/ipv4/conf/all/forwarding"
    )
    assert sysctl.path_of("net.ipv6.fib_multipath_hash_policy", "/x") == (
        "/x/net/ipv6/fib_multipath_hash_policy"
    )


def test_check_all_right():
    assert sysctl.check(RIGHT.get) == []


def test_check_reports_wrong_and_unreadable():
    values = dict(RIGHT)
    values["net.ipv4.conf.all.forwarding"] = "0"
    del values["net.ipv6.fib_multipath_hash_policy"]
    found = {(m.sysctl.name, m.found) for m in sysctl.check(values.get)}
    assert found == {
        ("net.ipv4.conf.all.forwarding", "0"),
        ("net.ipv6.fib_multipath_hash_policy", None),
    }


def test_check_only_families_in_use():
    values = {name: "7" for name in RIGHT}  # everything wrong
    mismatches = sysctl.check(values.get, (Family.V4,))
    assert mismatches and all(m.sysctl.family is Family.V4 for m in mismatches)


def test_check_ignores_whitespace():
    values = {name: f" {value}\n" for name, value in RIGHT.items()}
    assert sysctl.check(values.get) == []


def test_ensure_sets_only_the_wrong_ones():
    proc = FakeProc(
        {**RIGHT, "net.ipv4.conf.all.forwarding": "0", "net.ipv6.conf.all.accept_dad": "1"}
    )
    report = sysctl.ensure(read=proc.read, write=proc.write)
    assert sorted(proc.writes) == [
        ("net.ipv4.conf.all.forwarding", "1"),
        ("net.ipv6.conf.all.accept_dad", "0"),
    ]
    assert {r.sysctl.name: r.found for r in report.fixed} == {
        "net.ipv4.conf.all.forwarding": "0",
        "net.ipv6.conf.all.accept_dad": "1",
    }
    assert len(report.already) == len(REQUIRED) - 2
    assert report.ok and not report.failed
    assert proc.values == RIGHT


def test_ensure_reports_permission_error_with_errno():
    proc = FakeProc(
        {**RIGHT, "net.ipv4.conf.all.rp_filter": "1"}, read_only={"net.ipv4.conf.all.rp_filter"}
    )
    report = sysctl.ensure(read=proc.read, write=proc.write)
    assert not report.ok
    [failed] = report.failed
    assert failed.sysctl.name == "net.ipv4.conf.all.rp_filter"
    assert failed.outcome is Outcome.FAILED
    assert failed.found == "1"
    assert failed.error == "EACCES: Permission denied"


def test_ensure_reports_read_only_filesystem():
    error = OSError(errno.EROFS, "Read-only file system")
    proc = FakeProc({**RIGHT, "net.ipv4.conf.all.forwarding": "0"}, read_only=RIGHT, error=error)
    report = sysctl.ensure((Family.V4,), read=proc.read, write=proc.write)
    assert [r.error for r in report.failed] == ["EROFS: Read-only file system"]


def test_ensure_unreadable_is_failed_without_writing():
    values = dict(RIGHT)
    del values["net.ipv6.fib_multipath_hash_policy"]
    proc = FakeProc(values)
    report = sysctl.ensure(read=proc.read, write=proc.write)
    assert proc.writes == []
    [failed] = report.failed
    assert failed.found is None and failed.error is not None and "ENOENT" in failed.error


def test_ensure_write_that_does_not_stick_is_failed():
    name = "net.ipv4.fib_multipath_hash_policy"
    proc = FakeProc({**RIGHT, name: "0"}, ignore={name})
    report = sysctl.ensure(read=proc.read, write=proc.write)
    [failed] = report.failed
    assert failed.sysctl.name == name and failed.error is not None and "'0'" in failed.error


def test_ensure_non_os_errors_propagate():
    def write(name: str, value: str) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        sysctl.ensure(read={**RIGHT, "net.ipv4.conf.all.forwarding": "0"}.get, write=write)


@pytest.fixture
def records():
    lines: list[Any] = []
    sink = logger.add(lambda message: lines.append(message.record), level=0, format="{message}")
    try:
        yield lines
    finally:
        logger.remove(sink)


def test_log_report_info_once_and_warning_per_failure(records):
    proc = FakeProc(
        {
            **RIGHT,
            "net.ipv4.conf.all.forwarding": "0",
            "net.ipv4.conf.all.rp_filter": "1",
            "net.ipv6.conf.all.accept_dad": "1",
        },
        read_only={"net.ipv4.conf.all.rp_filter", "net.ipv6.conf.all.accept_dad"},
        error=OSError(errno.EROFS, "Read-only file system"),
    )
    sysctl.log_report(sysctl.ensure(read=proc.read, write=proc.write))
    infos = [r for r in records if r["level"].name == "INFO"]
    warnings = [r for r in records if r["level"].name == "WARNING"]
    assert len(infos) == 1 and len(records) == 3
    assert infos[0]["extra"]["set"] == "net.ipv4.conf.all.forwarding=1"
    assert infos[0]["extra"]["not_set"] == 2
    by_name = {w["extra"]["sysctl"]: w["extra"] for w in warnings}
    assert set(by_name) == {"net.ipv4.conf.all.rp_filter", "net.ipv6.conf.all.accept_dad"}
    rp = by_name["net.ipv4.conf.all.rp_filter"]
    assert rp["found"] == "1" and rp["needed"] == "0"
    assert rp["error"] == "EROFS: Read-only file system"
    assert "reverse-path" in rp["why"]
    assert "init container" in rp["fix"] and "securityContext.sysctls" in rp["fix"]
    assert "net.ipv4.conf.all.rp_filter=0" in rp["fix"]


def test_log_report_all_right_is_one_line(records):
    sysctl.log_report(sysctl.ensure(read=RIGHT.get, write=FakeProc({}).write))
    assert len(records) == 1
    assert records[0]["extra"] == {"set": "none", "already_right": len(REQUIRED), "not_set": 0}
