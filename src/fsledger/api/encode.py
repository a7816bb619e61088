"""Change-feed pages as JSON bytes, straight from the store's flat rows.

``GET /api/v1/changes`` is the API's hot path: a consumer catching up reads thousands of
changes at once. Per-change objects, pydantic validation and the stdlib encoder cost more
than the database; here a page is one dict per row and one ``orjson.dumps`` (the schema
it conforms to is still ``schemas.ChangesPage``, checked by the OpenAPI tests).
"""

from __future__ import annotations

from base64 import b64encode

import orjson

from fsledger.feed import RowsPage


def changes_json(page: RowsPage) -> bytes:
    """The JSON body of one page: the same shape as ``FeedPage.to_json``."""
    fid = page.cursor.feed_id
    changes: list[dict[str, object]] = []
    append = changes.append
    for seq, repo, kind, path, old, size, chash, algo, recorded, tag in page.rows:
        change = {
            "seq": seq,
            "repository_id": repo,
            "kind": kind,
            "path": path.decode("utf-8", "replace"),
            "path_b64": b64encode(path).decode("ascii"),
            "size": size,
            "hash": chash,
            "hash_algo": algo,
            "recorded_at": recorded,
            "cursor": f"{fid}:{seq}:{tag:08x}",
        }
        if old is not None:
            change["old_path"] = old.decode("utf-8", "replace")
            change["old_path_b64"] = b64encode(old).decode("ascii")
        append(change)
    return orjson.dumps({"changes": changes, "cursor": str(page.cursor), "has_more": page.has_more})


__all__ = ["changes_json"]
