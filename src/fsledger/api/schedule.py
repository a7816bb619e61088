"""``/api/v1/schedule``: the scheduler's face (fsledger.schedule does the deciding).

A consumer whose pipeline is busy (thumbnails, ML after an import) asks for quiet; scheduled
reconciliations wait until then (never past the maximum deferral).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from fsledger.errors import ConfigError
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.schedule import Quiet

MAX_QUIET = timedelta(days=7)
"""A quiet request further ahead than this is refused: it is a courtesy, not an off switch."""


class QuietOut(BaseModel):
    until: str | None
    by: str | None
    max_deferral_s: float | None


class BadQuiet(ConfigError):
    """A quiet request the API cannot honour (answered 400)."""


def add_schedule_routes(api: APIRouter, ledger: Ledger, manager: SyncManager | None) -> None:
    """Add the schedule's routes to the (authorized) ``/api/v1`` router."""

    def store(quiet: Quiet | None) -> None:
        if manager is not None:
            manager.request_quiet(quiet.until if quiet else None, quiet.by if quiet else "")
        else:
            ledger.request_quiet(quiet)  # the running manager reads it from the database

    def out(quiet: Quiet | None) -> dict[str, Any]:
        return {
            "until": quiet.until.isoformat() if quiet else None,
            "by": quiet.by if quiet else None,
            "max_deferral_s": manager.settings.schedule_max_deferral_s if manager else None,
        }

    @api.post("/schedule/quiet", response_model=QuietOut, tags=["schedule"])
    def request_quiet(
        until: Annotated[str, Query(description="ISO 8601 time, with a UTC offset")],
        by: Annotated[str, Query(max_length=200)] = "",
    ) -> Any:
        """Ask that no scheduled reconciliation start before ``until`` ("my pipeline is
        busy"). Startup and recovery reconciliations still run; a scheduled one waits at
        most the maximum deferral."""
        try:
            when = datetime.fromisoformat(until)
        except ValueError:
            raise BadQuiet(f"until={until!r} is not an ISO 8601 time") from None
        if when.tzinfo is None:
            raise BadQuiet(f"until={until!r} has no UTC offset (e.g. +00:00 or Z)")
        now = datetime.now().astimezone()
        if when - now > MAX_QUIET:
            raise BadQuiet(f"until={until!r} is more than {MAX_QUIET.days} days ahead")
        quiet = Quiet(when, by)
        store(quiet)
        return out(quiet)

    @api.delete("/schedule/quiet", response_model=QuietOut, tags=["schedule"])
    def withdraw_quiet() -> Any:
        """Withdraw the quiet request: scheduled reconciliations that wait run now."""
        store(None)
        return out(None)

    @api.get("/schedule/quiet", response_model=QuietOut, tags=["schedule"])
    def get_quiet() -> Any:
        """The quiet request in force, if any."""
        quiet = ledger.quiet()
        if quiet is not None and quiet.until <= datetime.now().astimezone():
            quiet = None
        return out(quiet)
