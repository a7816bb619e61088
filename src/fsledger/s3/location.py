"""Where a bucket is: ``s3://BUCKET[/PREFIX]`` plus an optional endpoint, and a client for it.

Credentials, region and endpoint come from the standard AWS chain (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``,
``AWS_PROFILE`` and the shared config/credentials files), resolved by botocore: fsledger stores
the location only (``str(location)`` and ``endpoint_url``), never a secret. An endpoint given
explicitly (``--endpoint-url``) wins over ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fsledger.errors import ConfigError

SCHEME = "s3://"
# S3's bucket naming rules (3-63 characters, lower case, digits, dots and hyphens), loosened
# to allow the underscores and capitals some S3-compatible servers accept.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,62}$")


def is_s3_url(text: str | bytes) -> bool:
    """True when ``text`` names a bucket (``s3://...``) rather than a local path."""
    if isinstance(text, bytes):
        return text.startswith(SCHEME.encode())
    return text.startswith(SCHEME)


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix in it ("" for the whole bucket; otherwise ending in "/")."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None

    @classmethod
    def parse(cls, url: str, endpoint_url: str | None = None) -> S3Location:
        """``s3://BUCKET[/PREFIX]`` -> a location; a bad URL is a ConfigError (exit 2).

        User info, query strings and fragments are refused: secrets never ride in the URL.
        """
        if not is_s3_url(url):
            raise ConfigError(f"not an S3 URL (s3://BUCKET[/PREFIX]): {url!r}")
        parts = urlsplit(url)
        if parts.username or parts.password or "@" in parts.netloc:
            raise ConfigError("an S3 URL must not carry credentials: use the AWS variables")
        if parts.query or parts.fragment:
            raise ConfigError(f"an S3 URL takes no query or fragment: {url!r}")
        bucket = parts.netloc
        if not _BUCKET.match(bucket):
            raise ConfigError(f"not a valid bucket name: {bucket!r}")
        prefix = parts.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if "//" in prefix:
            raise ConfigError(f"an S3 prefix must not hold an empty segment: {url!r}")
        if endpoint_url is not None:
            endpoint = urlsplit(endpoint_url)
            if endpoint.scheme not in {"http", "https"} or not endpoint.netloc:
                raise ConfigError(f"not an http(s) endpoint URL: {endpoint_url!r}")
            if endpoint.username or endpoint.password:
                raise ConfigError("an endpoint URL must not carry credentials")
        return cls(bucket, prefix, endpoint_url)

    def __str__(self) -> str:
        return (
            f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")
            if self.prefix
            else (f"{SCHEME}{self.bucket}")
        )

    def key(self, relative: str) -> str:
        """The object key of ``relative`` (a path below the prefix)."""
        return self.prefix + relative

    def relative(self, key: str) -> str:
        """The path of ``key`` below the prefix (``key`` must start with it)."""
        if not key.startswith(self.prefix):
            raise ValueError(f"{key!r} is not below {self.prefix!r}")
        return key[len(self.prefix) :]


def require_boto3() -> Any:
    """boto3, or a ConfigError (exit 2) naming the extra to install."""
    try:
        import boto3
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("S3 support needs the s3 extra: pip install 'fsledger[s3]'") from exc
    return boto3


def make_client(location: S3Location, *, max_pool: int = 16, timeout_s: float = 30.0) -> Any:
    """A boto3 S3 client for ``location``: credentials and region from the AWS chain, the
    location's endpoint (else ``AWS_ENDPOINT_URL`` through botocore), a connection pool sized
    for ``max_pool`` concurrent requests, bounded timeouts and standard retries."""
    boto3 = require_boto3()
    from botocore.config import Config

    config = Config(
        max_pool_connections=max_pool,
        connect_timeout=min(timeout_s, 10.0),
        read_timeout=timeout_s,
        retries={"max_attempts": 3, "mode": "standard"},
    )
    session = boto3.session.Session()
    kwargs: dict[str, Any] = {"config": config}
    if location.endpoint_url:
        kwargs["endpoint_url"] = location.endpoint_url
    if session.region_name is None:
        kwargs["region_name"] = "us-east-1"
    return session.client("s3", **kwargs)
