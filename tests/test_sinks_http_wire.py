"""The HTTP server on the wire: byte for byte what the ThreadingHTTPServer it replaced sent
(vendored in bench/http_hostile.py), and the limits that bound a client, each counted."""

from __future__ import annotations

import base64
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from kvcache_exporter.sinks.http import HTTPLimits, MetricsHTTPServer, Routes
from kvcache_exporter.sinks.webconfig import BasicAuth, WebConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import http_hostile  # bench/ is not a package; its LegacyServer is the old server, as it was


def routes(render: Callable[[str | None], tuple[bytes, str]] | None = None) -> Routes:
    def export(query: dict[str, list[str]]) -> tuple[bytes, str]:
        if "bad" in query:
            raise ValueError("unknown parameter 'bad'")
        return b"engine,block_hash\n", "text/csv; charset=utf-8"

    def metrics(accept: str | None) -> tuple[bytes, str]:
        body = f"x 1\n{'#' * 2000}\n# accept={accept}\n".encode()
        return body, "text/plain; version=0.0.4; charset=utf-8"

    return Routes(
        telemetry_path="/metrics",
        metrics=render or metrics,
        ready=lambda: (False, "waiting for sources: vllm"),
        summary=lambda: {"engines": [{"engine": "vllm"}]},
        export=export,
        pages={"/api/v1/status": lambda query: (f"{query}".encode(), "application/json")},
    )


def mask_times(answer: bytes) -> bytes:
    """``answer`` with the times it carries masked: the Date header and a gzip body's MTIME
    (both the second it was sent, so two answers a second apart differ only there)."""
    answer = re.sub(rb"Date: [^\r]*", b"Date: -", answer)
    gzip_head = re.compile(rb"(\r\n\r\n\x1f\x8b\x08.)....", re.S)
    return gzip_head.sub(lambda match: match[1] + b"----", answer)


def exchange(port: int, data: bytes, half_close: bool = True) -> bytes:
    """Everything the server sends back to ``data`` until it closes, its times masked."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return mask_times(out)


USERS = {"prometheus": bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4))}
GOOD = b"Authorization: Basic " + base64.b64encode(b"prometheus:s3cret") + b"\r\n"
REQUESTS = [
    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\nAccept: text/plain\r\n\r\n",
    b"HEAD /metrics HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\nGET /readyz HTTP/1.1\r\n\r\n",
    b"GET /api/v1/summary HTTP/1.0\r\n\r\n",
    b"GET /api/v1/export?bad=1 HTTP/1.1\r\n\r\n",
    b"GET /api/v1/status?x=1 HTTP/1.1\r\n\r\n",
    b"GET /api/v1/export HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    b"GET /nope HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n",
    b"GET //metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics\r\n\r\n",  # HTTP/0.9: a body alone
    b"POST /metrics\r\n\r\n",
    b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /metrics HTTP/2.0\r\n\r\n",
    b"GET /metrics HTTX/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1 extra\r\n\r\n",
    b"GARBAGE\r\n\r\n",
    b"\r\n",
    b"",
    b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
    b"GET /" + b"a" * 65_500 + b" HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"HEAD / HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 101 + b"\r\n",
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 99 + b"\r\n",
    b"GET /healthz HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET /healthz HTTP/1.1\n\n",
    b"OPTIONS * HTTP/1.1\r\n\r\n",
]


@pytest.fixture(params=["open", "basic_auth"])
def both(request: pytest.FixtureRequest) -> Iterator[tuple[int, int, bool]]:
    """(old server's port, new server's port, basic auth on), the same routes and config."""

    def web() -> WebConfig:
        return (
            WebConfig(basic_auth=BasicAuth(dict(USERS))) if request.param != "open" else WebConfig()
        )

    old = http_hostile.LegacyServer(("127.0.0.1", 0), routes(), web())
    new = MetricsHTTPServer(("127.0.0.1", 0), routes(), web())
    old.start()
    new.start()
    yield old.port, new.port, request.param != "open"
    old.stop()
    new.stop()


@pytest.mark.parametrize("data", REQUESTS, ids=lambda d: d[:40].decode(errors="replace"))
def test_answers_are_byte_for_byte_those_of_the_threading_server(
    both: tuple[int, int, bool], data: bytes
) -> None:
    old, new, auth = both
    want = exchange(old, data)
    if auth and data.startswith(b"HEAD /metrics"):  # a change: no body after HEAD
        want = want.removesuffix(b"Unauthorized\n")
    assert exchange(new, data) == want


def test_with_credentials_too(both: tuple[int, int, bool]) -> None:
    old, new, _ = both
    for data in (
        b"GET /metrics HTTP/1.1\r\n" + GOOD + b"\r\nGET /healthz HTTP/1.1\r\n" + GOOD + b"\r\n",
        b"GET /metrics HTTP/1.1\r\nAuthorization: Basic bWFsbG9yeTp4\r\n\r\n",
    ):
        assert exchange(new, data) == exchange(old, data)


@pytest.mark.parametrize(
    "data", [b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: aaa", b"GET /metrics HTTP/1.1"]
)
def test_a_request_cut_off_by_the_end_of_the_stream_is_not_answered(
    both: tuple[int, int, bool], data: bytes
) -> None:
    """A change: the old server answered what it had when the stream ended inside a request,
    so every slowloris client that left cost a render."""
    old, new, auth = both
    assert exchange(old, data).startswith(b"HTTP/1.1 401" if auth else b"HTTP/1.1 200 OK")
    assert exchange(new, data) == b""


def test_head_answered_401_carries_no_body() -> None:
    """A change: the old server wrote the 401 body after HEAD too, which a kept-alive
    client would read as the start of the next answer."""
    server = MetricsHTTPServer(("127.0.0.1", 0), routes(), WebConfig(basic_auth=BasicAuth(USERS)))
    server.start()
    try:
        answer = exchange(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
        assert answer.endswith(b"Content-Length: 13\r\n\r\n")
        assert server.refusals()["unauthorized"] == 1
    finally:
        server.stop()


# --- limits -------------------------------------------------------------------------------------
def serve(limits: HTTPLimits, **kwargs: Any) -> MetricsHTTPServer:
    server = MetricsHTTPServer(("127.0.0.1", 0), routes(**kwargs), limits=limits)
    server.start()
    return server


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_slow_headers_are_cut_at_the_header_timeout_and_counted() -> None:
    server = serve(HTTPLimits(read_header_timeout=0.5))
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as idle, \
                socket.create_connection(("127.0.0.1", server.port)) as slow:  # fmt: skip
            slow.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            started = time.monotonic()
            for _ in range(3):
                time.sleep(0.1)
                slow.sendall(b"a")
            for sock in (idle, slow):
                sock.settimeout(3)
                assert sock.recv(1) == b""  # closed without an answer
            assert time.monotonic() - started < 1.5
        assert server.refusals()["header_timeout"] == 2
        assert exchange(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"ok\n")
    finally:
        server.stop()


def test_a_kept_alive_connection_closes_after_the_idle_timeout_uncounted() -> None:
    server = serve(HTTPLimits(read_header_timeout=0.2, idle_timeout=0.6))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert sock.recv(65536).endswith(b"ok\n")
            time.sleep(0.4)  # past the header timeout, within the idle timeout: still open
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert sock.recv(65536).endswith(b"ok\n")
            started = time.monotonic()
            assert sock.recv(1) == b""
            assert 0.5 < time.monotonic() - started < 1.5
        assert sum(server.refusals().values()) == 0
    finally:
        server.stop()


def test_connections_over_the_cap_are_closed_at_once_and_counted() -> None:
    server = serve(HTTPLimits(max_connections=5))
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    try:
        wait_until(lambda: len(server._connections) == 5)
        refused = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
        for sock in refused:
            sock.settimeout(2)
            try:
                data = sock.recv(1)
            except ConnectionResetError:  # aborted: no answer, at once
                data = b""
            assert data == b""
            sock.close()
        assert server.refusals()["max_connections"] == 3
        held[0].sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # those let in are served
        assert held[0].recv(65536).endswith(b"ok\n")
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_requests_over_max_requests_get_a_fast_503_and_are_counted() -> None:
    gate = threading.Event()

    def slow_render(_accept: str | None) -> tuple[bytes, str]:
        gate.wait(10)
        return b"x 1\n", "text/plain; version=0.0.4; charset=utf-8"

    server = serve(HTTPLimits(max_requests=2), render=slow_render)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(3)]
    try:
        for sock in socks[:2]:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_until(lambda: server._in_flight == 2)
        started = time.monotonic()
        socks[2].sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        answer = socks[2].recv(65536)
        assert answer.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"limit 2" in answer and time.monotonic() - started < 0.5
        socks[2].sendall(b"GET /healthz HTTP/1.1\r\n\r\n")  # needs no worker: never refused
        assert socks[2].recv(65536).endswith(b"ok\n")
        gate.set()
        for sock in socks[:2]:
            assert sock.recv(65536).endswith(b"x 1\n")
        assert server.refusals()["max_requests"] == 1
    finally:
        gate.set()
        for sock in socks:
            sock.close()
        server.stop()


def test_a_client_that_does_not_read_its_answer_is_cut_at_the_idle_timeout_and_counted() -> None:
    """A slow reader holds a --web.max-requests slot and the answer in memory: at most the idle
    timeout, then the connection is dropped and counted."""

    def large(_accept: str | None) -> tuple[bytes, str]:
        return b"x" * (16 << 20), "text/plain; version=0.0.4; charset=utf-8"

    server = serve(HTTPLimits(idle_timeout=0.5), render=large)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")  # and never read
            wait_until(lambda: server._in_flight == 1)
            started = time.monotonic()
            wait_until(lambda: server.refusals()["write_timeout"] == 1)
            assert time.monotonic() - started < 2.0
            wait_until(lambda: server._in_flight == 0 and not server._connections)
        assert sum(server.refusals().values()) == 1
        assert exchange(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"ok\n")
    finally:
        server.stop()


def test_header_limits_answer_414_and_431_and_are_counted() -> None:
    server = serve(HTTPLimits(max_header_bytes=2048))
    try:
        line = exchange(server.port, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\n\r\n")
        assert line.startswith(b"HTTP/1.1 414 Request-URI Too Long\r\n")
        one = exchange(server.port, b"GET / HTTP/1.1\r\nX: " + b"a" * 3000 + b"\r\n\r\n")
        assert one.startswith(b"HTTP/1.1 431 Line too long\r\n")
        assert b"got more than 2048 bytes when reading header line" in one
        fields = b"".join(b"X%d: %s\r\n" % (i, b"a" * 500) for i in range(5))
        many = exchange(server.port, b"GET / HTTP/1.1\r\n" + fields + b"\r\n")
        assert many.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
        assert exchange(server.port, b"BREW /pot HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 501")
        counts = server.refusals()
        assert counts["uri_too_long"] == 1 and counts["headers_too_large"] == 2
        assert counts["bad_request"] == 1
    finally:
        server.stop()


def test_stop_returns_at_once_with_connections_held_and_a_render_running() -> None:
    gate = threading.Event()

    def stuck(_accept: str | None) -> tuple[bytes, str]:
        gate.wait(10)
        return b"", "text/plain"

    server = serve(HTTPLimits(), render=stuck)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
    try:
        socks[0].sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        socks[1].sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        wait_until(lambda: server._in_flight == 1)
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
    finally:
        gate.set()
        for sock in socks:
            sock.close()
