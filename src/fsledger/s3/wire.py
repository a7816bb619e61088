"""Lean S3 requests for a mirror's hot path: PutObject of a small body, CopyObject.

botocore spends about 1.7 ms of CPU on every request (its event hooks, parameter validation,
serialisation, endpoint rules, header parsing through urllib3); an initial mirror of a
library of small files is that many requests, and on a busy machine that CPU is what a
mirror waits for (rclone spends about 0.9 ms a file in all). ``LeanS3`` makes the same two
requests directly: signed by botocore's own SigV4 signer (``botocore.auth.S3SigV4Auth``, no
signing code of ours), sent on one ``http.client`` connection per thread, kept alive.

It borrows everything else from the botocore client it is made from, so that it goes where
that client goes and as it: the credentials (refreshed by botocore), the region, the URL of
an object (``generate_presigned_url``: addressing style, endpoint rules), the TLS
verification. It is not used (``LeanS3.of`` answers None) when anything would make the
request differ from botocore's: a proxy, a client certificate, another signature version, an
endpoint that is not plain http(s).

It never decides an error: any answer but the one expected (an error status, a 200 carrying
an error, a broken connection twice) raises ``LeanFailed``, and the caller makes the request
again through botocore, whose retries and errors are the ones the rest of fsledger handles.
"""

from __future__ import annotations

import http.client
import logging
import select
import ssl
import threading
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

log = logging.getLogger(__name__)

_PROBE = "fsledger-probe-key"
REFUSALS = 3
"""Lean requests refused in a row (a 3xx or 4xx: a bucket in another region, a clock or a
signature the server disagrees with) after which the lean path is given up for good."""


class LeanFailed(Exception):
    """The lean request did not get the answer it expected: make it through botocore."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class LeanS3:
    """Signed PUT and COPY requests to one bucket, one kept-alive connection per thread."""

    def __init__(
        self,
        credentials: Any,
        region: str,
        scheme: str,
        host: str,
        base_path: str,
        bucket: str,
        ssl_context: ssl.SSLContext | None,
        timeout_s: float,
    ) -> None:
        self._credentials = credentials
        self.region = region
        self.scheme = scheme
        self.host = host
        self.base_path = base_path
        self.bucket = bucket
        self._ssl = ssl_context
        self._timeout = timeout_s
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._refused = 0

    @property
    def usable(self) -> bool:
        """False once ``REFUSALS`` requests in a row were refused: botocore knows better
        (it follows region redirects, corrects clock skew)."""
        return self._refused < REFUSALS

    def _answer(self, status: int, ok: bool) -> None:
        if ok:
            self._refused = 0
        elif 300 <= status < 500:
            self._refused += 1

    @classmethod
    def of(cls, client: Any, bucket: str) -> LeanS3 | None:
        """The lean twin of a botocore S3 ``client`` for ``bucket``; None when its requests
        would not be the same as the client's (see the module's doc) or cannot be derived."""
        try:
            signer = client._request_signer
            if getattr(signer, "_signature_version", None) not in ("s3v4", "v4"):
                return None
            credentials = signer._credentials
            if credentials is None or credentials.get_frozen_credentials().access_key is None:
                return None
            session = client._endpoint.http_session
            url = client.generate_presigned_url(
                "put_object", Params={"Bucket": bucket, "Key": _PROBE}, ExpiresIn=60
            )
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.path.endswith("/" + _PROBE):
                return None
            if session._proxy_config.proxy_url_for(url) or getattr(session, "_cert", None):
                return None
            context = None
            if parts.scheme == "https":
                verify = session._verify
                if verify is False:
                    context = ssl._create_unverified_context()
                else:
                    from botocore.httpsession import get_cert_path

                    context = ssl.create_default_context(cafile=get_cert_path(verify))
            config = client.meta.config
            timeout = float(config.read_timeout or 60)
            return cls(
                credentials,
                client.meta.region_name or "us-east-1",
                parts.scheme,
                parts.netloc,
                parts.path[: -len(_PROBE)],
                bucket,
                context,
                timeout,
            )
        except Exception as exc:  # noqa: BLE001 - a botocore whose insides moved: no lean path
            log.debug("No lean S3 requests for %s: %s", bucket, exc)
            return None

    # --- requests -----------------------------------------------------------------------
    def put(self, key: str, body: bytes, content_md5: str, metadata: dict[str, str]) -> str:
        """PutObject; the server checks ``content_md5`` (base64). Returns the ETag, unquoted."""
        headers = {"content-md5": content_md5}
        for name, value in metadata.items():
            headers["x-amz-meta-" + name.lower()] = value
        status, answer, _ = self._request("PUT", key, headers, body)
        self._answer(status, status == 200)
        if status != 200:
            raise LeanFailed(f"PUT answered {status}", status)
        return (answer.get("etag") or "").strip('"')

    def copy(self, src: str, dst: str, metadata: dict[str, str], if_match: str) -> str | None:
        """CopyObject of ``src`` to ``dst`` with ``metadata`` (REPLACE), only if ``src``'s
        ETag is ``if_match`` (x-amz-copy-source-if-match, checked by the server). Returns the
        new object's ETag, unquoted; None when the precondition failed (412)."""
        headers = {
            "x-amz-copy-source": quote(f"{self.bucket}/{src}", safe="/~"),
            "x-amz-copy-source-if-match": f'"{if_match}"',
            "x-amz-metadata-directive": "REPLACE",
        }
        for name, value in metadata.items():
            headers["x-amz-meta-" + name.lower()] = value
        status, _, data = self._request("PUT", dst, headers, b"")
        if status == 412:
            self._answer(status, True)
            return None
        # A copy can fail after its 200 was sent: the error is then the body.
        ok = status == 200 and b"<Error>" not in data and b"<CopyObjectResult" in data
        self._answer(status, ok)
        if not ok:
            raise LeanFailed(f"CopyObject answered {status}", status)
        start, end = data.find(b"<ETag>"), data.find(b"</ETag>")
        if start < 0 or end < start:
            raise LeanFailed("CopyObject answered without an ETag", status)
        etag = data[start + 6 : end].decode()
        return etag.replace("&quot;", "").replace("&#34;", "").strip('"')

    def warm(self) -> None:
        """Open this thread's connection now if it is not (or the server closed it while
        it was idle); never raises (the request that follows finds out)."""
        try:
            conn = self._conn()
            sock = conn.sock
            if sock is not None and self.scheme == "http":
                # An idle kept-alive connection is readable only when the server closed it.
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    conn = self._conn(fresh=True)
            if conn.sock is None:
                conn.connect()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            log.debug("Could not open a connection to %s: %s", self.host, exc)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # --- the wire -----------------------------------------------------------------------
    def _conn(self, fresh: bool = False) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, timeout=self._timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(self.host, timeout=self._timeout)
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn

    def _request(
        self, method: str, key: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        path = self.base_path + quote(key, safe="/~")
        signed = self._sign(method, path, headers, body)
        for attempt in (0, 1):
            conn = self._conn(fresh=attempt > 0)
            try:
                # One send for the headers and a bytes body (no Nagle delay between them).
                conn.request(method, path, body=body, headers=signed)
                response = conn.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                # A kept-alive connection the server closed meanwhile: once more, afresh.
                conn.close()
                self._local.conn = None
                if attempt:
                    raise LeanFailed(f"{method} failed: {exc}") from exc
                continue
            if response.will_close:
                conn.close()
                self._local.conn = None
            answer = {k.lower(): v for k, v in response.getheaders()}
            return response.status, answer, data
        raise AssertionError("unreachable")

    def _sign(self, method: str, path: str, headers: dict[str, str], body: bytes) -> dict[str, str]:
        """The request's headers signed by botocore's own SigV4 signer (``S3SigV4Auth``,
        the one its client uses for S3): the signing is botocore's, only the sending is
        ours."""
        request = AWSRequest(
            method=method, url=f"{self.scheme}://{self.host}{path}", data=body, headers=headers
        )
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        return dict(request.headers.items())


__all__ = ["LeanFailed", "LeanS3"]
