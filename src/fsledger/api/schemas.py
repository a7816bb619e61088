"""The JSON shapes of the HTTP API, as pydantic models: they make /openapi.json exact and
every response is checked against them. They mirror the ``to_json`` of the model classes,
which the CLI prints too, so the API returns what the CLI says."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

MAX_PATH = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_surrogate(text: str) -> str:
    """JSON can spell a lone surrogate (``"\\udc80"``), which is no character: such text
    cannot be stored, encoded as a path or sent back, so the request is refused (422)."""
    if _SURROGATE.search(text):
        raise ValueError("text holds a lone surrogate (\\ud800-\\udfff), which is no character")
    return text


Text = Annotated[str, AfterValidator(_no_surrogate)]
"""A string of a request body: any characters, but no lone surrogate."""


class ErrorOut(BaseModel):
    error: str = Field(description="A stable machine-readable code.")
    detail: str = Field(description="What happened and what to do.")


class ResyncOut(ErrorOut):
    error: Literal["resync_needed"] = "resync_needed"
    cursor: str = Field(
        description="Newest cursor: list the files again, then follow the feed from here."
    )


class HealthOut(BaseModel):
    status: Literal["ok"]
    cursor: str = Field(description="The change feed's newest cursor.")


class RepoSettingsOut(BaseModel):
    ignore_patterns: list[str]
    quick_scan_interval_s: float | None
    full_scan_interval_s: float | None
    trust_repo_config: bool = Field(description="Whether the root's .fsledger.yaml is read.")
    file_ignore_patterns: list[str] = Field(
        description="Patterns of the root's .fsledger.yaml (when trusted): they stop new "
        "records but retire none without 'fsledger scan --accept-ignores'."
    )
    file_quick_scan_interval_s: float | None
    file_full_scan_interval_s: float | None
    endpoint_url: str | None = Field(
        default=None, description="A bucket's S3 endpoint (s3:// repositories), if set."
    )


_PATTERNS: Any = Field(
    default_factory=list,
    max_length=200,
    description="Ignore patterns of the operator: records they match are retired.",
)


class RepoSettingsIn(BaseModel):
    ignore_patterns: list[Text] = _PATTERNS
    trust_repo_config: bool = Field(
        default=False, description="Honour the root's own .fsledger.yaml (off by default)."
    )


class OperationOut(BaseModel):
    id: int
    repository_id: str
    operation_type: str
    status: str
    start_time: str
    end_time: str | None
    duration_ms: int | None
    files_scanned: int
    files_added: int
    files_updated: int
    files_removed: int
    error_message: str | None


class StatusOut(BaseModel):
    repository_id: str
    name: str
    path: str
    state: str
    total_files: int
    last_scan_time: str | None
    is_watching: bool
    last_sync_operation: OperationOut | None
    schedule: dict[str, Any] | None = None
    """The running manager's schedule: next_run, waiting_reason, interval_s and its reason."""
    total_bytes: int = 0
    condition: ConditionOut | None = None
    last_scan: LastScanOut | None = None
    progress: ProgressOut | None = Field(
        default=None,
        description="The whole-tree scan running now (or ended in the last seconds), as the "
        "daemon publishes it; also sent as `event: progress` on /api/v1/events?progress=true.",
    )


class ConditionOut(BaseModel):
    state: Literal["online", "offline", "degraded", "polling"]
    reason: str | None = Field(description="Why, in a few words (e.g. 'root missing').")
    since: str | None


class LastScanOut(BaseModel):
    files_scanned: int
    error_count: int
    errors: list[str] = Field(description="The first few errors, as 'path: what happened'.")
    corrupt_count: int = Field(description="Files a --verify scan found corrupt.")
    corrupt: list[str]
    notes: list[str]


class ProgressOut(BaseModel):
    repository_id: str
    operation: str
    verify: bool
    phase: Literal["starting", "scanning", "finishing", "done", "failed"]
    running: bool
    started_at: str
    updated_at: str
    files_done: int
    bytes_done: int = Field(description="Bytes hashed so far.")
    files_expected: int | None = Field(description="From the last completed scan's counts.")
    bytes_expected: int | None
    fraction: float | None = Field(description="Done over expected, 0..1; null if unknown.")
    files_per_s: float | None
    bytes_per_s: float | None
    eta_s: float | None
    message: str | None


class RepositoryOut(BaseModel):
    id: str
    name: str
    path: str
    path_b64: str
    settings: RepoSettingsOut
    root_dev: int | None
    state: str
    created_at: str
    status: StatusOut | None = None


class RepositoryIn(BaseModel):
    path: Text = Field(
        min_length=1, max_length=MAX_PATH, pattern="^/", description="Absolute path of the root."
    )
    name: Text | None = Field(default=None, min_length=1, max_length=200)
    ignore_patterns: list[Text] = _PATTERNS
    trust_repo_config: bool = Field(
        default=False, description="Honour the root's own .fsledger.yaml (off by default)."
    )


class RemovedOut(BaseModel):
    id: str
    name: str
    purged: bool


class ReconcileOut(BaseModel):
    request_id: str = Field(description="Identifies this request in the server's log.")
    repository_id: str
    status: Literal["queued"]
    operations: str = Field(description="Where the operation appears once it starts.")


class FileOut(BaseModel):
    path: str
    path_b64: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    hash: str | None
    hash_algo: str | None
    last_scanned: str


class FilesPage(BaseModel):
    files: list[FileOut]
    cursor: str | None = Field(
        description="Pass back as ?cursor= for the next page; null at the end."
    )
    feed_cursor: str | None = Field(
        description="First page only: the change feed's head, read before this page. List "
        "every page, then follow GET /api/v1/changes?since= from here: nothing is missed."
    )


class ChangeOut(BaseModel):
    seq: int
    repository_id: str
    kind: str = Field(
        description="created, modified, deleted, moved, dir_moved (a file entry); "
        "repository_added, repository_offline, repository_online, repository_removed (a "
        "repository event: path is empty)"
    )
    path: str = Field(
        description="The path relative to the root as UTF-8 text; bytes that are not UTF-8 "
        "show as U+FFFD. For display: key a mirror by path_b64."
    )
    path_b64: str = Field(description="The exact path bytes, standard base64.")
    old_path: str | None = Field(default=None, description="moved and dir_moved only.")
    old_path_b64: str | None = None
    size: int | None = Field(
        description="Bytes: the new size, or for deleted the last known size (null when "
        "unknown and for dir_moved and repository events)."
    )
    hash: str | None = Field(description="Content hash (hex), as size.")
    hash_algo: str | None
    recorded_at: str = Field(description="RFC 3339, UTC, always with microseconds.")
    cursor: str = Field(description="The cursor after this change (the SSE event's id).")


class ChangesPage(BaseModel):
    changes: list[ChangeOut]
    cursor: str = Field(description="Pass back as ?since= to get exactly what came after.")
    has_more: bool


class DuplicateFileOut(BaseModel):
    repository_id: str
    path: str
    path_b64: str


class DuplicateGroupOut(BaseModel):
    hash: str
    hash_algo: str
    size: int
    count: int = Field(description="Files in the group, in all.")
    wasted_bytes: int
    files: list[DuplicateFileOut] = Field(description="The first ``files_limit`` of them.")
    files_cursor: str | None = Field(
        description="More files: GET /api/v1/duplicates/files with this cursor (null: none)."
    )


class DuplicatesOut(BaseModel):
    groups: list[DuplicateGroupOut]
    wasted_bytes: int
    next_offset: int | None = Field(
        default=None, description="Pass as `offset` for the next page; null on the last."
    )


class RecentChangesOut(BaseModel):
    changes: list[dict[str, Any]] = Field(description="Newest first, as /api/v1/changes.")
    cursor: str = Field(description="The feed's head: follow /api/v1/events from here.")


class ActivityOut(BaseModel):
    since: str
    until: str
    step_s: int
    kinds: list[str]
    buckets: list[dict[str, Any]] = Field(
        description="Minutes with changes only, in order: {'t': RFC 3339, kind: count...}."
    )


class MirrorCountersOut(BaseModel):
    uploaded: int
    uploaded_bytes: int
    skipped: int
    copied: int
    deleted: int
    deferred: int
    errors: int


class MirrorLiveOut(BaseModel):
    state: str = Field(description="syncing, idle, paused, waiting: repository offline, error")
    backlog: int
    objects_per_s: float
    bytes_per_s: float


class MirrorOut(BaseModel):
    """A repository mirrored to a bucket (``fsledger mirror status --json``)."""

    id: str
    repository_id: str
    repository: str
    url: str
    endpoint_url: str | None
    max_delete: int | None
    state: Literal["active", "paused"]
    reason: str | None
    cursor_seq: int | None
    synced: bool
    backlog: int
    counters: MirrorCountersOut
    last_error: str | None
    last_error_at: str | None
    created_at: str
    updated_at: str
    live: MirrorLiveOut | None = Field(
        default=None, description="This daemon's runner of the mirror, if it runs one."
    )


class MirrorsOut(BaseModel):
    mirrors: list[MirrorOut]


class WebhookChanges(BaseModel):
    """The body of a webhook delivery that carries changes."""

    type: Literal["changes"]
    since: str = Field(description="The cursor this batch follows: your last cursor.")
    cursor: str = Field(description="The cursor after this batch: store it once applied.")
    changes: list[ChangeOut]


class WebhookResync(BaseModel):
    """The body of a webhook delivery telling the receiver to resync."""

    type: Literal["resync_needed"]
    since: str
    cursor: str = Field(
        description="List the files again, then apply the deliveries that follow this one."
    )
    detail: str


class DuplicateFilesPage(BaseModel):
    files: list[DuplicateFileOut]
    cursor: str | None = Field(description="Ask again with this cursor for more (null: done).")


class S3EventApplied(BaseModel):
    repository_id: str
    changes: int = Field(description="Records written for the objects the message named.")


class S3EventsOut(BaseModel):
    applied: int = Field(description="Records written in all (0: every object was known).")
    repositories: list[S3EventApplied] = Field(default_factory=list)
    confirmed: bool = Field(default=False, description="An SNS subscription was confirmed.")
