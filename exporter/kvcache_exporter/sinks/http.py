"""The HTTP server: ``/metrics``, the landing page, health, readiness and the JSON API."""

from __future__ import annotations

import gzip
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final
from urllib.parse import parse_qs

from .. import __version__
from .webconfig import WebConfig

log = logging.getLogger("kvcache_exporter.http")

REQUEST_TIMEOUT: Final = 30.0
TLS_HANDSHAKE_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Routes:
    """What the server answers with; each callable runs on the request's thread."""

    telemetry_path: str
    metrics: Callable[[str | None], tuple[bytes, str]]  # Accept header → body, content type
    ready: Callable[[], tuple[bool, str]]
    summary: Callable[[], dict[str, Any]]
    export: Callable[[dict[str, list[str]]], tuple[bytes, str]]
    # Further pages: path → (query → body, content type); "/" here replaces the landing page.
    pages: Mapping[str, Callable[[dict[str, list[str]]], tuple[bytes, str]]] = field(
        default_factory=dict
    )


def parse_listen_address(address: str) -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[v6]:port`` → (host, port). Raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"listen address {address!r}: expected [HOST]:PORT")
    host = host.strip("[]")
    return host, int(port)


def links_html(telemetry_path: str) -> str:
    """The list of endpoints, as HTML: the landing page, and the status page's foot."""
    items = "".join(
        f'<li><a href="{path}">{path}</a> — {text}</li>'
        for path, text in (
            (telemetry_path, "Prometheus metrics"),
            ("/healthz", "liveness"),
            ("/readyz", "readiness: 200 once every source is connected"),
            ("/api/v1/summary", "collector summary (JSON)"),
            ("/api/v1/status", "what the status page shows (JSON)"),
            ("/api/v1/export?format=csv", "recent block lifecycles (JSON or CSV)"),
        )
    )
    return f"<ul>{items}</ul>"


def _landing(telemetry_path: str) -> bytes:
    return (
        "<!doctype html><html><head><title>kvcache-exporter</title></head><body>"
        f"<h1>kvcache-exporter {__version__}</h1>"
        "<p>KV-cache block lifecycle metrics for LLM inference engines.</p>"
        f"{links_html(telemetry_path)}</body></html>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT  # a client that stalls mid-request is dropped, not waited on
    # Headers and body go out in separate writes; with Nagle on, a kept-alive connection (how
    # Prometheus scrapes) waits ~40 ms for the delayed ACK on every response.
    disable_nagle_algorithm = True
    server_version = f"kvcache-exporter/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http request", extra={"client": self.client_address[0], "line": format % args})

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        gzip_ok = "gzip" in self.headers.get("Accept-Encoding", "") and len(body) > 1024
        if gzip_ok:
            body = gzip.compress(body, compresslevel=1)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if gzip_ok:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        auth = self.server.web.basic_auth
        if auth is not None and not auth.check(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="kvcache-exporter"')
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "13")
            self.end_headers()
            self.wfile.write(b"Unauthorized\n")
            return
        routes = self.server.routes
        path, _, query = self.path.partition("?")
        try:
            if path == routes.telemetry_path:
                body, content_type = routes.metrics(self.headers.get("Accept"))
                self._send(200, body, content_type)
            elif path in routes.pages:
                body, content_type = routes.pages[path](parse_qs(query, keep_blank_values=True))
                self._send(200, body, content_type)
            elif path == "/":
                self._send(200, _landing(routes.telemetry_path), "text/html; charset=utf-8")
            elif path == "/healthz":
                self._send(200, b"ok\n", "text/plain; charset=utf-8")
            elif path == "/readyz":
                ready, detail = routes.ready()
                status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
                self._send(status, (detail + "\n").encode(), "text/plain; charset=utf-8")
            elif path == "/api/v1/summary":
                body = json.dumps(routes.summary(), indent=2).encode()
                self._send(200, body, "application/json")
            elif path == "/api/v1/export":
                try:
                    body, content_type = routes.export(parse_qs(query, keep_blank_values=True))
                except ValueError as exc:
                    self._send(400, f"{exc}\n".encode(), "text/plain; charset=utf-8")
                else:
                    self._send(200, body, content_type)
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("request failed", extra={"path": path})
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")


class MetricsHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server; request threads are daemons so shutdown never waits on a
    slow client."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], routes: Routes, web: WebConfig | None = None
    ) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host or "0.0.0.0", address[1]), _Handler)
        self.routes = routes
        self.web = web or WebConfig()
        self._tls = self.web.tls.context() if self.web.tls is not None else None
        self._thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        """With TLS, the handshake happens here, on the request's own thread, so a slow or
        hostile client never holds up the accept loop; plain HTTP to a TLS port fails it."""
        if self._tls is not None:
            request.settimeout(TLS_HANDSHAKE_TIMEOUT)
            try:
                request = self._tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.debug(
                    "TLS handshake failed", extra={"client": client_address[0], "error": str(exc)}
                )
                return
        super().finish_request(request, client_address)

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
