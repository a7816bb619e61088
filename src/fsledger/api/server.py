"""Running the service inside ``fsledger run``: the feed hub, the webhook dispatchers and the
HTTP server (uvicorn in a thread, with fsledger's own signal handling).

``Service`` owns every thread it starts; ``start`` after ``bind``, ``stop`` once::

    service = Service(ledger, manager, settings)   # validates: refuses unsafe settings
    service.bind()                                  # the port is taken now, or ConfigError
    manager.start(); service.start()
    ...
    service.stop(); manager.stop()
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from fsledger.api.app import create_app
from fsledger.api.security import is_loopback_host
from fsledger.api.webhooks import WebhookDispatcher, check_url, display_url
from fsledger.config import Settings
from fsledger.errors import ConfigError
from fsledger.feed import FeedHub, Retention
from fsledger.ledger import Ledger
from fsledger.manager import SyncManager

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 15.0
MAX_CONNECTIONS = 1024
"""uvicorn's connection limit (past it every request is answered 503): far above the SSE
streams' own cap (``app.MAX_STREAMS``), so held streams cannot take /healthz down."""


def parse_listen(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` for IPv6).

    Raises:
        ConfigError: not of that form, or the port is out of range.
    """
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"--listen {text!r} is not HOST:PORT (e.g. 127.0.0.1:8750, [::1]:8750, 0.0.0.0:8750)"
        )
    return host, int(port)


def check_exposure(host: str, port: int, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token.

    Raises:
        ConfigError: ``host`` is not loopback and no token is configured.
    """
    if token is None and not is_loopback_host(host):
        raise ConfigError(
            f"refusing to listen on {host}:{port} without FSLEDGER_API_TOKEN: beyond loopback "
            "anyone who reaches the port could read every file name. Set FSLEDGER_API_TOKEN to "
            "a long random secret, or listen on 127.0.0.1"
        )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: fsledger's ``run`` owns SIGINT/SIGTERM."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29 calls this
        return


class Service:
    """The HTTP API, the feed hub and the webhooks of one ``fsledger run``.

    Args:
        ledger: the ledger.
        manager: the SyncManager.
        settings: the configuration (listen address, token, webhooks, retention).
        http: serve HTTP (``--no-http`` turns it off; the hub and webhooks still run).
        listen: ``HOST:PORT``; ``settings.listen`` when omitted.
        webhooks: extra webhook URLs on top of ``settings.webhooks``.

    Raises:
        ConfigError: the listen address is malformed or unsafe, or webhooks are configured
            without a ``FSLEDGER_WEBHOOK_SECRET`` of at least 16 bytes, or ``--webhook-from``
            is not now, start or a cursor.
    """

    def __init__(
        self,
        ledger: Ledger,
        manager: SyncManager | None,
        settings: Settings,
        *,
        http: bool = True,
        listen: str | None = None,
        webhooks: tuple[str, ...] = (),
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.http = http
        self.host, self.port = parse_listen(listen or settings.listen)
        if http:
            check_exposure(self.host, self.port, settings.api_token)
        urls = tuple(dict.fromkeys(settings.webhooks + webhooks))
        for url in urls:
            check_url(url)
        if urls and not settings.webhook_secret:
            raise ConfigError(
                "webhooks are configured but FSLEDGER_WEBHOOK_SECRET is not set: every delivery "
                "is signed with it, so set it to a secret the receivers share"
            )
        self.hub = FeedHub(
            ledger,
            repositories=manager.repositories if manager is not None else None,
            retention=Retention(settings.feed_retention_s, settings.feed_retention_entries),
        )
        self.webhooks = [
            WebhookDispatcher(
                url,
                settings.webhook_secret or "",
                ledger.store,
                self.hub,
                start=settings.webhook_from,
            )
            for url in urls
        ]
        self.app = create_app(ledger, manager, settings, hub=self.hub, webhooks=self.webhooks)
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where the server listens (the real port when 0 was asked for)."""
        if self._sock is not None:
            host, port = self._sock.getsockname()[:2]
            return str(host), int(port)
        return self.host, self.port

    def bind(self) -> None:
        """Take the listening socket now, so a busy port fails before anything starts.

        Raises:
            ConfigError: the address cannot be bound.
        """
        if not self.http or self._sock is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._sock = socket.create_server((self.host, self.port), family=family, backlog=128)
            # Connections inherit it: without, a kept-alive client (httpx, a browser) waited
            # for its delayed ACK (40 ms) on every response uvicorn writes in two pieces.
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}; pick another "
                "--listen HOST:PORT or --no-http"
            ) from exc
        self._sock.set_inheritable(False)

    def start(self) -> None:
        """Start the hub, the webhooks and the HTTP server (waiting until it accepts).

        Raises:
            ConfigError: the HTTP server did not come up.
        """
        self.hub.start()
        for hook in self.webhooks:
            hook.start()
            log.info("Webhook %s started", display_url(hook.url))
        if not self.http:
            return
        self.bind()
        assert self._sock is not None
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            server_header=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            h11_max_incomplete_event_size=64 * 1024,
            limit_concurrency=MAX_CONNECTIONS,
        )
        server = _Server(config)
        sock = self._sock
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fsledger-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        log.info("HTTP API and dashboard on http://%s:%d/", shown, port)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop serving (open event streams end), then the webhooks and the hub."""
        if self._server is not None:
            self._server.should_exit = True
        self.hub.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("The HTTP server did not stop within %.0fs", timeout)
            self._thread = None
        for hook in self.webhooks:
            hook.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = ["Service", "parse_listen", "check_exposure"]
