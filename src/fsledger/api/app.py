"""The HTTP API and the dashboard: a thin face over ``Ledger``, ``SyncManager`` and the feed.

Routes (JSON; OpenAPI at /openapi.json, behind the token like the API; no /docs):

* ``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /`` (the dashboard);
* ``/api/v1/repositories`` (list, add), ``/api/v1/repositories/{id}`` (remove),
  ``.../status``, ``.../reconcile``, ``.../operations``, ``.../files``;
* ``/api/v1/duplicates``, ``/api/v1/changes`` (the feed by cursor), ``/api/v1/events`` (SSE).

Security: with ``FSLEDGER_API_TOKEN`` set, everything under /api and /metrics wants
``Authorization: Bearer TOKEN`` (compared in constant time). Without a token the server
only listens on loopback (``server.py`` refuses otherwise), and then answers only requests
whose Host is a loopback name, so a web page cannot reach it through DNS rebinding.
Requests that change something and carry a foreign ``Origin`` are refused (CSRF). Bodies
are bounded to 64 KiB, page sizes to 1000.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fsledger.api import schemas
from fsledger.api.dashboard import add_dashboard_routes
from fsledger.api.encode import changes_json
from fsledger.api.metrics import CONTENT_TYPE, Metrics
from fsledger.api.s3events import add_s3_event_routes
from fsledger.api.schedule import add_schedule_routes
from fsledger.api.security import Guard, error_response
from fsledger.api.webhooks import WebhookDispatcher
from fsledger.config import Settings
from fsledger.errors import (
    ConfigError,
    FsledgerError,
    RepositoryExists,
    RepositoryNotFound,
    ResyncNeeded,
    RootUnavailable,
    StoreError,
    StoreUnavailable,
)
from fsledger.feed import (
    CURSOR_PATTERN,
    Cursor,
    FeedHub,
    FeedPage,
    Retention,
    entry_cursor,
    entry_json,
)
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager
from fsledger.model import DuplicateFile, RepoSettings, Repository, utcnow
from fsledger.progress import ProgressBoard

log = logging.getLogger(__name__)

# A component that is not "." or "..", then components joined by single slashes: the
# schema says what _clean_prefix enforces (for prefix_b64 it is checked after decoding).
_COMPONENT = r"(?:[^/\x00.][^/\x00]*|\.[^/\x00.][^/\x00]*|\.\.[^/\x00]+)"
PREFIX_PATTERN = rf"^/*(?:{_COMPONENT}(?:/{_COMPONENT})*)?/*$"
B64URL_PATTERN = r"^(?:[A-Za-z0-9_-]{4})*(?:[A-Za-z0-9_-]{2,3})?$"
B64_PATTERN = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
MAX_LIMIT = 1000
MAX_CHANGES_LIMIT = 10_000
"""A change-feed page may be larger: a consumer catching up reads it in one request."""
MAX_STREAMS = 128
PROGRESS_POLL_S = 0.1
"""How often a stream that sends progress looks at the scans' progress while it waits."""
"""SSE streams open at once (the HTTP server takes up to ``server.MAX_CONNECTIONS``)."""
STATIC = resources.files("fsledger.api") / "static"
# Module level: route signatures are resolved from module globals (postponed annotations).
_BEARER = HTTPBearer(auto_error=False, description="FSLEDGER_API_TOKEN, when it is set.")


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


class _Slot:
    """One open SSE stream, counted once and released once, whoever ends it."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()


class ApiError(Exception):
    """An HTTP error with a stable code, raised by route handlers."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def _status_of(exc: FsledgerError) -> tuple[int, str]:
    if isinstance(exc, RepositoryNotFound):
        return 404, "not_found"
    if isinstance(exc, RepositoryExists):
        return 409, "conflict"
    if isinstance(exc, RootUnavailable):
        return 400, "root_unavailable"
    if isinstance(exc, ConfigError):
        return 400, "bad_request"
    if isinstance(exc, StoreUnavailable):
        return 503, "store_unavailable"
    if isinstance(exc, StoreError):
        return 503, "store_error"
    return 400, "bad_request"


def _b64_path(text: str, what: str) -> bytes:
    try:
        padded = text.encode("ascii") + b"=" * (-len(text) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ApiError(400, "bad_request", f"{what} is not base64") from None


def _dup_after(cursor: str) -> DuplicateFile:
    try:
        return DuplicateFile.from_cursor(_b64_path(cursor, "cursor"))
    except ValueError as exc:
        raise ApiError(400, "bad_request", f"cursor: {exc}") from None


def _clean_prefix(raw: bytes) -> bytes:
    """A directory prefix inside the repository, or ``ApiError``."""
    raw = raw.strip(b"/")
    parts = raw.split(b"/") if raw else []
    if b"\0" in raw or any(p in (b"..", b".") for p in parts) or b"" in parts:
        raise ApiError(
            400,
            "bad_request",
            "prefix must be a relative directory inside the repository: no '.', '..', "
            "empty components or NUL",
        )
    return raw


async def _known_query_only(request: Request) -> None:
    """Refuse query parameters a route does not take: a typo (``?sinse=``) must not silently
    mean "from the beginning"."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known: set[str] = set()
    todo = [dependant]
    while todo:  # the route's own parameters and those of its dependencies
        dep = todo.pop()
        known.update(p.alias for p in dep.query_params)
        todo.extend(dep.dependencies)
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ApiError(
            400,
            "bad_request",
            f"unknown query parameter {unknown[0]!r} (this route takes: "
            + (", ".join(sorted(known)) or "none")
            + ")",
        )


async def _on_unexpected(_request: Request, exc: Exception) -> JSONResponse:
    """A bug: a 500 in the API's shape that says ``Connection: close``. The server closes
    the connection after an unhandled error anyway; without the header a keep-alive client
    sent its next request into the closed connection and failed a second time."""
    log.error("API request failed unexpectedly: %s", type(exc).__name__, exc_info=exc)
    response = error_response(
        500, "internal_error", "the server failed on this request; its log says why"
    )
    response.headers["Connection"] = "close"
    return response


def _parse_cursor(text: str | None) -> Cursor | None:
    return Cursor.parse(text) if text else None


def create_app(
    ledger: Ledger,
    manager: SyncManager | None,
    settings: Settings,
    *,
    hub: FeedHub | None = None,
    webhooks: Sequence[WebhookDispatcher] = (),
    heartbeat_s: float = 15.0,
    max_streams: int = MAX_STREAMS,
) -> FastAPI:
    """Build the ASGI app.

    Args:
        ledger: the library API over the store.
        manager: the SyncManager of this process, if any (adding repositories then starts
            their scan and watch; reconciliations can be requested).
        settings: the configuration (the API token is read from it).
        hub: the feed hub to wait on; when omitted the app makes one and runs it during its
            lifespan.
        webhooks: dispatchers whose counters /metrics shows.
        heartbeat_s: idle time after which an SSE stream sends a comment line.
        max_streams: SSE streams open at once; one more is answered 503 (the server's
            connection limit is well above it, so /healthz and the API keep answering).
    """
    own_hub = hub is None
    feed_hub = hub or FeedHub(
        ledger,
        repositories=manager.repositories if manager is not None else None,
        retention=Retention(settings.feed_retention_s, settings.feed_retention_entries),
    )
    feed = ledger.feed
    metrics = Metrics(ledger, manager, feed_hub, lambda: webhooks)
    token = settings.api_token

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if own_hub:
            await run_in_threadpool(feed_hub.start)
        try:
            yield
        finally:
            if own_hub:
                await run_in_threadpool(feed_hub.stop)

    app = FastAPI(
        title="fsledger",
        version="1",
        summary="A database of every file in directory trees, true to disk, and its changes.",
        lifespan=lifespan,
        dependencies=[Depends(_known_query_only)],
        # No /docs or /redoc: they load scripts from a CDN into this origin. /openapi.json
        # is served below, behind the token like the API it describes.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # Starlette's slash redirect builds its Location from the Host header, which a
        # client chooses (Host: evil.example): no redirects at all, a 404 instead.
        redirect_slashes=False,
    )
    app.state.hub = feed_hub
    app.state.metrics = metrics

    async def authorize(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
    ) -> None:
        if token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer TOKEN' is needed")

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.exception_handler(RequestValidationError)
    async def on_invalid_request(_request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own handler echoes the input, and a JSON body can spell a lone
        # surrogate ("\ud800") that no UTF-8 response can carry: it turned a 422 into a 500.
        # ASCII JSON escapes whatever the input held.
        body = {"detail": jsonable_encoder(exc.errors())}
        return Response(json.dumps(body, ensure_ascii=True), 422, media_type="application/json")

    @app.exception_handler(ApiError)
    async def on_apierror_response(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.error, exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def on_httperror_response(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Framework errors (unparseable body, unknown route, wrong method) in our shape too.
        code = _HTTP_CODES.get(exc.status_code, "error")
        response = error_response(exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ResyncNeeded)
    async def on_resync(_request: Request, exc: ResyncNeeded) -> JSONResponse:
        return error_response(410, "resync_needed", str(exc), cursor=exc.cursor)

    app.add_exception_handler(Exception, _on_unexpected)

    @app.exception_handler(FsledgerError)
    async def on_fsledgererror_response(_request: Request, exc: FsledgerError) -> JSONResponse:
        status, code = _status_of(exc)
        if status >= 500:
            log.error("API request failed: %s", exc)
        return error_response(status, code, str(exc))

    errors: dict[int | str, dict[str, Any]] = {
        400: {"model": schemas.ErrorOut},
        401: {"model": schemas.ErrorOut},
        404: {"model": schemas.ErrorOut},
        503: {"model": schemas.ErrorOut},
    }
    # Without a token no route asks for one, and the OpenAPI document says so (it marked
    # bearer auth as required on every route that a loopback server answers without it).
    auth = [Depends(authorize)] if token is not None else []
    api = APIRouter(prefix="/api/v1", dependencies=auth, responses=errors)

    # --- helpers ------------------------------------------------------------------------
    def get_repo(repo_id: UUID) -> Repository:
        repo = ledger.repository(repo_id)
        if repo is None:
            raise ApiError(404, "not_found", f"no repository {repo_id}")
        return repo

    def status_json(repo: Repository) -> dict[str, Any]:
        if manager is not None:
            try:
                return manager.get_sync_status(repo.id).to_json()
            except StoreError:
                raise
            except FsledgerError:
                pass  # not (yet) run by the manager: the stored status says it all
        return ledger.status(repo).to_json()

    def need_manager() -> SyncManager:
        if manager is None:
            raise ApiError(
                503, "unavailable", "no sync manager runs in this process ('fsledger run' has one)"
            )
        return manager

    # --- service ------------------------------------------------------------------------
    @app.get(
        "/healthz",
        response_model=schemas.HealthOut,
        responses={503: {"model": schemas.ErrorOut}},
        tags=["service"],
    )
    def healthz() -> Any:
        """200 when the store answers."""
        try:
            head = feed.head()
        except StoreError as exc:
            return error_response(503, "store_unavailable", str(exc))
        return {"status": "ok", "cursor": str(head)}

    @app.get(
        "/metrics",
        response_model=None,
        dependencies=auth,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            401: {"model": schemas.ErrorOut},
        },
        tags=["service"],
    )
    def prometheus() -> PlainTextResponse:
        """Prometheus text exposition of the ``fsledger_*`` series."""
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(
            str(STATIC / "index.html"),
            media_type="text/html",
            headers={
                "Content-Security-Policy": "default-src 'self'; script-src 'self'; "
                "style-src 'self'; connect-src 'self'; img-src 'self' data:; "
                "frame-ancestors 'none'",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        types = {".js": "text/javascript", ".css": "text/css"}
        ext = os.path.splitext(name)[1]
        if name not in ("app.js", "style.css") or ext not in types:
            raise ApiError(404, "not_found", "no such file")
        return FileResponse(
            str(STATIC / name), media_type=types[ext], headers={"Cache-Control": "no-cache"}
        )

    # --- repositories -------------------------------------------------------------------
    @api.get("/repositories", response_model=list[schemas.RepositoryOut], tags=["repositories"])
    def list_repositories() -> Any:
        """Every repository, with its sync status."""
        return [{**r.to_json(), "status": status_json(r)} for r in ledger.list_repositories()]

    @api.post(
        "/repositories",
        status_code=201,
        response_model=schemas.RepositoryOut,
        responses={409: {"model": schemas.ErrorOut}, 413: {"model": schemas.ErrorOut}},
        tags=["repositories"],
    )
    def add_repository(body: schemas.RepositoryIn) -> Any:
        """Register a directory; under ``fsledger run`` its scan and watch start at once."""
        if "\0" in body.path or not os.path.isabs(body.path):
            raise ApiError(400, "bad_request", "path must be an absolute path on the server")
        path = os.fsencode(body.path)
        wanted = RepoSettings(
            ignore_patterns=tuple(body.ignore_patterns), trust_repo_config=body.trust_repo_config
        )
        repo = (
            manager.add_repository(path, body.name, wanted)
            if manager is not None
            else ledger.add_repository(path, body.name, wanted)
        )
        return {**repo.to_json(), "status": status_json(repo)}

    @api.put(
        "/repositories/{repo_id}/settings",
        response_model=schemas.RepositoryOut,
        tags=["repositories"],
    )
    def set_settings(repo_id: UUID, body: schemas.RepoSettingsIn) -> Any:
        """The operator's settings: ignore patterns (records they match are retired at the
        next scan) and whether the root's own .fsledger.yaml is honoured."""
        repo = get_repo(repo_id)
        wanted = replace(
            repo.settings,
            ignore_patterns=tuple(body.ignore_patterns),
            trust_repo_config=body.trust_repo_config,
        )
        repo = ledger.set_settings(repo, wanted)
        return {**repo.to_json(), "status": status_json(repo)}

    @api.delete("/repositories/{repo_id}", response_model=schemas.RemovedOut, tags=["repositories"])
    def remove_repository(repo_id: UUID, purge: bool = False) -> Any:
        """Stop syncing a repository; its records are kept unless ``purge``."""
        repo = get_repo(repo_id)
        if manager is not None and any(r.id == repo_id for r in manager.repositories()):
            manager.remove_repository(repo_id, purge)
        else:
            ledger.remove_repository(repo, purge)
        return {"id": str(repo.id), "name": repo.name, "purged": purge}

    @api.get(
        "/repositories/{repo_id}/status", response_model=schemas.StatusOut, tags=["repositories"]
    )
    def repository_status(repo_id: UUID) -> Any:
        """The seed's SyncStatus: total files, last scan, watching, last operation."""
        return status_json(get_repo(repo_id))

    @api.post(
        "/repositories/{repo_id}/reconcile",
        status_code=202,
        response_model=schemas.ReconcileOut,
        responses={409: {"model": schemas.ErrorOut}},
        tags=["repositories"],
    )
    def reconcile(repo_id: UUID, verify: bool = False) -> Any:
        """Queue a reconciliation ahead of scheduled ones."""
        repo = get_repo(repo_id)
        sync = need_manager()
        request_id = uuid.uuid4().hex
        try:
            sync.trigger_reconciliation(repo.id, verify=verify, reason=f"api request {request_id}")
        except StoreError:
            raise
        except FsledgerError as exc:
            raise ApiError(
                409, "not_ready", f"repository {repo.id} is not run by the manager yet: {exc}"
            ) from exc
        log.info("Repository %s: reconciliation requested (request %s)", repo.id, request_id)
        return {
            "request_id": request_id,
            "repository_id": str(repo.id),
            "status": "queued",
            "operations": f"/api/v1/repositories/{repo.id}/operations",
        }

    @api.get(
        "/repositories/{repo_id}/operations",
        response_model=list[schemas.OperationOut],
        tags=["repositories"],
    )
    def operations(repo_id: UUID, limit: Annotated[int, Query(ge=1, le=500)] = 20) -> Any:
        """Recent sync operations, newest first."""
        return [o.to_json() for o in ledger.operations(get_repo(repo_id), limit)]

    @api.get(
        "/repositories/{repo_id}/files", response_model=schemas.FilesPage, tags=["repositories"]
    )
    def files(
        repo_id: UUID,
        prefix: Annotated[str, Query(max_length=4096, pattern=PREFIX_PATTERN)] = "",
        prefix_b64: Annotated[str | None, Query(max_length=8192, pattern=B64_PATTERN)] = None,
        cursor: Annotated[str | None, Query(max_length=8192, pattern=B64URL_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> Any:
        """Records in path byte order, a page at a time. The cursor is the last path (base64),
        so paging is stable while files change: every file present throughout is listed once."""
        repo = get_repo(repo_id)
        if prefix_b64 is not None:
            try:
                raw = base64.b64decode(prefix_b64, validate=True)
            except (binascii.Error, ValueError):
                raise ApiError(400, "bad_request", "prefix_b64 is not base64") from None
        else:
            try:
                raw = prefix.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:
                raise ApiError(400, "bad_request", "prefix cannot be encoded") from None
        raw = _clean_prefix(raw)
        after = _b64_path(cursor, "cursor") if cursor else None
        return ledger.files_page(repo, after, limit, raw).to_json()

    # --- mirrors to buckets --------------------------------------------------------------
    @api.get("/mirrors", response_model=schemas.MirrorsOut, tags=["mirrors"])
    def mirrors() -> Any:
        """Every mirror: state, backlog, counters, the last error and, where this daemon
        runs it, its current rates (``fsledger mirror status --json``)."""
        from fsledger.s3.mirrors import Mirrors

        supervisor = getattr(manager, "mirrors", None)
        live = supervisor.live if supervisor is not None else None
        return {"mirrors": [s.to_json() for s in Mirrors(ledger).status(live)]}

    # --- duplicates ---------------------------------------------------------------------
    @api.get("/duplicates", response_model=schemas.DuplicatesOut, tags=["files"])
    def duplicates(
        repository: UUID | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
        min_size: Annotated[int, Query(ge=0, le=1 << 62)] = 1,
        files_limit: Annotated[int, Query(ge=2, le=MAX_LIMIT)] = 100,
        offset: Annotated[int, Query(ge=0, le=1 << 31)] = 0,
    ) -> Any:
        """Groups of files with the same content, largest waste first, each with its first
        ``files_limit`` files (one group can hold thousands) and a cursor to the rest; a
        page of ``limit`` groups after the first ``offset`` (``next_offset`` for the next)."""
        repo = get_repo(repository) if repository is not None else None
        groups = ledger.duplicates(repo, limit, min_size, files_limit, offset)
        return {
            "groups": [g.to_json() for g in groups],
            "wasted_bytes": sum(g.wasted_bytes for g in groups),
            "next_offset": offset + limit if len(groups) == limit else None,
        }

    @api.get("/duplicates/files", response_model=schemas.DuplicateFilesPage, tags=["files"])
    def duplicate_files(
        hash: Annotated[str, Query(min_length=1, max_length=128, pattern="^[0-9a-f]+$")],  # noqa: A002
        hash_algo: Annotated[str, Query(min_length=1, max_length=32, pattern="^[a-z0-9]+$")],
        size: Annotated[int, Query(ge=0, le=1 << 62)],
        repository: UUID | None = None,
        cursor: Annotated[str | None, Query(max_length=8192, pattern=B64URL_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
    ) -> Any:
        """The files of one duplicate group, a page at a time, in (repository, path) order."""
        repo_id = get_repo(repository).id if repository is not None else None
        after = _dup_after(cursor) if cursor else None
        page = ledger.store.duplicate_files(repo_id, hash, hash_algo, size, after, limit)
        nxt = page[-1].cursor() if len(page) == limit else None
        return {"files": [f.to_json() for f in page], "cursor": nxt}

    # --- the change feed ----------------------------------------------------------------
    feed_errors: dict[int | str, dict[str, Any]] = {410: {"model": schemas.ResyncOut}}

    def first_page(since: str | None, repository: UUID | None, limit: int) -> FeedPage:
        repo_id = get_repo(repository).id if repository is not None else None
        return feed.read(_parse_cursor(since), limit, repo_id)

    @api.get(
        "/changes",
        response_model=None,
        responses={200: {"model": schemas.ChangesPage}, **feed_errors},
        tags=["feed"],
    )
    def changes(
        since: Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN)] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_CHANGES_LIMIT)] = 1000,
        repository: UUID | None = None,
    ) -> Response:
        """Exactly the changes after ``since`` (from the start of the feed without it), and
        the cursor to ask with next. A cursor the feed cannot answer exactly (older than
        the retention window, of another database, beyond the newest change, or naming
        another change since a restore from backup) is answered 410 with the cursor to
        resync from."""
        # Serialised straight from the store's rows (api/encode.py): the response model
        # documents the shape, and is not run per change.
        repo_id = get_repo(repository).id if repository is not None else None
        page = feed.read_rows(_parse_cursor(since), limit, repo_id)
        return Response(changes_json(page), media_type="application/json")

    @api.get(
        "/events",
        response_class=StreamingResponse,
        responses={
            **feed_errors,
            200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
        },
        tags=["feed"],
    )
    async def events(
        since: Annotated[str | None, Query(max_length=64, pattern=CURSOR_PATTERN)] = None,
        repository: UUID | None = None,
        progress: bool = False,
        last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    ) -> StreamingResponse:
        """The feed as Server-Sent Events: ``event: change``, ``id:`` the cursor, ``data:``
        the change. Resumes after ``Last-Event-ID`` (or ``since``); without either, starts
        at the newest change. Comment lines keep idle connections alive. With
        ``progress=true``, the progress of running scans comes too, as ``event: progress``
        (no ``id:``; ``data:`` as the status route's ``progress``), a few times a second
        while a scan runs."""
        start = last_event_id or since
        if not metrics.sse_try_open(max_streams):
            raise ApiError(
                503,
                "too_many_streams",
                f"{max_streams} event streams are open already: retry later, or follow "
                "/api/v1/changes by cursor",
            )
        slot = _Slot(metrics.sse_closed)
        try:
            if start is None:
                start = str(await run_in_threadpool(feed.head))
            page = await run_in_threadpool(first_page, start, repository, 500)
        except BaseException:
            slot.release()
            raise
        board = manager.progress if progress and manager is not None else None
        stream = _stream(page, repository, slot, board)
        # A client gone before the body starts leaves the generator unstarted, and its
        # ``finally`` unrun: the slot is then released when the generator is collected.
        weakref.finalize(stream, slot.release)
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def progress_events(board: ProgressBoard, repo_id: UUID | None, seen: int) -> tuple[int, str]:
        """The scans' progress as SSE blocks, if the board changed since version ``seen``."""
        if board.version == seen:
            return seen, ""
        version, items = board.snapshot()
        blocks = [
            f"event: progress\ndata: {json.dumps(p.to_json(), ensure_ascii=True)}\n\n"
            for p in items
            if repo_id is None or p.repository_id == repo_id
        ]
        return version, "".join(blocks)

    async def _wait(
        cursor: Cursor, board: ProgressBoard | None, repo_id: UUID | None, seen: int
    ) -> AsyncIterator[tuple[bool, int, str]]:
        """Wait for the feed to move past ``cursor`` (at most ``heartbeat_s``), yielding
        (woke, progress version, progress blocks) whenever the board changes meanwhile."""
        if board is None:
            yield await feed_hub.wait_async(cursor.seq, heartbeat_s), seen, ""
            return
        waited = 0.0
        while True:
            step = min(PROGRESS_POLL_S, heartbeat_s - waited)
            woke = await feed_hub.wait_async(cursor.seq, step)
            waited += step
            seen, blocks = progress_events(board, repo_id, seen)
            if woke or waited >= heartbeat_s or feed_hub.closed:
                yield woke, seen, blocks
                return
            if blocks:
                yield False, seen, blocks

    async def _stream(
        page: FeedPage, repo_id: UUID | None, slot: _Slot, board: ProgressBoard | None
    ) -> AsyncIterator[str]:
        try:
            # A comment only: a block with a field but no data (``retry:``) made stock clients
            # yield an empty message. The retry delay rides on the first event instead.
            yield ": fsledger change feed\n\n"
            retry = "retry: 2000\n"
            seen = -1
            if board is not None:
                seen, blocks = progress_events(board, repo_id, seen)
                if blocks:
                    yield blocks
            # Only changes sent once the stream had caught up (and waited) are delivery
            # latency: a replay of older ones (a client resuming from an old cursor, the
            # first page) buried every live sample.
            live = False
            while True:
                fid = page.cursor.feed_id
                now = utcnow()
                # A page goes out as one chunk: one send, not one per event, when a burst
                # fills pages (the events are the same bytes either way).
                events: list[str] = []
                for entry in page.entries:
                    data = json.dumps(entry_json(entry, fid), ensure_ascii=True)
                    ident = entry_cursor(entry, fid)
                    events.append(f"{retry}id: {ident}\nevent: change\ndata: {data}\n\n")
                    retry = ""
                    if live:
                        metrics.delivery_latency.observe(
                            max((now - entry.recorded_at).total_seconds(), 0.0)
                        )
                if events:
                    yield "".join(events)
                cursor = page.cursor
                if not page.has_more:
                    live = True
                    woke = False
                    async for got, version, blocks in _wait(cursor, board, repo_id, seen):
                        woke, seen = got, version
                        if blocks:
                            yield blocks
                    if feed_hub.closed:
                        return
                    if not woke:
                        yield ": heartbeat\n\n"
                try:
                    page = await run_in_threadpool(feed.read, cursor, 500, repo_id)
                except ResyncNeeded as exc:
                    body = {"error": "resync_needed", "detail": str(exc), "cursor": exc.cursor}
                    yield f"event: resync\ndata: {json.dumps(body)}\n\n"
                    return
                except StoreError as exc:
                    log.warning("SSE stream: the store failed, ending the stream: %s", exc)
                    return
        finally:
            slot.release()

    add_schedule_routes(api, ledger, manager)
    add_dashboard_routes(api, ledger, get_repo)
    app.include_router(api)
    add_s3_event_routes(app, ledger, token)
    _document_webhooks(app)
    app.add_middleware(Guard, loopback_only=token is None)
    return app


def _document_webhooks(app: FastAPI) -> None:
    """The deliveries of ``fsledger run --webhook URL`` in the OpenAPI document's
    ``webhooks``: what a receiver gets, and how it is signed."""

    @app.webhooks.post(
        "changes",
        status_code=204,
        tags=["feed"],
        openapi_extra={
            "parameters": [
                {"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
                for h in ("webhook-id", "webhook-timestamp", "webhook-signature")
            ]
        },
    )
    def changes_delivered(body: schemas.WebhookChanges | schemas.WebhookResync) -> None:
        """A batch of the change feed, POSTed until the receiver answers 2xx, signed per
        Standard Webhooks (``webhook-signature: v1,<base64 HMAC-SHA256 of
        "webhook-id.webhook-timestamp.body">``, verifiable with the ``standardwebhooks``
        package). ``webhook-id`` is stable across retries. Apply the changes if ``since``
        is your last cursor, then store ``cursor``; see docs/api.md for the other cases."""


__all__ = ["create_app", "ApiError"]
