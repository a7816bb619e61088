"""What keeps the API to the people it is for, as ASGI middleware and helpers.

* Without ``FSLEDGER_API_TOKEN`` the server listens on loopback only (``server.py``) and
  answers only requests whose Host is a loopback name: a web page cannot reach it through
  DNS rebinding.
* A request that changes something and carries a foreign ``Origin`` is refused (CSRF from a
  page in the user's browser).
* Request bodies are bounded (64 KiB), chunked ones included.
"""

from __future__ import annotations

import ipaddress
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 64 * 1024
_LOOPBACK_NAMES = {"localhost", "localhost.", "ip6-localhost"}


def error_response(status: int, error: str, detail: str, **extra: Any) -> JSONResponse:
    """The API's error body: ``{"error": CODE, "detail": TEXT, ...}``."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": error, "detail": detail, **extra}, status, headers=headers)


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address (without port) names this machine's loopback."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(value: str) -> str:
    """The host of a Host header value (``name:port`` or ``[v6]:port``)."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """ASGI middleware: Host allow-list (loopback mode), Origin check on writes, body bound,
    and security headers on every response."""

    def __init__(self, app: ASGIApp, loopback_only: bool, max_body: int = MAX_BODY) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback_host(_host_of(host)):
            await error_response(
                421,
                "misdirected",
                f"this server answers only loopback host names without a token (got {host!r})",
            )(scope, receive, send)
            return
        method = scope["method"]
        origin = headers.get("origin")
        unsafe = method not in ("GET", "HEAD", "OPTIONS")
        if unsafe and origin and urlsplit(origin).netloc.lower() != host.lower():
            await error_response(403, "forbidden", "cross-origin request refused")(
                scope, receive, send
            )
            return
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                await error_response(
                    413, "too_large", f"request bodies are limited to {self.max_body}"
                )(scope, receive, send)
                return
            body, ok = await self._read_body(receive)
            if not ok:
                await error_response(
                    413, "too_large", f"request bodies are limited to {self.max_body}"
                )(scope, receive, send)
                return
            receive = _replay(body, receive)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"),
                ]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), True


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


__all__ = ["Guard", "MAX_BODY", "error_response", "is_loopback_host"]
