"""The routes the dashboard reads besides the API's own: the newest changes (to show on
load, before following the feed), the activity per minute, and the operations of every
repository, filterable. Each answers from one bounded query: nothing loads all records.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query

from fsledger.api import schemas
from fsledger.errors import ConfigError
from fsledger.feed import entry_json
from fsledger.ledger import Ledger
from fsledger.model import (
    ChangeKind,
    OperationStatus,
    OperationType,
    Repository,
    rfc3339,
    utcnow,
)

FEED_KINDS = tuple(k.value for k in ChangeKind if k is not ChangeKind.META)
"""The kinds a feed entry can have (metadata-only changes are not in the feed)."""
WINDOWS = {"hour": 60, "day": 24 * 60}
"""The activity chart's windows, in minutes."""


def add_dashboard_routes(
    api: APIRouter, ledger: Ledger, get_repo: Callable[[UUID], Repository]
) -> None:
    """Add the dashboard's routes to the (authorized) ``/api/v1`` router."""

    @api.get("/changes/recent", response_model=schemas.RecentChangesOut, tags=["feed"])
    def recent_changes(
        repository: UUID | None = None,
        kind: Annotated[list[str] | None, Query(max_length=len(FEED_KINDS))] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> Any:
        """The newest changes (of one repository, of these kinds), newest first, and the
        feed's head read just before them: follow /api/v1/events from ``cursor`` and skip
        what you already have by ``seq``."""
        kinds = tuple(kind or ())
        unknown = [k for k in kinds if k not in FEED_KINDS]
        if unknown:
            raise ConfigError(f"unknown kind {unknown[0]!r} (kinds: {', '.join(FEED_KINDS)})")
        repo = get_repo(repository) if repository is not None else None
        head = ledger.feed_head()
        entries = ledger.recent_changes(repo, kinds, limit)
        return {
            "changes": [entry_json(e, head.feed_id) for e in entries],
            "cursor": str(head),
        }

    @api.get("/activity", response_model=schemas.ActivityOut, tags=["feed"])
    def activity(
        window: Annotated[str, Query(pattern="^(hour|day)$")] = "hour",
        repository: UUID | None = None,
    ) -> Any:
        """Changes per minute and kind over the last hour or day, counted by the database
        (minutes without changes are left out)."""
        repo = get_repo(repository) if repository is not None else None
        until = utcnow().replace(second=0, microsecond=0) + timedelta(minutes=1)
        since = until - timedelta(minutes=WINDOWS[window])
        buckets: dict[str, dict[str, Any]] = {}
        for minute, kind, count in ledger.activity(since, repo):
            key = rfc3339(minute)
            buckets.setdefault(key, {"t": key})[kind] = count
        return {
            "since": rfc3339(since),
            "until": rfc3339(until),
            "step_s": 60,
            "kinds": list(FEED_KINDS),
            "buckets": list(buckets.values()),
        }

    @api.get("/operations", response_model=list[schemas.OperationOut], tags=["repositories"])
    def operations(
        repository: UUID | None = None,
        type: OperationType | None = None,  # noqa: A002
        status: OperationStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> Any:
        """The newest sync operations of every repository (or one), of a type and status."""
        repo = get_repo(repository) if repository is not None else None
        return [o.to_json() for o in ledger.operations(repo, limit, type, status)]


__all__ = ["add_dashboard_routes"]
