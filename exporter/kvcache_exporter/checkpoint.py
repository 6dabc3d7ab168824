"""``--storage.path``: periodic, atomic checkpoints of every engine's state.

A checkpoint holds each engine's collector arrays (block table, counters, histograms,
remembered removals, recent evictions), its what-if model (sampled keys, orders, sampling
threshold, counters), its stream counters and the sequence number it has applied up to. On
start the exporter continues from it: counters go on instead of resetting, and the first live
message shows the gap since the checkpoint, which a source with ``replay=`` asks the engine
for. An engine that restarted meanwhile (its sequence back to 0) is recognised as such and
starts empty. A checkpoint that cannot be read or does not fit the configuration is set aside
(renamed) and reported, never fatal; a what-if state that does not fit its settings only
starts the what-if empty.

The file is ``checkpoint.npz`` (numpy, no pickles): arrays named ``ENGINE/...`` (and
``whatif/ENGINE/...``) plus ``meta``, a JSON document. It is written to a temporary file in
the same folder, flushed to disk and renamed over the old one, so a crash leaves either the
old or the new checkpoint whole.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from . import __version__
from .pipeline import Pipeline
from .protocol.batch import GroupSpec
from .sources.stream import SourceStats

# 2: counters per place (medium and KV-cache group), physical copies, adapters and tokens.
# 3: no queue of removals; a ghost's t_access holds its removal ordinal (collector/apply.py).
FORMAT_VERSION: Final = 3
FILE_NAME: Final = "checkpoint.npz"
# The what-if model's arrays: ``whatif/ENGINE/...``, apart from the collector's ``ENGINE/...``.
# Optional: a checkpoint without them (an earlier version's) starts the what-if empty.
WHATIF_PREFIX: Final = "whatif/"

log = logging.getLogger("kvcache_exporter.checkpoint")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    arrays: dict[str, npt.NDArray[Any]]
    meta: dict[str, Any]


def _fingerprint(pipeline: Pipeline) -> dict[str, Any]:
    config = pipeline.collector.config
    return {
        "sample_ratio": config.sample_ratio,
        "duration_buckets": list(config.duration_buckets),
        "access_buckets": list(config.access_buckets),
        "depth_buckets": list(config.depth_buckets),
    }


# SourceStats fields not in a checkpoint's "stats": the live connection count (not a
# counter), and the handshake failures (stored beside it).
_STATS_KEPT_APART: Final = frozenset({"connections", "handshake_failures"})


def capture(pipelines: list[Pipeline]) -> Checkpoint:
    """Copy every engine's state. Call it where no batch is half applied (the ingest thread
    between bursts, or after it stopped)."""
    arrays: dict[str, npt.NDArray[Any]] = {}
    engines: dict[str, Any] = {}
    for pipeline in pipelines:
        stream = pipeline.stream
        for name, values in pipeline.collector.state().items():
            arrays[f"{pipeline.name}/{name}"] = values
        whatif_meta = None
        if pipeline.whatif is not None:
            whatif_arrays, whatif_meta = pipeline.whatif.state()
            for name, values in whatif_arrays.items():
                arrays[f"{WHATIF_PREFIX}{pipeline.name}/{name}"] = values
        decoded = stream.decoder.stats
        engines[pipeline.name] = {
            "fingerprint": _fingerprint(pipeline),
            "media": list(pipeline.collector.media.names),
            "reasons": list(pipeline.collector.reasons.names),
            "groups": list(pipeline.collector.groups.names),
            "adapters": list(pipeline.collector.adapters.names),
            "next_seq": stream.applied_through + 1 if stream.applied_through is not None else None,
            "stats": {k: v for k, v in asdict(stream.stats).items() if k not in _STATS_KEPT_APART},
            # Apart from "stats", which an earlier version reads whole into SourceStats.
            "handshake_failures": dict(stream.stats.handshake_failures),
            "decoded": {
                "events": dict(decoded.events),
                "errors": dict(decoded.errors),
                "unknown_fields": decoded.unknown_fields,
                "tokens_stored": decoded.tokens_stored,
                "groups": {str(g): [s.kind, s.sliding_window] for g, s in decoded.groups.items()},
            },
            "whatif": whatif_meta,
        }
    meta = {
        "format": FORMAT_VERSION,
        "version": __version__,
        "written_at": time.time(),
        "engines": engines,
    }
    return Checkpoint(arrays, meta)


class CheckpointStore:
    """The checkpoint file in ``--storage.path``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILE_NAME

    def save(self, checkpoint: Checkpoint) -> None:
        """Write atomically: temporary file, fsync, rename."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".checkpoint-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as file:
                arrays: dict[str, Any] = {
                    "meta": np.frombuffer(json.dumps(checkpoint.meta).encode(), np.uint8),
                    **checkpoint.arrays,
                }
                np.savez(file, **arrays)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> Checkpoint | None:
        """The checkpoint, or None (none there, or unreadable: then it is set aside)."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data["meta"]).decode())
                arrays = {name: data[name] for name in data.files if name != "meta"}
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        except Exception as exc:  # a corrupt file can fail in many ways; none may be fatal
            self.set_aside(f"unreadable ({exc})")
            return None
        return Checkpoint(arrays, meta)

    def set_aside(self, why: str) -> None:
        aside = self.path.with_name(f"{FILE_NAME}.bad-{int(time.time())}")
        try:
            os.replace(self.path, aside)
        except OSError:
            aside = self.path
        log.warning("checkpoint set aside; starting empty", extra={"why": why, "file": str(aside)})


def restore(pipelines: list[Pipeline], checkpoint: Checkpoint, store: CheckpointStore) -> None:
    """Continue each engine from the checkpoint where it fits; report what does not."""
    engines = checkpoint.meta.get("engines", {})
    for pipeline in pipelines:
        entry = engines.get(pipeline.name)
        if entry is None:
            log.info("no checkpointed state for this engine", extra={"engine": pipeline.name})
            continue
        try:
            _restore_one(pipeline, entry, checkpoint.arrays)
        except (KeyError, ValueError, TypeError) as exc:
            store.set_aside(f"engine {pipeline.name}: {exc}")
            pipeline.collector.reset()  # a half-loaded state is worse than an empty one
            continue
        log.info(
            "continuing from checkpoint",
            extra={"engine": pipeline.name, "next_seq": entry.get("next_seq")},
        )
    unknown = sorted(set(engines) - {p.name for p in pipelines})
    if unknown:
        log.info(
            "checkpoint has engines no longer configured", extra={"engines": ",".join(unknown)}
        )


def _restore_one(pipeline: Pipeline, entry: dict[str, Any], arrays: dict[str, Any]) -> None:
    if entry["fingerprint"] != _fingerprint(pipeline):
        raise ValueError("sample ratio or buckets changed since the checkpoint")
    collector, stream = pipeline.collector, pipeline.stream
    collector.media.restore(entry["media"])
    collector.reasons.restore(entry["reasons"])
    collector.groups.restore(entry["groups"])
    collector.adapters.restore(entry["adapters"])
    prefix = f"{pipeline.name}/"
    collector.load_state(
        {name.removeprefix(prefix): v for name, v in arrays.items() if name.startswith(prefix)}
    )
    # Fields a later version added are left out, so that going back a version keeps the rest.
    known = {f.name for f in fields(SourceStats)} - _STATS_KEPT_APART
    stream.stats = SourceStats(**{k: v for k, v in entry["stats"].items() if k in known})
    stream.stats.handshake_failures.update(entry.get("handshake_failures", {}))
    decoded = entry["decoded"]
    stream.decoder.stats.events.update(decoded["events"])
    stream.decoder.stats.errors.update(decoded["errors"])
    stream.decoder.stats.unknown_fields = int(decoded["unknown_fields"])
    stream.decoder.stats.tokens_stored = int(decoded["tokens_stored"])
    for group, (kind, window) in decoded["groups"].items():
        stream.decoder.stats.groups[int(group)] = GroupSpec(str(kind), str(window))
    if entry["next_seq"] is not None:
        stream.resume_at(int(entry["next_seq"]))
    _restore_whatif(pipeline, entry.get("whatif"), arrays)


def _restore_whatif(pipeline: Pipeline, meta: Any, arrays: dict[str, Any]) -> None:
    """The what-if model continues where it fits; otherwise it starts empty (the collector's
    state is worth keeping either way)."""
    if pipeline.whatif is None:
        return
    why = "the checkpoint has no what-if state"
    if meta is not None:
        prefix = f"{WHATIF_PREFIX}{pipeline.name}/"
        mine = {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}
        try:
            pipeline.whatif.load_state(mine, meta)
            return
        except (KeyError, ValueError, TypeError) as exc:
            why = str(exc)
    log.info("what-if model starts empty", extra={"engine": pipeline.name, "why": why})


class CheckpointWriter:
    """Writes captured checkpoints on its own thread; the newest pending one wins."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._pending: Checkpoint | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="checkpoint", daemon=True)
        self._thread.start()

    def submit(self, checkpoint: Checkpoint) -> None:
        with self._cond:
            self._pending = checkpoint
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._pending is None:
                    return
                checkpoint, self._pending = self._pending, None
            self._write(checkpoint)

    def _write(self, checkpoint: Checkpoint) -> None:
        started = time.perf_counter()
        try:
            self.store.save(checkpoint)
        except OSError as exc:
            log.error("checkpoint not written", extra={"error": str(exc)})
            return
        log.debug("checkpoint written", extra={"seconds": round(time.perf_counter() - started, 3)})

    def close(self, final: Checkpoint | None) -> None:
        """Write ``final`` (if any) and stop."""
        with self._cond:
            if final is not None:
                self._pending = final
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)
