"""Real processes for the end-to-end tests: the exporter and Prometheus, on 127.0.0.1 only.

Every process is killed when its fixture ends, whatever the outcome, and while it lives its
log is attached to the report of any failing test (pytest prints it under the failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvcache_exporter.protocol.encode import Accessed, Cleared, Event, Removed, Stored

from ..conftest import free_port

EXPORTER = (sys.executable, "-m", "kvcache_exporter.cli")
U64 = (1 << 64) - 1
LabelSet = frozenset[tuple[str, str]]
Samples = dict[tuple[str, LabelSet], float]


# --- small helpers ------------------------------------------------------------------------------
def clean_env() -> dict[str, str]:
    """This environment without KVCACHE_EXPORTER_* variables, so only flags configure."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_EXPORTER_")}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status and body of a GET; an HTTP error status is returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def wait_for(check: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:  # connection refused while a server starts, and the like
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


def as_map(event: Event) -> dict[str, object]:
    """An event as the vLLM map form decodes to (what the reference reads)."""
    if isinstance(event, Cleared):
        return {"type": "AllBlocksCleared"}
    hashes = [int(h) & U64 for h in event.block_hashes]  # the simulator sends int hashes
    if isinstance(event, Stored):
        return {"type": "BlockStored", "block_hashes": hashes, "medium": event.medium}
    if isinstance(event, Removed):
        return {
            "type": "BlockRemoved",
            "block_hashes": hashes,
            "medium": event.medium,
            "reason": event.reason,
        }
    assert isinstance(event, Accessed)
    return {"type": "BlockAccessed", "block_hashes": hashes, "medium": event.medium}


def parse_samples(text: str) -> Samples:
    """Every sample of an exposition, keyed by sample name and label set."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = float(sample.value)
    return samples


def select(samples: Samples, name: str, **labels: str) -> dict[LabelSet, float]:
    """The samples of ``name`` whose labels include ``labels``, keyed by their other labels."""
    wanted = set(labels.items())
    return {
        frozenset(set(key) - wanted): value
        for (sample, key), value in samples.items()
        if sample == name and wanted <= key
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of ``name`` with exactly these labels (KeyError when absent)."""
    return samples[(name, frozenset(labels.items()))]


# --- processes ------------------------------------------------------------------------------------
class LoggedProcess:
    """A child process whose stdout and stderr go to a file (no pipe to fill up)."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=clean_env()
            )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<log unreadable: {exc}>"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fail(self, message: str) -> AssertionError:
        """An error carrying the process's log, for failures before a test body runs."""
        return AssertionError(f"{message}\n--- {self.name} log ---\n{self.log_text()}")

    def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; always reaps."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


_LIVE: list[LoggedProcess] = []


@contextlib.contextmanager
def managed(process: LoggedProcess) -> Iterator[LoggedProcess]:
    """Registers ``process`` for failure reports and always stops it at the end."""
    _LIVE.append(process)
    try:
        yield process
    finally:
        _LIVE.remove(process)
        process.terminate()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for process in _LIVE:
            report.sections.append((f"{process.name} log", process.log_text()))
    return report


class ExporterProcess(LoggedProcess):
    """``kvcache-exporter`` serving HTTP on 127.0.0.1:``port``."""

    def __init__(self, args: list[str], log_path: Path, port: int | None = None) -> None:
        self.port = free_port() if port is None else port
        argv = [*EXPORTER, *args, "--web.listen-address", f"127.0.0.1:{self.port}"]
        super().__init__("kvcache-exporter", argv, log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.url + path)

    def wait_serving(self, timeout: float = 15.0) -> None:
        """Until ``/healthz`` answers 200; fails with the log if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise self.fail(f"exporter exited with {self.proc.returncode} before serving")
            with contextlib.suppress(OSError):
                if self.get("/healthz")[0] == 200:
                    return
            time.sleep(0.05)
        raise self.fail(f"exporter not serving /healthz after {timeout:g}s")

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Until ``/readyz`` answers 200 (every source connected)."""
        try:
            wait_for(lambda: self.get("/readyz")[0] == 200, timeout, "/readyz 200")
        except AssertionError as exc:
            raise self.fail(str(exc)) from None

    def scrape(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}: {text[:200]}"
        return parse_samples(text)

    def wait_ingested(self, batches: dict[str, int], timeout: float = 30.0) -> Samples:
        """Scrape until each engine's ``kvcache_exporter_messages_total`` equals ``batches`` and
        two scrapes in a row agree; the last scrape.

        The message counter moves as a message is read and the collector a moment later, so a
        single matching scrape could still miss the last batch's effects.
        """

        def received() -> bool:
            samples = self.scrape()
            return all(
                samples.get(("kvcache_exporter_messages_total", frozenset({("engine", name)})))
                == count
                for name, count in batches.items()
            )

        try:
            wait_for(received, timeout, f"messages_total to reach {batches}", step=0.1)
            last = self.scrape()
            deadline = time.monotonic() + timeout
            while True:
                time.sleep(0.1)
                now = self.scrape()
                if now == last:
                    return now
                if time.monotonic() > deadline:
                    raise AssertionError("/metrics kept changing after every message arrived")
                last = now
        except AssertionError as exc:
            raise self.fail(str(exc)) from None


@pytest.fixture
def start_exporter(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    """Starts exporters with the given flags (listen address added) and waits until they serve;
    every one is stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        count = 0

        def start(*args: str, wait: bool = True) -> ExporterProcess:
            nonlocal count
            count += 1
            process = ExporterProcess(list(args), tmp_path / f"exporter-{count}.log")
            stack.enter_context(managed(process))
            if wait:
                process.wait_serving()
            return process

        yield start


class PrometheusProcess(LoggedProcess):
    """A real Prometheus server scraping the given targets every second."""

    def __init__(self, binary: str, workdir: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        jobs = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
            for job, port in targets.items()
        )
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n{jobs}"
        )
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=info",
        ]
        super().__init__("prometheus", argv, workdir / "prometheus.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 20.0) -> None:
        try:
            wait_for(lambda: http_get(self.url + "/-/ready")[0] == 200, timeout, "/-/ready")
        except AssertionError as exc:
            raise self.fail(str(exc)) from None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (``/api/v1/query``)."""
        url = self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_get(url)
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", body
        assert answer["data"]["resultType"] == "vector", body
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result
