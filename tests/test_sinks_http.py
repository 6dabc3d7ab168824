"""The HTTP server's routes, answered by a real server on loopback."""

from __future__ import annotations

import gzip
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from kvcache_exporter.collector.eviction_log import EvictionLog
from kvcache_exporter.sinks.export import EngineRecords, ExportRequest, render_export
from kvcache_exporter.sinks.http import MetricsHTTPServer, Routes, parse_listen_address


def records() -> EngineRecords:
    log = EvictionLog(8)
    log.append(
        block_hash=np.array([1, 2], np.uint64),
        medium=np.array([1, 1], np.uint8),
        reason=np.array([0, 1], np.uint8),
        stored_at=np.array([1.0, 2.0]),
        last_access_at=np.array([1.5, 2.0]),
        removed_at=np.array([3.0, 5.0]),
        accesses=np.array([1, 0], np.uint32),
        prefix_depth=np.array([4, 0], np.uint16),
    )
    places = (("unknown", "0"), ("GPU", "0"))  # place id 1: GPU, group 0
    return EngineRecords("vllm", places, ("evicted", "cleared"), log.records())


def export(query: dict[str, list[str]]) -> tuple[bytes, str]:
    request = ExportRequest.parse(query, ["vllm"])
    return render_export(request, [records()], [{"engine": "vllm"}])


@pytest.fixture
def server() -> Iterator[MetricsHTTPServer]:
    ready = {"value": False}
    routes = Routes(
        telemetry_path="/metrics",
        metrics=lambda _: (
            ("# HELP x y\n# TYPE x gauge\nx 1\n" + "#" * 2000 + "\n").encode(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        ready=lambda: (ready["value"], "waiting for sources: vllm"),
        summary=lambda: {"engines": [{"engine": "vllm"}]},
        export=export,
    )
    srv = MetricsHTTPServer(("127.0.0.1", 0), routes)
    srv.start()
    yield srv
    srv.stop()


def fetch(srv: MetricsHTTPServer, path: str, **headers: str) -> tuple[int, dict[str, Any], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_routes(server: MetricsHTTPServer) -> None:
    status, headers, body = fetch(server, "/metrics")
    assert status == 200 and body.startswith(b"# HELP x y")
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert fetch(server, "/healthz")[0] == 200
    status, _, body = fetch(server, "/readyz")
    assert status == 503 and b"vllm" in body
    status, _, body = fetch(server, "/")
    assert status == 200 and b'href="/metrics"' in body
    assert json.loads(fetch(server, "/api/v1/summary")[2]) == {"engines": [{"engine": "vllm"}]}
    assert fetch(server, "/nope")[0] == 404


def test_pages_replace_the_landing_page_and_add_routes() -> None:
    seen: list[dict[str, list[str]]] = []

    def page(query: dict[str, list[str]]) -> tuple[bytes, str]:
        seen.append(query)
        return b"<p>status</p>", "text/html; charset=utf-8"

    routes = Routes(
        telemetry_path="/metrics",
        metrics=lambda _: (b"", "text/plain"),
        ready=lambda: (True, "ready"),
        summary=lambda: {},
        export=export,
        pages={"/": page, "/api/v1/status": lambda _: (b"{}", "application/json")},
    )
    srv = MetricsHTTPServer(("127.0.0.1", 0), routes)
    srv.start()
    try:
        status, headers, body = fetch(srv, "/?x=1")
        assert status == 200 and body == b"<p>status</p>" and seen == [{"x": ["1"]}]
        assert headers["Content-Type"].startswith("text/html")
        status, headers, body = fetch(srv, "/api/v1/status")
        assert (status, body, headers["Content-Type"]) == (200, b"{}", "application/json")
    finally:
        srv.stop()


def test_gzip_when_asked(server: MetricsHTTPServer) -> None:
    status, headers, body = fetch(server, "/metrics", **{"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body).startswith(b"# HELP x y")


def test_export_json_and_csv(server: MetricsHTTPServer) -> None:
    status, _, body = fetch(server, "/api/v1/export")
    document = json.loads(body)
    assert status == 200
    assert [r["block_hash"] for r in document["evictions"]] == ["0" * 15 + "1", "0" * 15 + "2"]
    first = document["evictions"][0]
    assert first["lifetime_seconds"] == 2.0 and first["idle_seconds"] == 1.5
    assert first["medium"] == "GPU" and first["group"] == "0" and first["prefix_depth"] == 4
    status, headers, body = fetch(server, "/api/v1/export?format=csv&limit=1&engine=vllm")
    lines = body.decode().splitlines()
    assert headers["Content-Type"].startswith("text/csv")
    assert lines[0].startswith("engine,block_hash,medium,group,reason")
    assert len(lines) == 2 and ",cleared," in lines[1]


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("format=xml", b"format"),
        ("limit=0", b"limit"),
        ("limit=abc", b"limit"),
        ("engine=sglang", b"no engine"),
        ("colour=red", b"unknown parameter"),
    ],
)
def test_export_rejects_bad_parameters_with_400(
    server: MetricsHTTPServer, query: str, needle: bytes
) -> None:
    status, _, body = fetch(server, f"/api/v1/export?{query}")
    assert status == 400 and needle in body


@pytest.mark.parametrize(
    ("text", "expected"),
    [(":9477", ("", 9477)), ("127.0.0.1:1", ("127.0.0.1", 1)), ("[::1]:80", ("::1", 80))],
)
def test_listen_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(text) == expected


@pytest.mark.parametrize("text", ["9477", "host:", "host:http", ":70000"])
def test_bad_listen_address(text: str) -> None:
    with pytest.raises(ValueError):
        parse_listen_address(text)
