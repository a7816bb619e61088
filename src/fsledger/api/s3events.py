"""S3 event notifications as hints: ``POST /api/v1/s3/events``.

Accepted bodies (each names objects that changed; each object is then looked at, HEAD and
a GET only if its change key moved, through its repository's writer: ``Ledger.object_hints``):

- the AWS S3 event message: ``{"Records": [{"eventName": "ObjectCreated:Put", "s3":
  {"bucket": {"name": ...}, "object": {"key": ...}}}]}`` with URL-encoded keys (``+`` for a
  space), as Ceph RGW's HTTP push endpoints and MinIO's webhook targets send it too (MinIO
  adds ``EventName``/``Key`` beside ``Records`` and prefixes event names with ``s3:``);
- the same message inside an SNS HTTP(S) subscription's envelope (``Type: Notification``,
  the message as the JSON string ``Message``); an SNS ``SubscriptionConfirmation`` is
  confirmed by fetching its ``SubscribeURL``, but only from an ``https://sns.*.amazonaws.com``
  address (nothing else is ever fetched);
- ``s3:TestEvent`` messages (S3 sends one when notifications are configured): answered 200.

Authentication follows the API's rules: with ``FSLEDGER_API_TOKEN`` set, ``Authorization:
Bearer TOKEN``, or HTTP Basic with the token as the password (SNS and some servers can only
send credentials in the endpoint URL: ``https://fsledger:TOKEN@host/api/v1/s3/events``).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from fsledger.api import schemas
from fsledger.api.security import error_response
from fsledger.errors import RootUnavailable
from fsledger.ledger import Ledger

log = logging.getLogger(__name__)

__all__ = ["S3Event", "add_s3_event_routes", "parse_s3_event", "sns_url_allowed"]


@dataclass(slots=True)
class S3Event:
    """What one POSTed body says."""

    objects: list[tuple[str, str]] = field(default_factory=list)
    """(bucket, key) of each object named, key URL-decoded."""
    subscribe_url: str | None = None
    """An SNS subscription to confirm."""
    test: bool = False


def parse_s3_event(body: bytes) -> S3Event:
    """Read an S3 event notification (bare, MinIO, Ceph RGW, or in an SNS envelope).

    Raises:
        ValueError: the body is not one of those.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("an S3 event message is a JSON object")
    kind = data.get("Type")
    if kind == "SubscriptionConfirmation":
        url = data.get("SubscribeURL")
        if not isinstance(url, str):
            raise ValueError("SubscriptionConfirmation without SubscribeURL")
        return S3Event(subscribe_url=url)
    if kind == "UnsubscribeConfirmation":
        return S3Event(test=True)
    if kind == "Notification":
        message = data.get("Message")
        if not isinstance(message, str):
            raise ValueError("SNS Notification without a Message string")
        return parse_s3_event(message.encode())
    if data.get("Event") == "s3:TestEvent":
        return S3Event(test=True)
    records = data.get("Records")
    if not isinstance(records, list):
        raise ValueError("no Records in the S3 event message")
    out = S3Event()
    for rec in records:
        try:
            s3 = rec["s3"]
            bucket = s3["bucket"]["name"]
            key = s3["object"]["key"]
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"an S3 event record without s3.bucket.name/object.key: {exc}"
            ) from exc
        if not isinstance(bucket, str) or not isinstance(key, str):
            raise ValueError("bucket name and object key must be strings")
        out.objects.append((bucket, unquote_plus(key)))
    return out


def sns_url_allowed(url: str) -> bool:
    """Whether ``url`` is an SNS endpoint of AWS (the only address a confirmation fetches)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return (
        parts.scheme == "https"
        and parts.username is None
        and host.startswith("sns.")
        and host.endswith((".amazonaws.com", ".amazonaws.com.cn"))
    )


def _confirm(url: str) -> None:  # pragma: no cover - reaches AWS
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - checked above
        resp.read(65536)


def _token_given(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


def add_s3_event_routes(
    app: FastAPI,
    ledger: Ledger,
    token: str | None,
    confirm: Callable[[str], None] = _confirm,
) -> None:
    """Register ``POST /api/v1/s3/events`` on ``app``."""

    error = {"model": schemas.ErrorOut}
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "description": "An S3 event notification message (Records[].s3), "
                        "bare or in an SNS envelope (Type, Message), or a MinIO webhook body.",
                    }
                }
            },
        }
    }
    if token is not None:
        extra["security"] = [{"HTTPBearer": []}]

    @app.post(
        "/api/v1/s3/events",
        tags=["s3"],
        response_model=None,
        responses={
            200: {"model": schemas.S3EventsOut},
            400: error,
            401: error,
            503: error,
        },
        openapi_extra=extra,
    )
    async def s3_events(request: Request) -> JSONResponse:
        """Apply the hints of an S3 event notification (AWS, SNS, MinIO, Ceph RGW): each
        object named is looked at (HEAD, GET if changed) and its record written."""
        if token is not None and not hmac.compare_digest(
            _token_given(request).encode(), token.encode()
        ):
            return error_response(401, "unauthorized", "a valid token is needed (Bearer or Basic)")
        body = await request.body()
        try:
            event = parse_s3_event(body)
        except ValueError as exc:
            return error_response(400, "bad_request", str(exc))
        if event.subscribe_url is not None:
            if not sns_url_allowed(event.subscribe_url):
                return error_response(
                    400, "bad_request", "SubscribeURL is not an https://sns.*.amazonaws.com address"
                )
            await run_in_threadpool(confirm, event.subscribe_url)
            log.info("SNS subscription confirmed")
            return JSONResponse({"confirmed": True, "applied": 0, "repositories": []})
        by_bucket: dict[str, list[str]] = {}
        for bucket, key in event.objects:
            by_bucket.setdefault(bucket, []).append(key)
        applied: list[dict[str, Any]] = []
        try:
            for bucket, keys in by_bucket.items():
                done = await run_in_threadpool(ledger.object_hints, bucket, keys)
                applied += [
                    {"repository_id": str(repo.id), "changes": len(a.changes)} for repo, a in done
                ]
        except RootUnavailable as exc:
            # The sender retries (SNS, MinIO's queue): nothing was lost.
            return error_response(503, "unavailable", str(exc))
        return JSONResponse(
            {"applied": sum(a["changes"] for a in applied), "repositories": applied}
        )
