"""The file of IPAM releases owed across restarts (proxy.release_journal)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from proxy.release_journal import ReleaseJournal, journal_text, parse_journal

pytestmark = pytest.mark.timeout(30)


def test_the_journal_reads_back_what_it_wrote() -> None:
    owed = {"tg0-red-0": 1_800_000_020.5, "proxy-a-conduit-a-lb0": 1_800_000_001.0}
    assert parse_journal(journal_text(owed)) == owed


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[]", "not a version 1 release journal"),
        ('{"version": 2, "releases": {}}', "not a version 1"),
        ('{"version": 1}', "no releases object"),
        ('{"version": 1, "releases": {"k": "soon"}}', "bad entry 'k'"),
        ('{"version": 1, "releases": {"k": true}}', "bad entry"),
        ('{"version": 1, "releases": {"": 1.0}}', "bad entry ''"),
    ],
)
def test_a_bad_journal_says_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_journal(text)


def test_the_file_goes_when_nothing_is_owed(tmp_path: Path) -> None:
    journal = ReleaseJournal(tmp_path / "proxy-a.ipam-releases.json")
    assert journal.load() == {}
    journal.save({"k": 1.0})
    assert journal.load() == {"k": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proxy-a.ipam-releases.json"]
    journal.save({})
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_journal_is_set_aside_and_logged(tmp_path: Path) -> None:
    records: list[Any] = []
    sink = logger.add(lambda m: records.append(m.record), level="WARNING")
    try:
        path = tmp_path / "proxy-a.ipam-releases.json"
        path.write_text("{ torn")
        assert ReleaseJournal(path).load() == {}
        assert (tmp_path / "proxy-a.ipam-releases.json.bad").read_text() == "{ torn"
        assert not path.exists()
        ReleaseJournal(tmp_path / "nowhere" / "x.json").save({"k": 1.0})  # no directory
        ReleaseJournal(tmp_path / "nowhere" / "x.json").save({"k": 2.0})
    finally:
        logger.remove(sink)
    assert [r["message"] for r in records] == [
        "release journal set aside",
        "release journal not written",
        "release journal not written",  # (two journals; each says it once)
    ]
