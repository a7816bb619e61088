"""Numbers and times as a person reads them: ``2.0 MB``, ``1m 12s``, local time.

Only human output uses these; ``--json`` and the API keep bytes, milliseconds and
RFC 3339 times in UTC, exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

_UNITS = ("kB", "MB", "GB", "TB", "PB", "EB")


def size(n: int) -> str:
    """Bytes in decimal units (as ``ls --si`` and file managers show them): ``512 B``,
    ``2.0 MB``, ``13 GB`` (one decimal below 10, none above)."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    unit = _UNITS[0]
    for unit in _UNITS:  # noqa: B007 (the unit the loop stops at is the one shown)
        value /= 1000
        if round(value, 1) < 1000:
            break
    return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"


def duration(seconds: float) -> str:
    """A duration in its two largest units: ``850 ms``, ``4.2s``, ``1m 12s``, ``3h 05m``,
    ``2d 04h``."""
    if seconds < 0:
        seconds = 0.0
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f}s"
    total = round(seconds)
    if total < 60:
        return f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def local_time(when: datetime | None, now: datetime | None = None) -> str:
    """A moment in the local time zone, to the second: ``2026-12-06 11:42:10``; only the
    time of day when it is today. ``never`` for None. Naive times are taken as UTC."""
    if when is None:
        return "never"
    if when.tzinfo is None:
        from datetime import UTC

        when = when.replace(tzinfo=UTC)
    local = when.astimezone()
    today = (now or datetime.now().astimezone()).astimezone().date()
    return f"{local:%H:%M:%S}" if local.date() == today else f"{local:%Y-%m-%d %H:%M:%S}"


def table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], right: frozenset[int]) -> str:
    """Rows under headers in aligned columns (the columns in ``right`` aligned right, as
    numbers are); the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    last = len(headers) - 1

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            c if i == last and i not in right else c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])
