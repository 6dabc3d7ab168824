"""Wires sources → protocol → collector → sinks for the exporter process. Composition only."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any

import zmq

from . import __version__
from .collector import BlockLifecycleCollector, CollectorConfig
from .collector.lifecycle import DEFAULT_REASONS, REASON_RESTART
from .config import ExporterConfig
from .protocol.batch import LabelTable
from .sinks.http import MetricsHTTPServer, Routes, parse_listen_address
from .sinks.prometheus import EngineView, render
from .sinks.summary import summarize
from .sources.stream import EventStream
from .sources.subscriber import IngestLoop, SubscriberSource

log = logging.getLogger("kvcache_exporter")


def engine_view(name: str, collector: BlockLifecycleCollector, stream: EventStream) -> EngineView:
    """What the sinks read of one engine: its collector snapshot and its stream's counters."""
    decoded = stream.decoder.stats
    return EngineView(
        name=name,
        collector=collector.snapshot(),
        source=stream.stats,
        events=dict(decoded.events),
        decode_errors=stream.decode_errors(),
        unknown_fields=decoded.unknown_fields,
        tokens_stored=decoded.tokens_stored,
        sample_ratio=collector.config.sample_ratio,
    )


@dataclass(slots=True)
class Engine:
    """One configured source and the collector it feeds."""

    name: str
    collector: BlockLifecycleCollector
    source: SubscriberSource

    def view(self) -> EngineView:
        return engine_view(self.name, self.collector, self.source.stream)


def new_pipeline(name: str, config: CollectorConfig) -> tuple[BlockLifecycleCollector, EventStream]:
    """A collector and the stream that feeds it, sharing their label tables."""
    media = LabelTable("unknown")
    reasons = LabelTable("evicted", seed=DEFAULT_REASONS)
    collector = BlockLifecycleCollector(config, media, reasons)
    stream = EventStream(
        name,
        on_batch=collector.apply,
        on_restart=partial(collector.clear, reason=REASON_RESTART),
        media=media,
        reasons=reasons,
    )
    return collector, stream


class Exporter:
    """The running exporter: sockets, the ingest thread and the HTTP server."""

    def __init__(self, config: ExporterConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context()
        self.engines: list[Engine] = []
        for spec in config.sources:
            collector, stream = new_pipeline(spec.name, config.collector)
            source = SubscriberSource(spec, self.context, stream, rcvhwm=config.receive_hwm)
            self.engines.append(Engine(spec.name, collector, source))
        self._stop = threading.Event()
        self._ingest: threading.Thread | None = None
        self.http: MetricsHTTPServer | None = None

    # --- what the sinks read ---------------------------------------------------------------
    def metrics_text(self) -> str:
        return render([engine.view() for engine in self.engines])

    def readiness(self) -> tuple[bool, str]:
        down = [e.name for e in self.engines if not e.source.stats.up]
        if down:
            return False, "waiting for sources: " + ", ".join(down)
        return True, "ready"

    def summary(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "engines": [summarize(engine.view()) for engine in self.engines],
        }

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Open every source and the HTTP server; raises OSError/ZMQError if one cannot."""
        for engine in self.engines:
            engine.source.open()
        routes = Routes(
            telemetry_path=self.config.telemetry_path,
            metrics=self.metrics_text,
            ready=self.readiness,
            summary=self.summary,
        )
        self.http = MetricsHTTPServer(parse_listen_address(self.config.listen_address), routes)
        self.http.start()
        loop = IngestLoop([engine.source for engine in self.engines])
        self._ingest = threading.Thread(target=loop.run, args=(self._stop,), name="ingest")
        self._ingest.start()
        log.info(
            "kvcache-exporter started",
            extra={
                "version": __version__,
                "listen": f"http://{self.config.listen_address}{self.config.telemetry_path}",
                "port": self.http.port,
                "sources": ",".join(f"{e.name}={e.source.spec.endpoint}" for e in self.engines),
            },
        )

    def stop(self) -> None:
        """Stop ingesting, close sockets and the server; returns within about a second."""
        self._stop.set()
        if self._ingest is not None:
            self._ingest.join(timeout=2.0)
        if self.http is not None:
            self.http.stop()
        for engine in self.engines:
            engine.source.close()
        self.context.term()
        log.info("kvcache-exporter stopped")
