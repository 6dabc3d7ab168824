"""The HTTP server: ``/metrics``, the landing page, health, readiness and the JSON API.

One asyncio event loop, on its own thread, holds every connection: an idle or slow client costs
a few kilobytes, never a thread. Until its first request's head is in, a plain connection is a
bare protocol object (:class:`_Head`), no task and no streams, so thousands of them cost little
to hold, to time out and to garbage-collect; the streams take over with the request. What takes
time runs on small pools of worker threads — the routes that read the engines (``/metrics``,
``/readyz``, ``/api/v1/*`` and the pages the app registers, the status page at ``/`` among
them) on two, bcrypt checks on one — so it never holds up accepting, reading or timing out
other connections.
:class:`HTTPLimits` bounds what a client may cost, and every refusal is counted (by
``HTTP_REFUSED_REASONS``).

Responses are written as ``http.server.BaseHTTPRequestHandler`` writes them: HTTP/1.1 with
keep-alive, ``Server`` and ``Date`` headers, its request-line and header parsing, its HTML error
pages and its HTTP/0.9 answers (a body alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import gzip
import html
import json
import logging
import resource
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from http.client import HTTPMessage
from http.server import BaseHTTPRequestHandler
from typing import Any, Final
from urllib.parse import parse_qs

from .. import __version__
from ..catalog import HTTP_REFUSED_REASONS
from .webconfig import WebConfig

log = logging.getLogger("kvcache_exporter.http")

SERVER: Final = f"kvcache-exporter/{__version__} Python/{sys.version.split()[0]}"
MAX_HEADERS: Final = 100  # header lines, the blank one included (as http.client)
RENDER_THREADS: Final = 2  # routes that read the engines: CPU work under the GIL
AUTH_THREADS: Final = 1  # bcrypt checks, apart, so a password guesser cannot delay scrapes
LISTEN_BACKLOG: Final = 1024
CLOSE_GRACE: Final = 1.0  # seconds a closing connection may take to send its last answer
RESERVED_FILES: Final = 256  # file descriptors kept for the rest of the process (ZeroMQ, logs)
_TEXT: Final = "text/plain; charset=utf-8"
_ERROR_PAGE: Final = BaseHTTPRequestHandler.error_message_format
_ERROR_CONTENT_TYPE: Final = BaseHTTPRequestHandler.error_content_type
_WORKER_PATHS: Final = ("/readyz", "/api/v1/summary", "/api/v1/export")  # + telemetry, pages


@dataclass(frozen=True, slots=True)
class HTTPLimits:
    """What one client may cost the server (the ``--web.*`` flags)."""

    max_requests: int = 40  # served at once on worker threads; beyond, 503. 0: no limit
    max_connections: int = 10_000  # open at once; beyond, new ones are closed at once
    read_header_timeout: float = 10.0  # request line and headers (and TLS handshake) must arrive
    idle_timeout: float = 30.0  # a kept-alive connection with no request; a stalled write
    max_header_bytes: int = 65_536  # request line; each header line; all header lines


@dataclass(frozen=True, slots=True)
class Routes:
    """What the server answers with; each callable runs on a worker thread."""

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


# --- the wire format ----------------------------------------------------------------------------
@dataclass(slots=True)
class Request:
    """A parsed request line and its headers."""

    command: str
    path: str
    version: str  # "HTTP/0.9" for a request line without one: the answer is a body alone
    headers: HTTPMessage
    close: bool  # close the connection after the answer
    expect_continue: bool  # "Expect: 100-continue": a 100 Continue goes first

    @property
    def head_only(self) -> bool:
        return self.command == "HEAD"


class Refusal(Exception):
    """A request answered with an error page (or nothing, ``page`` empty) and a closed
    connection; ``reason`` is what ``kvcache_exporter_http_refused_total`` counts it as."""

    def __init__(self, reason: str, page: bytes) -> None:
        super().__init__(reason)
        self.reason = reason
        self.page = page


def _head(version: str, status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    """Status line and headers, ``Server`` and ``Date`` first; nothing for HTTP/0.9."""
    if version == "HTTP/0.9":
        return b""
    lines = [f"HTTP/1.1 {status} {reason}\r\n", f"Server: {SERVER}\r\n"]
    lines.append(f"Date: {formatdate(usegmt=True)}\r\n")
    lines.extend(f"{key}: {value}\r\n" for key, value in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def error_page(
    status: int,
    message: str | None = None,
    explain: str | None = None,
    *,
    version: str = "HTTP/1.1",
    head_only: bool = False,
) -> bytes:
    """``BaseHTTPRequestHandler.send_error``'s answer: the message is the status line's reason,
    the page is its HTML, and it closes the connection."""
    code = HTTPStatus(status)
    message = code.phrase if message is None else message
    explain = code.description if explain is None else explain
    body = (
        _ERROR_PAGE
        % {
            "code": status,
            "message": html.escape(message, quote=False),
            "explain": html.escape(explain, quote=False),
        }
    ).encode("UTF-8", "replace")
    headers = [
        ("Connection", "close"),
        ("Content-Type", _ERROR_CONTENT_TYPE),
        ("Content-Length", str(len(body))),
    ]
    return _head(version, status, message, headers) + (b"" if head_only else body)


def response(request: Request, status: int, body: bytes, content_type: str) -> bytes:
    """An answer, gzip-compressed when the client accepts it and the body is over 1 KiB."""
    gzip_ok = "gzip" in request.headers.get("Accept-Encoding", "") and len(body) > 1024
    if gzip_ok:
        body = gzip.compress(body, compresslevel=1)
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    if gzip_ok:
        headers.append(("Content-Encoding", "gzip"))
    head = _head(request.version, status, HTTPStatus(status).phrase, headers)
    return head + (b"" if request.head_only else body)


class _LineTooLong(Exception):
    pass


class _Truncated(Exception):
    """The stream ended inside a request."""


async def _line(reader: asyncio.StreamReader, limit: int, prefix: bytes = b"") -> bytes:
    """One line, with its newline, as ``readline(limit + 1)`` reads it; raises _LineTooLong
    beyond ``limit`` bytes, _Truncated when the stream ends first. The reader's own limit is
    ``limit``: ``readuntil`` gives up past ``limit + 1`` bytes."""
    try:
        line = prefix + await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise _Truncated from None
    except asyncio.LimitOverrunError:
        raise _LineTooLong from None
    if len(line) > limit:
        raise _LineTooLong
    return line


def _parse_request_line(raw: bytes) -> tuple[str, str, str, bool] | None:
    """``BaseHTTPRequestHandler.parse_request``'s first half: (command, path, version, close)
    or None for a blank line; raises Refusal with its error page."""
    line = str(raw, "iso-8859-1").rstrip("\r\n")
    words = line.split()
    if not words:
        return None
    version, close = "HTTP/0.9", True
    if len(words) >= 3:
        candidate = words[-1]
        try:
            if not candidate.startswith("HTTP/"):
                raise ValueError
            number = candidate.split("/", 1)[1]
            parts = number.split(".")
            if len(parts) != 2 or any(not p.isdigit() or len(p) > 10 for p in parts):
                raise ValueError
            major_minor = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            page = error_page(400, f"Bad request version ({candidate!r})", version=version)
            raise Refusal("bad_request", page) from None
        close = major_minor < (1, 1)
        if major_minor >= (2, 0):
            page = error_page(505, f"Invalid HTTP version ({number})", version=version)
            raise Refusal("bad_request", page)
        version = candidate
    if not 2 <= len(words) <= 3:
        page = error_page(400, f"Bad request syntax ({line!r})", version=version)
        raise Refusal("bad_request", page)
    command, path = words[:2]
    if len(words) == 2:
        close = True
        if command != "GET":
            page = error_page(400, f"Bad HTTP/0.9 request type ({command!r})", version=version)
            raise Refusal("bad_request", page)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")  # as http.server: no open redirect through //host
    return command, path, version, close


async def read_request(
    reader: asyncio.StreamReader, limit: int, prefix: bytes = b""
) -> Request | None:
    """The next request (``prefix``: its first byte, if already read), or None on a blank
    line or when the stream ends before the request does (the connection closes quietly:
    unlike ``http.server``, a request cut off, like a slowloris client's when it leaves, is
    not answered). Raises Refusal where ``http.server`` answers with an error page; ``limit``
    bounds the request line, each header line and all header lines together."""
    try:
        raw = prefix if prefix == b"\n" else await _line(reader, limit, prefix)
    except _LineTooLong:
        raise Refusal("uri_too_long", error_page(414)) from None
    except _Truncated:
        return None
    parsed = _parse_request_line(raw)
    if parsed is None:
        return None
    command, path, version, close = parsed
    head_only = command == "HEAD"
    lines: list[bytes] = []
    total = 0
    while True:
        try:
            line = await _line(reader, limit)
        except _Truncated:
            return None
        except _LineTooLong:
            explain = f"got more than {limit} bytes when reading header line"
            page = error_page(431, "Line too long", explain, version=version, head_only=head_only)
            raise Refusal("headers_too_large", page) from None
        lines.append(line)
        total += len(line)
        if len(lines) > MAX_HEADERS:
            explain = f"got more than {MAX_HEADERS} headers"
            page = error_page(
                431, "Too many headers", explain, version=version, head_only=head_only
            )
            raise Refusal("headers_too_large", page)
        if total > limit:
            page = error_page(431, version=version, head_only=head_only)
            raise Refusal("headers_too_large", page)
        if line in (b"\r\n", b"\n"):
            break
    text = b"".join(lines).decode("iso-8859-1")
    headers = email.parser.Parser(_class=HTTPMessage).parsestr(text)
    connection = headers.get("Connection", "").lower()
    if connection == "close":
        close = True
    elif connection == "keep-alive":
        close = False
    # http.server compares versions as strings here
    expect = headers.get("Expect", "").lower() == "100-continue" and version >= "HTTP/1.1"
    return Request(command, path, version, headers, close, expect)


# --- the server ---------------------------------------------------------------------------------
def fit_open_files(connections: int) -> int:
    """The connection cap the open-files limit allows, after raising its soft limit towards
    ``connections`` plus RESERVED_FILES where the hard limit permits (as Go programs do).
    Beyond the limit ``accept`` would fail and asyncio would stop accepting for a second."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return connections
    fitted = max(1, soft - RESERVED_FILES)
    log.warning(
        "open-files limit lowers the HTTP connection cap",
        extra={"limit": soft, "max_connections": fitted, "asked": connections},
    )
    return fitted


class _Head(asyncio.Protocol):
    """A plain connection until its first request's head is in: the bytes so far, the header
    timeout as one timer, and no task or streams. An idle connection with a task and streams is
    some 40 objects that every full garbage collection walks (at 5,000 connections, pauses of
    0.1 to 0.5 s while they are cut and reconnect), and a timeout through a task is a cancellation
    and two exceptions; here it is an abort.

    The head is only scanned for where the streams' parser (:func:`read_request`) would decide:
    a complete request line it refuses, the blank line ending the headers, a line or the headers
    beyond the limits, the end of the stream. Then the connection goes over to
    :meth:`MetricsHTTPServer._connection` with every byte read and the same deadline, and the
    request is parsed, answered or refused there as every later one is."""

    __slots__ = ("_buffer", "_deadline", "_headers", "_line_start", "_server", "_timer",
                 "_total", "_transport")  # fmt: skip

    def __init__(self, server: MetricsHTTPServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._buffer = bytearray()
        self._line_start = 0  # where the line being read starts in _buffer
        self._headers = -1  # header lines read, -1 before the request line
        self._total = 0  # bytes of header lines read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        server = self._server
        if len(server._connections) >= server._max_connections:
            server._refuse("max_connections")
            transport.abort()
            return
        self._transport = transport
        server._connections.add(self)
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + server.limits.read_header_timeout
        self._timer = loop.call_at(self._deadline, self._expire)

    def _expire(self) -> None:
        self._server._refuse("header_timeout")
        self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._server._connections.discard(self)
        self._transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        scan = len(buffer)  # no newline before: every line up to it was taken
        buffer += data
        limit = self._server.limits.max_header_bytes
        while True:
            end = buffer.find(b"\n", scan)
            start = self._line_start
            if end < 0:
                if len(buffer) - start > limit:  # the line is too long already
                    self._hand_off()
                return
            length = end + 1 - start
            if length > limit:
                self._hand_off()
                return
            if self._headers < 0:  # the request line: refused (or blank) goes over at once
                try:
                    decided = _parse_request_line(bytes(buffer[start : end + 1])) is None
                except Refusal:
                    decided = True
            else:
                self._total += length
                blank = length == 1 or (length == 2 and buffer[start] == 0x0D)  # \r\n or \n
                decided = blank or self._headers + 1 > MAX_HEADERS or self._total > limit
            if decided:
                self._hand_off()
                return
            self._headers += 1
            self._line_start = scan = end + 1

    def eof_received(self) -> bool | None:
        return self._hand_off(eof=True)

    def _hand_off(self, eof: bool = False) -> bool | None:
        """The connection to the streams, with what was read (and its end, with ``eof``)."""
        transport, server = self._transport, self._server
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        server._connections.discard(self)
        self._transport = None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=server.limits.max_header_bytes, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        task = loop.create_task(server._connection(reader, writer, self._deadline))
        server._connections.add(task)
        reader.feed_data(bytes(self._buffer))
        return protocol.eof_received() if eof else None


class MetricsHTTPServer:
    """The exporter's HTTP server: bound at construction, serving from :meth:`start` on its
    own thread until :meth:`stop`, which returns within about a second whatever clients do."""

    def __init__(
        self,
        address: tuple[str, int],
        routes: Routes,
        web: WebConfig | None = None,
        limits: HTTPLimits | None = None,
    ) -> None:
        host = address[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host or "0.0.0.0", address[1]))
            self._socket.listen(LISTEN_BACKLOG)
        except OSError:
            self._socket.close()
            raise
        self.routes = routes
        self.web = web or WebConfig()
        self.limits = limits or HTTPLimits()
        self._tls = self.web.tls.context() if self.web.tls is not None else None
        self._max_connections = fit_open_files(self.limits.max_connections)
        self._refused = dict.fromkeys(HTTP_REFUSED_REASONS, 0)  # changed on the loop only
        # Open connections: tasks, and plain ones still reading their first head (changed on
        # the loop only).
        self._connections: set[asyncio.Task[None] | _Head] = set()
        self._in_flight = 0
        self._render = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="http-render")
        self._auth = ThreadPoolExecutor(AUTH_THREADS, thread_name_prefix="http-auth")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._tls is not None else "http"

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def refusals(self) -> dict[str, int]:
        """Connections and requests refused so far, by reason (every reason, from 0)."""
        return dict(self._refused)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()
        self._started.wait(5.0)

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(stopping.set)
            self._thread.join(timeout=1.5)
        self._socket.close()
        for pool in (self._render, self._auth):
            pool.shutdown(wait=False, cancel_futures=True)

    # --- the event loop ---------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self._tls is None:
            server = await self._loop.create_server(
                lambda: _Head(self), sock=self._socket, backlog=LISTEN_BACKLOG
            )
        else:  # the handshake on the streams, then every request there
            # The reader's limit is the longest line: readuntil returns up to limit + 1 bytes.
            server = await asyncio.start_server(
                self._connection, sock=self._socket, limit=self.limits.max_header_bytes,
                backlog=LISTEN_BACKLOG,
            )  # fmt: skip
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            tasks = []
            for connection in list(self._connections):
                if isinstance(connection, _Head):
                    connection.abort()
                else:
                    connection.cancel()
                    tasks.append(connection)
            if tasks:
                await asyncio.wait(tasks, timeout=0.5)

    def _refuse(self, reason: str) -> None:
        self._refused[reason] += 1

    async def _connection(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deadline: float | None = None,
    ) -> None:
        """One connection: a TLS one from accept, a plain one from its first head (``_Head``,
        which counted it and gives its ``deadline``)."""
        task = asyncio.current_task()
        assert task is not None
        if deadline is None:
            if len(self._connections) >= self._max_connections:
                self._refuse("max_connections")
                writer.transport.abort()
                return
            self._connections.add(task)
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) else ""
        try:
            if await self._requests(reader, writer, client, deadline):
                writer.close()  # after what is buffered (with TLS, a close_notify)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_GRACE):
                        await writer.wait_closed()
        except OSError:  # the client went away, or a write stalled past the idle timeout
            pass
        except asyncio.CancelledError:
            pass  # stop(): end as done, not cancelled (3.11's streams log a cancelled task)
        finally:
            self._connections.discard(task)
            writer.transport.abort()

    async def _requests(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: str,
        deadline: float | None = None,
    ) -> bool:
        """Every request of one connection: the first (TLS handshake included) within the
        header timeout from accept (``deadline``, if given), each later one within it from its
        first byte, with at most the idle timeout before that byte. True when an answer was the
        last thing sent (the connection then closes gracefully, so the answer's tail is not
        lost)."""
        limits = self.limits
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + limits.read_header_timeout
        if self._tls is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    await writer.start_tls(self._tls)
            except TimeoutError:
                self._refuse("header_timeout")
                return False
            except OSError as exc:  # ssl.SSLError included
                log.debug("TLS handshake failed", extra={"client": client, "error": str(exc)})
                self._refuse("tls_handshake")
                return False
        prefix = b""
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    request = await read_request(reader, limits.max_header_bytes, prefix)
            except TimeoutError:
                self._refuse("header_timeout")
                return False
            except Refusal as refusal:
                self._refuse(refusal.reason)
                log.debug(
                    "http request refused", extra={"client": client, "reason": refusal.reason}
                )
                await self._write(writer, refusal.page)
                return True
            if request is None:
                return False
            if await self._answer(request, writer, client) or request.close:
                return True
            try:
                async with asyncio.timeout(limits.idle_timeout):
                    prefix = await reader.read(1)
            except TimeoutError:
                return False  # a kept-alive connection that went quiet: closed, not refused
            if not prefix:
                return False
            deadline = loop.time() + limits.read_header_timeout

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Send, waiting at most the idle timeout for a client that does not read; beyond it
        the TimeoutError (an OSError) ends the connection, counted as ``write_timeout``."""
        writer.write(data)
        try:
            async with asyncio.timeout(self.limits.idle_timeout):
                await writer.drain()
        except TimeoutError:
            self._refuse("write_timeout")
            raise

    async def _answer(self, request: Request, writer: asyncio.StreamWriter, client: str) -> bool:
        """Answer one request; True when the connection must close after it."""
        if request.expect_continue:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if request.command not in ("GET", "HEAD"):
            self._refuse("bad_request")
            message = f"Unsupported method ({request.command!r})"
            await self._write(writer, error_page(501, message, version=request.version))
            return True
        path, _, query = request.path.partition("?")
        auth = self.web.basic_auth
        header = request.headers.get("Authorization")
        known = auth.remembered(header) if auth is not None else True
        on_worker = (
            path == self.routes.telemetry_path or path in self.routes.pages or path in _WORKER_PATHS
        )
        # A request that needs a thread (a route reading the engines, a bcrypt check) holds a
        # slot until its answer is written: --web.max-requests bounds threads' queues and the
        # answers held in memory for clients that read slowly.
        holds_slot = known is None or on_worker
        if holds_slot:
            limit = self.limits.max_requests
            if limit and self._in_flight >= limit:
                self._refuse("max_requests")
                text = f"too many requests in flight (limit {limit}), try again later\n"
                await self._write(writer, response(request, 503, text.encode(), _TEXT))
                return False
            self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            if known is None:
                assert auth is not None
                known = await loop.run_in_executor(self._auth, auth.check, header)
            if not known:
                self._refuse("unauthorized")
                answer = self._unauthorized(request)
            elif on_worker:
                answer = await loop.run_in_executor(self._render, self._route, request, path, query)
            else:
                answer = self._inline(request, path)
            await self._write(writer, answer)
        finally:
            if holds_slot:
                self._in_flight -= 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http request", extra={"client": client, "line": f"{request.command} {path}"})
        return False

    def _unauthorized(self, request: Request) -> bytes:
        headers = [
            ("WWW-Authenticate", 'Basic realm="kvcache-exporter"'),
            ("Content-Type", _TEXT),
            ("Content-Length", "13"),
        ]
        body = b"" if request.head_only else b"Unauthorized\n"
        return _head(request.version, 401, "Unauthorized", headers) + body

    def _inline(self, request: Request, path: str) -> bytes:
        """The answers that need no thread: the landing page, liveness, not found."""
        if path == "/":  # unless a page registered for "/" replaces it (then on a worker)
            return response(
                request, 200, _landing(self.routes.telemetry_path), "text/html; charset=utf-8"
            )
        if path == "/healthz":
            return response(request, 200, b"ok\n", _TEXT)
        return response(request, 404, b"not found\n", _TEXT)

    def _route(self, request: Request, path: str, query: str) -> bytes:
        """The answers that read the engines; on a worker thread."""
        routes = self.routes
        try:
            if path == routes.telemetry_path:
                body, content_type = routes.metrics(request.headers.get("Accept"))
                return response(request, 200, body, content_type)
            if path in routes.pages:
                body, content_type = routes.pages[path](parse_qs(query, keep_blank_values=True))
                return response(request, 200, body, content_type)
            if path == "/readyz":
                ready, detail = routes.ready()
                status = HTTPStatus.OK if ready else HTTPStatus.SERVICE_UNAVAILABLE
                return response(request, status, (detail + "\n").encode(), _TEXT)
            if path == "/api/v1/summary":
                body = json.dumps(routes.summary(), indent=2).encode()
                return response(request, 200, body, "application/json")
            # on_worker: the export path is what is left
            try:
                body, content_type = routes.export(parse_qs(query, keep_blank_values=True))
            except ValueError as exc:
                return response(request, 400, f"{exc}\n".encode(), _TEXT)
            return response(request, 200, body, content_type)
        except Exception:
            log.exception("request failed", extra={"path": path})
            return response(request, 500, b"internal error\n", _TEXT)
