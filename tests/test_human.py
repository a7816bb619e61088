"""Human output: sizes, durations, local times, tables (``fsledger.human``)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from fsledger import human


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (2_000_000, "2.0 MB"),
        (2_049_999, "2.0 MB"),
        (9_960_000, "10 MB"),
        (13_400_000_000, "13 GB"),
        (999_960_000, "1.0 GB"),
        (5 * 10**18, "5.0 EB"),
    ],
)
def test_sizes_in_decimal_units(n: int, shown: str) -> None:
    assert human.size(n) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.0, "0 ms"),
        (0.85, "850 ms"),
        (4.2, "4.2s"),
        (42.4, "42s"),
        (72, "1m 12s"),
        (3600 + 5 * 60 + 10, "1h 05m"),
        (2 * 86400 + 4 * 3600, "2d 04h"),
        (-3, "0 ms"),
    ],
)
def test_durations_in_their_two_largest_units(seconds: float, shown: str) -> None:
    assert human.duration(seconds) == shown


@pytest.fixture
def berlin() -> Iterator[None]:
    """The local time zone set to Europe/Berlin (UTC+1 in December) for the test."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.usefixtures("berlin")
def test_times_are_shown_in_local_time() -> None:
    when = datetime(2026, 12, 6, 10, 42, 10, tzinfo=UTC)
    today = datetime(2026, 12, 6, 20, 0, tzinfo=UTC)
    tomorrow = datetime(2026, 12, 7, 20, 0, tzinfo=UTC)
    assert human.local_time(when, now=today) == "11:42:10"
    assert human.local_time(when, now=tomorrow) == "2026-12-06 11:42:10"
    # A naive time is UTC (as the stores hand some over), not local.
    assert human.local_time(when.replace(tzinfo=None), now=today) == "11:42:10"
    assert human.local_time(None) == "never"


def test_table_aligns_columns_and_numbers_right() -> None:
    out = human.table(
        ("NAME", "FILES", "REASON"),
        [("photos", "1,234", ""), ("nas", "5", "root missing")],
        right=frozenset({1}),
    )
    assert out.splitlines() == [
        "NAME    FILES  REASON",
        "photos  1,234",
        "nas         5  root missing",
    ]
