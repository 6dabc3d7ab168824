"""Scrape latency while hostile clients hold the HTTP endpoint: idle connections and slowloris.

For each server — ``asyncio``, the exporter's :class:`MetricsHTTPServer`, and ``threading``,
the ``ThreadingHTTPServer`` it replaced (vendored below, as it was) — the bench starts a server
process serving a ``/metrics`` page rendered at every scrape (``--series`` gauges through
``prometheus_client``'s encoder, CPU work as a real render is), then

1. **baseline**: scrapes for ``--baseline`` seconds;
2. **hold**: a load process opens ``--idle`` connections that send nothing and ``--slow``
   clients that send a request line, then one header byte every ``--drip`` seconds, never
   finishing; whatever the server closes is opened again, so the load holds for ``--hold``
   seconds;
3. **after**: the load process closes everything at once; scrapes go on for ``--after``
   seconds;
4. **stop**: SIGTERM with the load holding again; the seconds until the process exits.

A scrape is a fresh connection (``http.client``), ``GET /metrics``, body read to the end, every
``--interval`` seconds (the next one starts when the last answered, at most ``--timeout``).
Prints p50, p99 and the worst latency of each phase, the scrapes over 0.5 s or failed, and the
server's threads and memory during the hold.

    python bench/http_hostile.py                         # 5,000 idle + 200 slowloris, ~2 min
    python bench/http_hostile.py --servers asyncio --json out.json

The same load process (``load``) drives tests/e2e/test_http_hostile_e2e.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import gzip
import http.client
import json
import logging
import os
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kvcache_exporter import __version__
from kvcache_exporter.sinks.http import MetricsHTTPServer, Routes
from kvcache_exporter.sinks.webconfig import WebConfig

HERE = Path(__file__).resolve()


# --- the server this package had before: ThreadingHTTPServer, a thread per connection ------------
# Vendored as it was, the baseline of this bench and the reference of tests/test_sinks_http_wire.py
# (the exporter's server answers byte for byte as it did).
LEGACY_REQUEST_TIMEOUT = 30.0
LEGACY_TLS_HANDSHAKE_TIMEOUT = 10.0
legacy_log = logging.getLogger("legacy.http")


def _legacy_landing(telemetry_path: str) -> bytes:
    links = "".join(
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
    return (
        "<!doctype html><html><head><title>kvcache-exporter</title></head><body>"
        f"<h1>kvcache-exporter {__version__}</h1>"
        "<p>KV-cache block lifecycle metrics for LLM inference engines.</p>"
        f"<ul>{links}</ul></body></html>"
    ).encode()


class _LegacyHandler(BaseHTTPRequestHandler):
    server: LegacyServer
    protocol_version = "HTTP/1.1"
    timeout = LEGACY_REQUEST_TIMEOUT
    disable_nagle_algorithm = True
    server_version = f"kvcache-exporter/{__version__}"

    def log_message(self, format: str, *args: Any) -> None:
        legacy_log.debug("http request %s", format % args)

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
        from urllib.parse import parse_qs

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
                self._send(200, _legacy_landing(routes.telemetry_path), "text/html; charset=utf-8")
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
            legacy_log.exception("request failed")
            self._send(500, b"internal error\n", "text/plain; charset=utf-8")


class LegacyServer(ThreadingHTTPServer):
    """The exporter's HTTP server before the asyncio one: a daemon thread per connection."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], routes: Routes, web: WebConfig | None = None
    ) -> None:
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host or "0.0.0.0", address[1]), _LegacyHandler)
        self.routes = routes
        self.web = web or WebConfig()
        self._tls = self.web.tls.context() if self.web.tls is not None else None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self._tls is not None:
            request.settimeout(LEGACY_TLS_HANDSHAKE_TIMEOUT)
            try:
                request = self._tls.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError):
                return
        super().finish_request(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="http", daemon=True
        )
        thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


# --- the load: idle connections and slowloris, in a process of its own ---------------------------
def raise_open_files(needed: int) -> int:
    """Raise this process's soft open-files limit to ``needed`` if the hard limit allows;
    the soft limit afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return needed if soft == resource.RLIM_INFINITY else soft


@dataclass(slots=True)
class LoadCounts:
    idle_open: int = 0
    slow_open: int = 0
    closed_by_server: int = 0  # connections the server ended while the load held them
    connect_failures: int = 0


class Load:
    """``idle`` connections that send nothing and ``slow`` clients that send a request line,
    then a header byte every ``drip`` seconds; with ``reopen``, what the server closes is
    opened again."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.counts = LoadCounts()
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.dropping = False
        self.ssl: ssl.SSLContext | None = None
        if args.tls_ca:
            self.ssl = ssl.create_default_context(cafile=args.tls_ca)
            if args.tls_cert:
                self.ssl.load_cert_chain(args.tls_cert, args.tls_key)
        self.gate = asyncio.Semaphore(256)  # connects in flight, so none waits on a backlog

    async def _open(self, tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async with self.gate:
            try:
                async with asyncio.timeout(10):
                    return await asyncio.open_connection(
                        "127.0.0.1", self.args.port, ssl=self.ssl if tls else None
                    )
            except (OSError, ssl.SSLError):  # TimeoutError included
                self.counts.connect_failures += 1
                return None

    async def _client(self, slow: bool) -> None:
        while not self.dropping:
            opened = await self._open(tls=slow and self.ssl is not None)
            if opened is None:
                await asyncio.sleep(0.2)
                continue
            reader, writer = opened
            self.writers.add(writer)
            if slow:
                self.counts.slow_open += 1
            else:
                self.counts.idle_open += 1
            try:
                if slow:
                    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                    while not reader.at_eof():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.args.drip):
                                await reader.read(1024)
                        if reader.at_eof():
                            break
                        writer.write(b"a")
                else:
                    await reader.read()
            except (OSError, ssl.SSLError):
                pass
            finally:
                self.writers.discard(writer)
                writer.transport.abort()
                if slow:
                    self.counts.slow_open -= 1
                else:
                    self.counts.idle_open -= 1
                self.counts.closed_by_server += 1
            if not self.args.reopen:
                return

    def start(self) -> None:
        for i in range(self.args.idle + self.args.slow):
            task = asyncio.ensure_future(self._client(slow=i >= self.args.idle))
            self.tasks.add(task)

    async def drop(self) -> None:
        self.dropping = True
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in list(self.writers):
            writer.transport.abort()


def report(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def load_main(args: argparse.Namespace) -> int:
    needed = args.idle + args.slow + 256
    if raise_open_files(needed) < needed:
        report("too_few_files", needed=needed, hard=resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        return 3
    load = Load(args)
    load.start()
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_commands() -> None:  # stdin, line by line; its end is a quit
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_commands, daemon=True).start()
    deadline = time.monotonic() + 30
    while load.counts.idle_open + load.counts.slow_open < args.idle + args.slow:
        if time.monotonic() > deadline or (not args.reopen and load.counts.closed_by_server):
            break
        await asyncio.sleep(0.05)
    report("holding", **asdict(load.counts))
    while True:
        command = await commands.get()
        if command == "counts":
            report("counts", **asdict(load.counts))
        elif command in ("drop", "quit"):
            await load.drop()
            report("dropped", **asdict(load.counts))
            if command == "quit":
                return 0


class LoadProcess:
    """The load in a child process (so its CPU and GIL are not the scraper's)."""

    def __init__(
        self,
        port: int,
        idle: int,
        slow: int,
        drip: float,
        reopen: bool,
        tls: dict[str, str],
        cpus: str = "",
    ) -> None:
        argv = [sys.executable, str(HERE), "load", "--port", str(port), "--idle", str(idle),
                "--slow", str(slow), "--drip", str(drip), "--cpus", cpus]  # fmt: skip
        if reopen:
            argv.append("--reopen")
        for key, value in tls.items():
            argv += [f"--tls-{key}", value]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.holding = self._event()

    def _event(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load process exited with {self.proc.wait()}")
        event: dict[str, Any] = json.loads(line)
        if event["event"] == "too_few_files":
            raise OSError(f"open-files limit too low for the load: {event}")
        return event

    def command(self, what: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(what + "\n")
        return self._event()

    def close(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            return None
        try:
            event = self.command("quit")
        except (OSError, RuntimeError, ValueError):
            event = None
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return event


# --- the server process -----------------------------------------------------------------------
def page_renderer(series: int) -> Any:
    """A ``/metrics`` renderer: ``series`` gauges through prometheus_client's text encoder."""
    from prometheus_client import CollectorRegistry, Gauge
    from prometheus_client.exposition import choose_encoder

    registry = CollectorRegistry(auto_describe=False)
    gauge = Gauge("bench_value", "A value.", ["engine", "medium", "i"], registry=registry)
    for i in range(series):
        gauge.labels(f"engine-{i % 8}", ("GPU", "CPU", "DISK")[i % 3], str(i)).set(i)

    def render(accept: str | None) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept or "")
        return encoder(registry), content_type

    return render


def pin(cpus: str) -> None:
    """Run this process (and the threads it starts from now on) on ``cpus`` ("0", "0,1")."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


class LoopProbe:
    """What keeps the server's event loop busy: every loop iteration over ``slow`` seconds
    (its wall-clock start, duration, and the callbacks it ran), and the lag of a 5 ms sleeper
    (how late the loop got to a ready timer). Installed from the loop's own thread."""

    def __init__(self, slow: float = 0.02) -> None:
        self.slow = slow
        self.iterations: list[tuple[float, float, int]] = []  # (time.time(), seconds, handles)
        self.lags: list[tuple[float, float]] = []  # (time.time(), seconds late), > slow
        self.busy = 0.0  # seconds in iterations over ``slow``
        self.collections: list[tuple[float, int, float, int]] = []  # (time, gen, s, objects)
        self._gc_started = 0.0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        run_once = loop._run_once  # type: ignore[attr-defined]
        ready = loop._ready  # type: ignore[attr-defined]

        def timed() -> None:
            started = time.perf_counter()
            run_once()
            took = time.perf_counter() - started
            if took > self.slow:
                self.busy += took
                self.iterations.append((time.time() - took, took, len(ready)))

        loop._run_once = timed  # type: ignore[attr-defined]
        loop.create_task(self._sleeper())
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif info["generation"] == 2 or time.perf_counter() - self._gc_started > 0.005:
            took = time.perf_counter() - self._gc_started
            self.collections.append((time.time(), info["generation"], took, info["collected"]))

    async def _sleeper(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + 0.005
            await asyncio.sleep(0.005)
            late = loop.time() - expected
            if late > self.slow:
                self.lags.append((time.time(), late))

    def summary(self) -> dict[str, Any]:
        return {
            "iterations_over": len(self.iterations),
            "busy_s": round(self.busy, 3),
            "worst": sorted(self.iterations, key=lambda it: -it[1])[:10],
            "lags": self.lags,
            "iterations": self.iterations,
            "collections": self.collections,
        }


def serve_main(args: argparse.Namespace) -> int:
    pin(args.cpus)
    raise_open_files(args.files)
    routes = Routes(
        telemetry_path="/metrics",
        metrics=page_renderer(args.series),
        ready=lambda: (True, "ready"),
        summary=dict,
        export=lambda _query: (b"", "text/plain"),
    )
    cls: Any = MetricsHTTPServer if args.impl == "asyncio" else LegacyServer
    server = cls(("127.0.0.1", 0), routes)
    server.start()
    probe = LoopProbe() if args.probe else None
    if probe is not None:
        loop = server._loop
        loop.call_soon_threadsafe(probe.install, loop)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    report("serving", port=server.port)
    while not stop.wait(0.5):
        pass
    server.stop()
    if probe is not None:
        Path(args.probe).write_text(json.dumps(probe.summary()))
    return 0


# --- the measurement ----------------------------------------------------------------------------
def scrape(port: int, timeout: float) -> float | None:
    """Seconds for one scrape on a fresh connection, or None if it failed."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            return None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    return time.perf_counter() - started


@dataclass(slots=True)
class Phase:
    name: str
    scrapes: int = 0
    failed: int = 0
    over_half_second: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    slow: list[tuple[float, float]] = field(default_factory=list)  # (time.time(), s) > 0.2 s


def measure(name: str, port: int, seconds: float, args: argparse.Namespace) -> Phase:
    print(f"{name}: {seconds:g} s of scrapes", file=sys.stderr, flush=True)
    latencies: list[float] = []
    phase = Phase(name)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.time()
        took = scrape(port, args.timeout)
        phase.scrapes += 1
        if took is None:
            phase.failed += 1
        else:
            latencies.append(took)
            if took > 0.2:
                phase.slow.append((started, round(took, 3)))
            phase.over_half_second += took > 0.5
            if took > 0.5:
                print(
                    f"  slow scrape: {took:.2f} s at {seconds - (end - time.monotonic()):.2f} s",
                    file=sys.stderr,
                    flush=True,
                )
        time.sleep(args.interval)
    if latencies:
        phase.p50_ms = statistics.median(latencies) * 1e3
        phase.p99_ms = sorted(latencies)[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3
        phase.max_ms = max(latencies) * 1e3
    return phase


def process_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (kB) of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


@dataclass(slots=True)
class ServerRun:
    impl: str
    phases: list[Phase] = field(default_factory=list)
    hold_threads: int = 0
    hold_started: float = 0.0  # time.time()
    hold_rss_mb: float = 0.0
    stop_seconds: float = 0.0


def run_server(impl: str, args: argparse.Namespace) -> ServerRun:
    files = args.idle + args.slow + 1024
    probe = f"{args.probe}.{impl}.json" if args.probe else ""
    server = subprocess.Popen(
        [sys.executable, str(HERE), "serve", "--impl", impl, "--series", str(args.series),
         "--files", str(files), "--cpus", args.cpus_server, "--probe", probe],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    port = int(json.loads(server.stdout.readline())["port"])
    run = ServerRun(impl)
    print(f"--- {impl}", file=sys.stderr, flush=True)
    try:
        run.phases.append(measure("baseline", port, args.baseline, args))
        load = LoadProcess(
            port, args.idle, args.slow, args.drip, reopen=True, tls={}, cpus=args.cpus_load
        )
        try:
            run.hold_started = time.time()
            hold = measure("hold", port, args.hold, args)
            status = process_status(server.pid)
            run.hold_threads, run.hold_rss_mb = status["Threads"], status["VmRSS"] / 1024
            run.phases.append(hold)
        finally:
            load.close()
        run.phases.append(measure("after", port, args.after, args))
        load = LoadProcess(
            port, args.idle, args.slow, args.drip, reopen=True, tls={}, cpus=args.cpus_load
        )
        try:
            started = time.monotonic()
            server.send_signal(signal.SIGTERM)
            server.wait(60)
            run.stop_seconds = time.monotonic() - started
        finally:
            load.close()
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    return run


def print_table(runs: list[ServerRun], args: argparse.Namespace) -> None:
    print(
        f"\n{args.idle} idle connections + {args.slow} slowloris (a header byte every "
        f"{args.drip:g} s); /metrics of {args.series} series; fresh connection per scrape\n"
    )
    print("| server | phase | scrapes | failed | > 0.5 s | p50 ms | p99 ms | max ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        for p in run.phases:
            print(
                f"| {run.impl} | {p.name} | {p.scrapes} | {p.failed} | {p.over_half_second} | "
                f"{p.p50_ms:.1f} | {p.p99_ms:.1f} | {p.max_ms:.1f} |"
            )
    print("\n| server | threads during hold | RSS during hold (MB) | SIGTERM to exit (s) |")
    print("| --- | ---: | ---: | ---: |")
    for run in runs:
        print(
            f"| {run.impl} | {run.hold_threads} | {run.hold_rss_mb:.0f} | {run.stop_seconds:.2f} |"
        )


def bench_main(args: argparse.Namespace) -> int:
    pin(args.cpus_scraper)
    raise_open_files(args.idle + args.slow + 1024)
    runs = [run_server(impl, args) for impl in args.servers.split(",")]
    print_table(runs, args)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"config": vars(args), "runs": [asdict(r) for r in runs]}, indent=2)
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load", help="hold idle and slowloris connections (stdin: drop, quit)")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--cpus", default="", help="CPUs to run on (taskset -c)")
    load.add_argument("--tls-ca", default="")
    load.add_argument("--tls-cert", default="")
    load.add_argument("--tls-key", default="")
    serve = sub.add_parser("serve", help="a server process for the bench")
    serve.add_argument("--impl", choices=("asyncio", "threading"), required=True)
    serve.add_argument("--series", type=int, default=3000)
    serve.add_argument("--files", type=int, default=8192)
    serve.add_argument("--cpus", default="", help="CPUs to run on (taskset -c)")
    serve.add_argument("--probe", default="", help="write the event loop's busy spells here")
    for p in (parser, load):
        p.add_argument("--idle", type=int, default=5000)
        p.add_argument("--slow", type=int, default=200)
        p.add_argument("--drip", type=float, default=5.0, help="seconds between header bytes")
    load.add_argument("--reopen", action="store_true")
    parser.add_argument("--servers", default="asyncio,threading")
    parser.add_argument("--series", type=int, default=3000)
    parser.add_argument("--baseline", type=float, default=3.0)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json", default="")
    parser.add_argument("--cpus-server", default="", help="CPUs of the server (taskset -c)")
    parser.add_argument("--cpus-load", default="", help="CPUs of the load process")
    parser.add_argument("--cpus-scraper", default="", help="CPUs of this process, the scraper")
    parser.add_argument(
        "--probe", default="", help="PATH: each server's event-loop busy spells to PATH.IMPL.json"
    )
    args = parser.parse_args(argv)
    if args.command == "load":
        pin(args.cpus)
        return asyncio.run(load_main(args))
    if args.command == "serve":
        return serve_main(args)
    return bench_main(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
