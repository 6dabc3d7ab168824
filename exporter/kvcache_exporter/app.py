"""Wires sources → protocol → collector → sinks for the exporter process. Composition only."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import zmq

from . import __version__
from .analysis.pool import PoolIndex
from .analysis.whatif.model import COMPILED as WHATIF_COMPILED
from .checkpoint import Checkpoint, CheckpointStore, CheckpointWriter, capture, restore
from .collector import BlockLifecycleCollector
from .collector.apply import COMPILED as APPLY_COMPILED
from .collector.table import COMPILED as TABLE_COMPILED
from .config import ExporterConfig
from .pipeline import EngineView, Pipeline, new_pipeline
from .protocol.compiled import decode_path
from .sinks.export import ExportRequest, render_export
from .sinks.http import MetricsHTTPServer, Routes, links_html, parse_listen_address
from .sinks.prometheus import MetricsPage
from .sinks.status import EngineStatus, StatusPage
from .sinks.summary import summarize
from .sources.authenticator import PublisherAuthenticator
from .sources.subscriber import IngestLoop, SubscriberSource

if TYPE_CHECKING:
    from .sinks.otlp import OTLPSink

log = logging.getLogger("kvcache_exporter")


@dataclass(slots=True)
class Engine:
    """One configured source and the pipeline it feeds."""

    pipeline: Pipeline
    source: SubscriberSource

    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def collector(self) -> BlockLifecycleCollector:
        return self.pipeline.collector


class Exporter:
    """The running exporter: sockets, the ingest thread and the HTTP server."""

    def __init__(self, config: ExporterConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context()
        self.engines: list[Engine] = []
        # The pool indexes, by name: every source is in a pool (``default`` unless it names
        # one). A pool of one engine has nothing resident elsewhere: it gets no index.
        members = Counter(spec.pool for spec in config.sources)
        self.pools = {name: PoolIndex(name) for name, count in members.items() if count > 1}
        for spec in config.sources:
            whatif = replace(config.whatif, capacity=spec.capacity)
            collector = replace(config.collector, hit_reports=spec.hit_reports)
            pool = self.pools.get(spec.pool)
            pipeline = new_pipeline(spec.name, collector, config.monitor, whatif, pool)
            source = SubscriberSource(
                spec,
                self.context,
                pipeline.stream,
                rcvhwm=config.receive_hwm,
                curve=config.curve.get(spec.name),
            )
            self.engines.append(Engine(pipeline, source))
        self.authenticator = PublisherAuthenticator(self.context, config.curve)
        self._stop = threading.Event()
        self._ingest: threading.Thread | None = None
        self.http: MetricsHTTPServer | None = None
        self.otlp: OTLPSink | None = None
        self._checkpoints: CheckpointWriter | None = None
        self._next_checkpoint = 0.0
        self.metrics_page = MetricsPage(self.views, self.otlp_exports, self.http_refusals)
        self.status_page = StatusPage(self.statuses, links_html(config.telemetry_path))

    # --- what the sinks read ---------------------------------------------------------------
    def views(self) -> list[EngineView]:
        """One snapshot per engine: what ``/metrics`` and OTLP both export."""
        return [engine.pipeline.view() for engine in self.engines]

    def statuses(self) -> list[EngineStatus]:
        """Each engine's view and history: what the status page shows."""
        return [
            EngineStatus(e.pipeline.view(), e.pipeline.history.window(), e.pipeline.history.nbytes)
            for e in self.engines
        ]

    def otlp_exports(self) -> dict[str, int] | None:
        """OTLP exports by result while OTLP export is on."""
        otlp = self.otlp
        return otlp.exports() if otlp is not None else None

    def http_refusals(self) -> dict[str, int] | None:
        """Refused HTTP connections and requests by reason while the server runs."""
        http = self.http
        return http.refusals() if http is not None else None

    def metrics(self, accept: str | None) -> tuple[bytes, str]:
        """A ``/metrics`` body in the format ``accept`` asks for, and its content type."""
        return self.metrics_page.exposition(accept)

    def readiness(self) -> tuple[bool, str]:
        down = [e.name for e in self.engines if not e.source.stats.up]
        if down:
            return False, "waiting for sources: " + ", ".join(down)
        return True, "ready"

    def export(self, query: dict[str, list[str]]) -> tuple[bytes, str]:
        """``/api/v1/export``; raises ExportRequestError (a ValueError) on bad parameters."""
        request = ExportRequest.parse(query, [e.name for e in self.engines])
        records = [e.pipeline.records() for e in self.engines]
        return render_export(request, records, self.summary()["engines"])

    def summary(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "engines": [summarize(e.pipeline.view(with_patterns=True)) for e in self.engines],
        }

    def _tick(self, now: float) -> None:
        """Once a second on the ingest thread, between bursts (no batch half applied)."""
        for engine in self.engines:
            engine.pipeline.monitor.tick(now, engine.source.stats.last_arrival)
            engine.pipeline.tick(now)
        if self._checkpoints is not None and now >= self._next_checkpoint:
            checkpoint = self._checkpoint_now()
            if checkpoint is not None:
                self._next_checkpoint = now + self.config.storage_interval
                self._checkpoints.submit(checkpoint)

    def _checkpoint_now(self) -> Checkpoint | None:
        """The state to checkpoint, or None while a replay is in flight: the live messages
        it holds would be neither in the checkpoint nor after its sequence number."""
        if any(e.source.replay is not None and e.source.replay.active for e in self.engines):
            return None
        return capture([e.pipeline for e in self.engines])

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Open every source and the HTTP server; raises OSError/ZMQError if one cannot."""
        if self.config.storage_path is not None:
            store = CheckpointStore(self.config.storage_path)
            checkpoint = store.load()
            if checkpoint is not None:
                restore([e.pipeline for e in self.engines], checkpoint, store)
                for engine in self.engines:
                    if engine.pipeline.pool is not None:
                        engine.pipeline.pool.load()
            self._checkpoints = CheckpointWriter(store)
            self._next_checkpoint = time.time() + self.config.storage_interval
        if self.config.otlp is not None:
            # Imported here: the OpenTelemetry SDK costs nothing when OTLP is off. Built first,
            # so that an unusable OTLP setting fails before any socket opens.
            from .sinks.otlp import OTLPSink

            try:
                self.otlp = OTLPSink(self.config.otlp, self.views, http_refused=self.http_refusals)
            except Exception as exc:  # e.g. an unreadable OTEL_EXPORTER_OTLP_CERTIFICATE
                raise OSError(f"OTLP exporter: {exc}") from exc
        self.authenticator.start()
        for engine in self.engines:
            engine.source.open()
        routes = Routes(
            telemetry_path=self.config.telemetry_path,
            metrics=self.metrics,
            ready=self.readiness,
            summary=self.summary,
            export=self.export,
            pages={"/": self.status_page.html, "/api/v1/status": self.status_page.json},
        )
        self.http = MetricsHTTPServer(
            parse_listen_address(self.config.listen_address),
            routes,
            self.config.web,
            self.config.http_limits,
        )
        self.http.start()
        loop = IngestLoop([engine.source for engine in self.engines], on_tick=self._tick)
        self._ingest = threading.Thread(target=loop.run, args=(self._stop,), name="ingest")
        self._ingest.start()
        if self.otlp is not None:
            self.otlp.start()
        log.info(
            "kvcache-exporter started",
            extra={
                "version": __version__,
                "listen": f"http://{self.config.listen_address}{self.config.telemetry_path}",
                "port": self.http.port,
                "sources": ",".join(f"{e.name}={e.source.spec.endpoint}" for e in self.engines),
                "decoder": decode_path(),
                "block_table": "compiled" if TABLE_COMPILED else "reference",
                "apply": "compiled" if APPLY_COMPILED else "reference",
                "whatif": "compiled" if WHATIF_COMPILED else "reference",
            },
        )

    def stop(self) -> None:
        """Stop ingesting, send the final OTLP export (waiting at most 5 s for it), close sockets
        and the server; without OTLP it returns within about a second."""
        self._stop.set()
        if self._ingest is not None:
            self._ingest.join(timeout=2.0)
        if self._checkpoints is not None:
            # Ingestion has stopped: the state is whole. With no replay in flight it is final.
            self._checkpoints.close(self._checkpoint_now())
        if self.otlp is not None:
            # After ingestion stopped, before any socket closes: the last numbers go out.
            self.otlp.stop()
        if self.http is not None:
            self.http.stop()
        for engine in self.engines:
            engine.source.close()
        self.authenticator.stop()
        self.context.term()
        log.info("kvcache-exporter stopped")
