"""`/metrics` over HTTP (optionally HTTPS, optionally behind the bearer token) on
`--metrics-port`: a small WSGI server with a bounded number of connections, serving
`serving.metrics.prometheus.Metrics.render()`."""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import sys
import threading
import time
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CONTENT_TYPE_LATEST

from serving.metrics.prometheus import Metrics

log = logging.getLogger(__name__)

# Each metrics connection holds a thread and a descriptor of the process the gRPC port
# also draws on; uncapped, held sockets once used up the descriptor limit and new gRPC
# clients timed out. Prometheus opens one connection per scrape, so a few slots serve
# every scraper there is; a connection past them is closed as soon as it is accepted.
MAX_METRICS_CONNECTIONS = 16
# From accept to the end of the request's headers (with TLS, the handshake first): a
# scraper sends them at once, so this only ever ends a stalled or trickling client.
HEADER_TIMEOUT_S = 5.0
# Queued connections cost the kernel a little, not the process a descriptor; a burst of
# scrapers (or of refused clients reconnecting) waits here instead of SYN retries.
LISTEN_BACKLOG = 128
REFUSAL_LOG_INTERVAL_S = 60.0  # at most one warning a minute, however many are refused


class _Server(ThreadingMixIn, WSGIServer):
    """wsgiref's threaded server with a cap on live connections and a deadline for each
    connection's request headers (`_QuietHandler` reports when they are in)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, handler, max_connections: int, header_timeout_s: float):
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.active = 0  # connections accepted whose thread has not ended
        self.refused = 0  # connections closed at accept, the cap being reached
        self._refused_unlogged, self._logged_at = 0, None
        self._lock = threading.Lock()
        # connection -> monotonic deadline for its headers; popped, under the lock, before
        # the connection is closed, so `service_actions` never touches a reused descriptor.
        self._deadlines: dict = {}
        super().__init__(address, handler)

    def verify_request(self, request, client_address) -> bool:
        """Within the cap, a slot and a deadline; past it, False: the caller closes the
        connection at once and no thread is started."""
        with self._lock:
            if self.active < self.max_connections:
                self.active += 1
                self._deadlines[request] = time.monotonic() + self.header_timeout_s
                return True
            self.refused += 1
            self._refused_unlogged += 1
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "metrics: refused %d connection(s) (%d since start): max_connections=%d "
                "already open", self._refused_unlogged, self.refused, self.max_connections,
            )  # fmt: skip
            self._refused_unlogged, self._logged_at = 0, now
        return False

    def process_request(self, request, client_address) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (the caller closes the connection)
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.active -= 1

    def headers_read(self, request) -> None:
        with self._lock:
            self._deadlines.pop(request, None)

    def shutdown_request(self, request) -> None:
        self.headers_read(request)
        super().shutdown_request(request)

    def service_actions(self) -> None:
        """Runs on serve_forever's loop between accepts: disconnects every connection past
        its header deadline. Shutting the descriptor down wakes the thread blocked reading
        it; the thread then closes it and frees the slot. (socket.socket's shutdown, not
        SSLSocket's: that one drops the TLS state under the reading thread's feet.)"""
        now = time.monotonic()
        with self._lock:
            for request, deadline in list(self._deadlines.items()):
                if now >= deadline:
                    del self._deadlines[request]
                    try:
                        socket.socket.shutdown(request, socket.SHUT_RDWR)
                    except OSError:  # the client hung up first
                        pass

    def handle_error(self, request, client_address) -> None:
        """A client that failed the TLS handshake or hung up: one debug line, not a
        traceback on stderr per bad connection (Prometheus' targets page shows its
        own side)."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):  # ssl.SSLError, timeouts and resets included
            log.debug("metrics: %s from %s: %s", type(exc).__name__, client_address[0], exc)
        else:
            log.exception("metrics: error answering %s", client_address[0])


class _QuietHandler(WSGIRequestHandler):
    # Seconds a connection may sit silent holding a thread once its headers are in (the
    # header deadline bounds the time before); the response is written under it too.
    timeout = 10

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self.server.headers_read(self.request)
        return ok

    def log_message(self, *args) -> None:  # one line per scrape would drown the logs
        pass


class MetricsEndpoint:
    """`GET /metrics` on its own port and thread; with a token, only with
    `Authorization: Bearer <token>` (the server's --auth-all); with an `ssl_context`,
    over HTTPS only (the TLS handshake runs on the request's thread, so a client that
    stalls it holds no one else up). At most `max_connections` at once, each with
    `header_timeout_s` to send its request line and headers."""

    def __init__(
        self,
        metrics: Metrics,
        host: str,
        port: int,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        *,
        max_connections: int = MAX_METRICS_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        routes: dict | None = None,
    ):
        """`routes`: other paths, each a function giving the body (bytes) it serves."""
        if max_connections < 1:
            raise ValueError(f"max_connections: must be at least 1, got {max_connections}")
        if not header_timeout_s > 0:
            raise ValueError(f"header_timeout_s: must be above 0, got {header_timeout_s}")
        expected = f"Bearer {token}".encode() if token else None

        routes = routes or {}

        def app(environ, start_response):
            path = environ.get("PATH_INFO")
            if path != "/metrics" and path not in routes:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"metrics are at /metrics\n"]
            given = environ.get("HTTP_AUTHORIZATION", "").encode()
            if expected is not None and not hmac.compare_digest(given, expected):
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"authorization: missing or wrong bearer token\n"]
            if path in routes:
                body = routes[path]()
                start_response("200 OK", [("Content-Type", "application/octet-stream")])
                return [body]
            body = metrics.render()
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]

        self.httpd = _Server((host, port), _QuietHandler, max_connections, header_timeout_s)
        self.httpd.set_app(app)
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(
                self.httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port = self.httpd.server_port
        # Deadlines are checked once per poll, so a short timeout polls more often.
        poll_s = min(0.5, header_timeout_s / 4)
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(poll_s,), name="metrics", daemon=True
        )

    @property
    def active(self) -> int:
        """Connections being served now (each holds a thread and a descriptor)."""
        return self.httpd.active

    @property
    def refused(self) -> int:
        """Connections closed at accept since the start, the cap being reached."""
        return self.httpd.refused

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():  # shutdown() waits for a loop that never ran otherwise
            self.httpd.shutdown()
        self.httpd.server_close()
