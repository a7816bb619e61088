"""Webhooks: POST batches of the change feed to a URL, signed, retried, resumed.

Each URL has one dispatcher thread and one durable cursor in the store (table
``feed_consumers``, named ``webhook:URL``). A batch is read after the cursor, POSTed until
the receiver answers 2xx (retrying with capped exponential backoff, forever: a change is
never skipped), and only then is the cursor advanced. So after a crash or restart the
dispatcher resumes where the receiver last acknowledged: delivery is at-least-once, and a
batch that is sent again carries the same ``X-Fsledger-Delivery`` id for the receiver to
recognise it.

The body is JSON::

    {"changes": [...], "cursor": "FEED:SEQ", "since": "FEED:SEQ"}

signed with HMAC-SHA256 over the exact body bytes, keyed by ``FSLEDGER_WEBHOOK_SECRET``::

    X-Fsledger-Signature: sha256=<hex>

A receiver verifies it with ``hmac.compare_digest(expected, header)``. When the cursor
falls behind the retention window (the receiver was unreachable for longer than the feed
keeps entries), one ``{"resync_needed": true, "cursor": ...}`` body is delivered instead,
and the dispatcher continues from that newest cursor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import threading
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from fsledger.errors import ConfigError, ResyncNeeded, StoreError
from fsledger.feed import Cursor, Feed, FeedHub, entry_json
from fsledger.store.base import Store

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fsledger-Signature"
DELIVERY_HEADER = "X-Fsledger-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The signature header value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant-time)."""
    return hmac.compare_digest(sign(secret, body), header)


def check_url(url: str) -> str:
    """Validate a webhook URL.

    Raises:
        ConfigError: not an absolute http(s) URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"webhook URL {url!r} must be an absolute http:// or https:// URL")
    return url


def display_url(url: str) -> str:
    """The URL without credentials or query string, for logs and metric labels."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass
class WebhookStats:
    """Counters of one dispatcher (read by /metrics)."""

    delivered_batches: int = 0
    delivered_changes: int = 0
    failed_attempts: int = 0
    cursor_seq: int = 0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class WebhookDispatcher:
    """Delivers the change feed to one URL.

    Args:
        url: the receiver.
        secret: HMAC key of the signature header.
        store: where the feed and the dispatcher's cursor live.
        hub: wakes the dispatcher when the feed grows.
        batch_size: changes per POST at most.
        timeout_s: per-request timeout.
        backoff_s: first retry delay; doubled per failure up to ``max_backoff_s``.
        transport: an httpx transport (tests); the network when omitted.
    """

    def __init__(
        self,
        url: str,
        secret: str,
        store: Store,
        hub: FeedHub,
        *,
        batch_size: int = 500,
        timeout_s: float = 10.0,
        backoff_s: float = 0.5,
        max_backoff_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = check_url(url)
        self.name = "webhook:" + url
        self.secret = secret
        self.store = store
        self.feed = Feed(store)
        self.hub = hub
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stats = WebhookStats()
        self._client = httpx.Client(
            timeout=timeout_s,
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": "fsledger-webhook/1"},
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"fsledger-webhook-{display_url(self.url)}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the request in flight (its batch is sent again after a restart unless
        it was acknowledged)."""
        self._stop.set()
        self.hub.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._client.close()

    # --- the loop -----------------------------------------------------------------------
    def _initial_cursor(self) -> Cursor:
        head = self.feed.head()
        stored = self.store.get_consumer_position(self.name)
        if stored is None:
            # A new webhook starts at the present: it is not flooded with the history.
            self.store.set_consumer_cursor(self.name, head.seq, head.tag or 0)
            log.info("Webhook %s starts at cursor %s", display_url(self.url), head)
            return head
        return Cursor(head.feed_id, stored[0], stored[1])

    def _run(self) -> None:
        cursor: Cursor | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if cursor is None:
                    cursor = self._initial_cursor()
                    self.stats.cursor_seq = cursor.seq
                cursor = self._step(cursor)
                failures = 0
            except StoreError as exc:
                failures += 1
                log.error("Webhook %s: the store failed: %s", display_url(self.url), exc)
                self._stop.wait(self._delay(failures))
            except Exception:
                failures += 1
                log.exception("Webhook %s failed", display_url(self.url))
                self._stop.wait(self._delay(failures))

    def _step(self, cursor: Cursor) -> Cursor:
        try:
            page = self.feed.read(cursor, self.batch_size)
        except ResyncNeeded as exc:
            log.warning("Webhook %s: %s", display_url(self.url), exc)
            body = {"resync_needed": True, "detail": str(exc), "cursor": exc.cursor}
            new = Cursor.parse(exc.cursor)
            if self._deliver(_dump(body), f"resync:{cursor}"):
                self._advance(new, 0)
                return new
            return cursor
        if not page.entries:
            if page.cursor.seq != cursor.seq:
                self._advance(page.cursor, 0)
            if not self.hub.wait(page.cursor.seq, 5.0, self._stop) and self.hub.closed:
                self._stop.wait(1.0)  # no wake-ups any more: poll instead of spinning
            return page.cursor
        body = {
            "changes": [entry_json(e, page.cursor.feed_id) for e in page.entries],
            "cursor": str(page.cursor),
            "since": str(cursor),
        }
        delivery = f"{page.cursor.feed_id}:{page.entries[0].seq}-{page.entries[-1].seq}"
        if self._deliver(_dump(body), delivery):
            self._advance(page.cursor, len(page.entries))
            return page.cursor
        return cursor

    def _advance(self, cursor: Cursor, changes: int) -> None:
        self.store.set_consumer_cursor(self.name, cursor.seq, cursor.tag or 0)
        with self.stats.lock:
            self.stats.cursor_seq = cursor.seq
            if changes:
                self.stats.delivered_batches += 1
                self.stats.delivered_changes += changes

    def _delay(self, failures: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(failures - 1, 0))
        # Jitter, so that receivers coming back are not stampeded by every sender at once.
        return float(base * random.uniform(0.5, 1.0))

    def _deliver(self, body: bytes, delivery: str) -> bool:
        """POST one body until it is acknowledged (True) or the dispatcher stops (False)."""
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body),
            DELIVERY_HEADER: delivery,
        }
        failures = 0
        while not self._stop.is_set():
            try:
                response = self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= response.status_code < 300:
                    return True
                error = f"HTTP {response.status_code}"
            failures += 1
            delay = self._delay(failures)
            with self.stats.lock:
                self.stats.failed_attempts += 1
                self.stats.last_error = error
            log.warning(
                "Webhook %s: delivery %s failed (%s), retry %d in %.1fs",
                display_url(self.url),
                delivery,
                error,
                failures,
                delay,
            )
            self._stop.wait(delay)
        return False


def _dump(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()


__all__ = ["WebhookDispatcher", "sign", "verify", "check_url", "SIGNATURE_HEADER"]
