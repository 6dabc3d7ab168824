"""A plain connection's first request head, read by the server's bare protocol before the
streams take over: whatever way the bytes arrive, the answers are those of a request sent at
once, and what the parser refuses on its request line is refused before any header comes."""

from __future__ import annotations

import socket
import time

import pytest

from kvcache_exporter.sinks.http import HTTPLimits, MetricsHTTPServer

from .test_sinks_http_wire import REQUESTS, exchange, mask_times, routes, serve, wait_until


def trickle(port: int, data: bytes, size: int, pause: float) -> bytes:
    """``exchange``, the request sent ``size`` bytes at a time with ``pause`` between."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(data), size):
            sock.sendall(data[i : i + size])
            if pause:
                time.sleep(pause)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return mask_times(out)


@pytest.fixture(scope="module")
def server() -> MetricsHTTPServer:
    server = MetricsHTTPServer(("127.0.0.1", 0), routes())
    server.start()
    yield server  # type: ignore[misc]
    server.stop()


def first_head(data: bytes) -> bytes:
    """``data`` up to where the server decides on its first request: the request line if it is
    refused, else the blank line after the headers (sending more after a refusal would race
    the server's close, and the client would see a reset, whoever sent the bytes)."""
    line = data.split(b"\n", 1)[0]
    words = line.split()
    refused = (
        not 2 <= len(words) <= 3
        or (len(words) == 2 and words[0] != b"GET")
        or (len(words) == 3 and words[2] not in (b"HTTP/1.1", b"HTTP/1.0"))
    )
    if refused:
        return data[: len(line) + 1]
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    return data[: min(ends)] if ends else data


@pytest.mark.parametrize("data", REQUESTS, ids=lambda d: d[:40].decode(errors="replace"))
def test_a_request_in_pieces_is_answered_as_one_sent_at_once(
    server: MetricsHTTPServer, data: bytes
) -> None:
    head = first_head(data)
    want = exchange(server.port, head)
    if len(head) < 200:
        assert trickle(server.port, head, 1, 0.001) == want
        assert trickle(server.port, head, 3, 0.001) == want
    elif b" 414 " not in want and b" 431 " not in want:  # refused while still being sent
        assert trickle(server.port, head, 4093, 0.0) == want


def test_a_bad_request_line_is_refused_before_its_headers() -> None:
    server = serve(HTTPLimits(read_header_timeout=5.0))
    try:
        for line, reason in (
            (b"GARBAGE\r\n", "bad_request"),
            (b"GET /metrics HTTP/2.0\r\n", "bad_request"),
            (b"GET /" + b"a" * 70_000, "uri_too_long"),  # not even a whole line
        ):
            with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
                sock.sendall(line)  # and nothing more, the stream left open
                started = time.monotonic()
                assert b"Error response" in sock.recv(65536)  # HTTP/0.9 here: a page alone
                assert time.monotonic() - started < 1.0
            wait_until(lambda r=reason: server.refusals()[r] >= 1)  # type: ignore[misc]
    finally:
        server.stop()


def test_a_blank_first_line_closes_the_connection_quietly() -> None:
    server = serve(HTTPLimits(read_header_timeout=5.0))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
            sock.sendall(b"\r\n")
            started = time.monotonic()
            assert sock.recv(1) == b""
            assert time.monotonic() - started < 1.0
        assert sum(server.refusals().values()) == 0
    finally:
        server.stop()


def test_the_deadline_runs_from_accept_across_the_hand_over() -> None:
    """A head that arrives whole within the header timeout is served; one whose last bytes
    come after it is cut and counted, however much arrived before."""
    server = serve(HTTPLimits(read_header_timeout=0.6))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            time.sleep(0.3)
            sock.sendall(b"X: y\r\n\r\n")
            assert sock.recv(65536).endswith(b"ok\n")
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX: y\r\n")
            time.sleep(0.9)
            with pytest.raises(OSError):
                sock.sendall(b"\r\n")
                if sock.recv(1) == b"":
                    raise ConnectionResetError
        assert server.refusals()["header_timeout"] == 1
        wait_until(lambda: not server._connections)
    finally:
        server.stop()
