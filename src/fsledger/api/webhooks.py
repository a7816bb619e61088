"""Webhooks: POST batches of the change feed to a URL, signed per Standard Webhooks, retried,
resumed.

Each URL has one dispatcher thread and one durable cursor in the store (table
``feed_consumers``, named ``webhook:URL``). A batch is read after the cursor, POSTed until
the receiver answers 2xx (retrying with capped exponential backoff, forever: a change is
never skipped), and only then is the cursor advanced. So after a crash or restart the
dispatcher resumes where the receiver last acknowledged: delivery is at-least-once, and a
batch sent again carries the same ``webhook-id`` for the receiver to recognise it.

Where a new webhook (one without a stored cursor) starts is explicit: ``now`` (the head:
only what happens next), ``start`` (the oldest entry kept: the history first) or a cursor
(``fsledger run --webhook-from``).

The body is JSON (``schemas.WebhookChanges`` / ``WebhookResync``, in the OpenAPI document's
``webhooks``)::

    {"type": "changes", "since": "F:S:T", "cursor": "F:S:T", "changes": [...]}
    {"type": "resync_needed", "since": "F:S:T", "cursor": "F:S:T", "detail": "..."}

``since`` is the cursor the batch follows, ``cursor`` the one after it: a receiver whose own
cursor is not ``since`` missed something, or the database was restored (see docs/api.md).

Signed as the Standard Webhooks specification says (any of its libraries verifies it, e.g.
``standardwebhooks.Webhook(secret).verify(body, headers)``)::

    webhook-id: <stable id of the batch>
    webhook-timestamp: <Unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">

The id and the timestamp are signed with the body, and each attempt is signed afresh, so a
receiver that rejects stale timestamps (the libraries do, after five minutes) cannot be fed
a replayed delivery.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from fsledger.config import webhook_key
from fsledger.errors import ConfigError, ResyncNeeded, StoreError
from fsledger.feed import Cursor, Feed, FeedHub, entry_json
from fsledger.store.base import Store

log = logging.getLogger(__name__)

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
TOLERANCE_S = 300
"""How far a delivery's timestamp may be from the receiver's clock (the specification's)."""


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of one attempt: ``v1,<base64 HMAC-SHA256>`` of
    ``id.timestamp.body``."""
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def verify(key: bytes, headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """Whether a delivery is authentic and fresh: one of the header's signatures matches
    (constant-time) and its timestamp is within ``TOLERANCE_S`` of ``now``. The same check
    as the Standard Webhooks libraries, for receivers written with fsledger itself."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, given = (lower.get(h) for h in (ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (msg_id and stamp and given and stamp.isdigit()):
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE_S:
        return False
    expected = sign(key, msg_id, int(stamp), body)
    return any(hmac.compare_digest(expected, s) for s in given.split(" "))


def start_cursor(text: str, feed: Feed) -> Cursor:
    """Where a new webhook starts: ``now``, ``start`` or a cursor.

    Raises:
        ConfigError: none of these.
    """
    if text == "now":
        return feed.head()
    if text == "start":
        return Cursor(feed.head().feed_id, 0, 0)
    try:
        return Cursor.parse(text)
    except ConfigError:
        raise ConfigError(
            f"--webhook-from {text[:80]!r}: expected now, start or a change-feed cursor"
        ) from None


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
        secret: ``FSLEDGER_WEBHOOK_SECRET`` (see ``fsledger.config.webhook_key``).
        store: where the feed and the dispatcher's cursor live.
        hub: wakes the dispatcher when the feed grows.
        batch_size: changes per POST at most.
        timeout_s: per-request timeout.
        backoff_s: first retry delay; doubled per failure up to ``max_backoff_s``.
        transport: an httpx transport (tests); the network when omitted.
        start: where the webhook starts when it has no stored cursor: ``now``, ``start`` or
            a cursor (``start_cursor``).

    Raises:
        ConfigError: the URL, the secret or ``start`` is not acceptable.
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
        start: str = "now",
    ) -> None:
        self.url = check_url(url)
        self.name = "webhook:" + url
        self.key = webhook_key(secret)
        self.store = store
        self.feed = Feed(store)
        if start not in ("now", "start"):
            start_cursor(start, self.feed)  # refused now, not in the thread
        self.start_at = start
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
        stored = self.store.get_consumer_position(self.name)
        if stored is None:
            first = start_cursor(self.start_at, self.feed)
            self.store.set_consumer_cursor(self.name, first.seq, first.tag or 0)
            log.info(
                "Webhook %s starts at cursor %s (%s)", display_url(self.url), first, self.start_at
            )
            return first
        return Cursor(self.feed.head().feed_id, stored[0], stored[1])

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
            new = Cursor.parse(exc.cursor)
            body: dict[str, object] = {
                "type": "resync_needed",
                "since": str(cursor),
                "cursor": exc.cursor,
                "detail": str(exc),
            }
            if self._deliver(_dump(body), f"resync_{new.feed_id}_{new.seq}_{new.tag or 0:08x}"):
                self._advance(new, 0)
                return new
            return cursor
        if not page.entries:
            if page.cursor.seq != cursor.seq:
                self._advance(page.cursor, 0)
            if not self.hub.wait(page.cursor.seq, 5.0, self._stop) and self.hub.closed:
                self._stop.wait(1.0)  # no wake-ups any more: poll instead of spinning
            return page.cursor
        batch: dict[str, object] = {
            "type": "changes",
            "since": str(cursor),
            "cursor": str(page.cursor),
            "changes": [entry_json(e, page.cursor.feed_id) for e in page.entries],
        }
        last = page.entries[-1]
        # Stable across retries and restarts; the tag tells apart the batches a restored
        # database numbers alike.
        delivery = f"msg_{page.cursor.feed_id}_{page.entries[0].seq}_{last.seq}_{last.tag:08x}"
        if self._deliver(_dump(batch), delivery):
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
        failures = 0
        while not self._stop.is_set():
            stamp = int(time.time())  # each attempt signed afresh: retries stay fresh
            headers = {
                "Content-Type": "application/json",
                ID_HEADER: delivery,
                TIMESTAMP_HEADER: str(stamp),
                SIGNATURE_HEADER: sign(self.key, delivery, stamp, body),
            }
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


__all__ = [
    "ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "WebhookDispatcher",
    "check_url",
    "sign",
    "start_cursor",
    "verify",
]
