"""The service surface of fsledger: HTTP API, change feed readers, webhooks, dashboard.

``create_app`` builds the ASGI app; ``Service`` runs it (with the feed hub and webhooks)
inside ``fsledger run``. The feed logic in ``feed`` and ``webhooks`` imports no web
framework.
"""

from __future__ import annotations

from fsledger.api.app import create_app
from fsledger.api.server import Service, parse_listen
from fsledger.api.webhooks import WebhookDispatcher, sign, verify
from fsledger.feed import Cursor, Feed, FeedHub, FeedPage, Retention

__all__ = [
    "Cursor",
    "Feed",
    "FeedHub",
    "FeedPage",
    "Retention",
    "Service",
    "WebhookDispatcher",
    "create_app",
    "parse_listen",
    "sign",
    "verify",
]
