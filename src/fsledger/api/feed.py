"""The change feed moved into the core (``fsledger.feed``): it imports no web framework, so
``fsledger changes`` and library users read it without loading the HTTP stack. This module
keeps the old import path working."""

from __future__ import annotations

from fsledger.feed import Cursor, Feed, FeedHub, FeedPage, Retention, entry_json

__all__ = ["Cursor", "Feed", "FeedHub", "FeedPage", "Retention", "entry_json"]
