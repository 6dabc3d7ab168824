"""vLLM 0.33's own event streams through the real exporter, against the engine's own counts.

Each stream (``tests/fixtures/streams``, see SOURCE.md there) is every message vLLM 0.33.0's
``KVCacheManager`` published over a whole Mooncake trace with a 2,000-block pool: one
full-attention group (``full``), or a sliding-window group and a full-attention group sharing
the pool (``hybrid``). Its ``*.truth.json`` is what vLLM's own state said, per
``"group|medium"``. Here the real ``kvcache-exporter`` binds, a ZeroMQ publisher in the test
connects and sends every message unchanged, and ``/metrics``, ``/api/v1/summary`` and an OTLP
export must all say what the engine said: hashes stored and removed, physical blocks and
distinct hashes resident at the end, per group. The same frames written to a recording must
give the same numbers through ``kvcache-exporter analyze``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq

from kvcache_exporter.catalog import BY_NAME
from kvcache_exporter.sources.recording import RecordingWriter

from ..conftest import free_port
from ..otlp_receivers import Flat, GrpcReceiver, flatten
from ..streams import NAMES, load_truth, read_stream
from .conftest import (
    EXPORTER,
    ExporterProcess,
    Samples,
    clean_env,
    managed,
    select,
    value,
)

pytestmark = pytest.mark.e2e

ENGINE = "vllm"
STORED = "kvcache_blocks_stored_total"
INGEST_TIMEOUT = 60.0  # seconds for the exporter to take in a whole stream (1 to 2 s here)


@dataclass(frozen=True)
class Place:
    """One ``"group|medium"`` entry of a truth file: what the engine's state said."""

    group: str
    medium: str
    stored: int
    removed: int
    resident: int  # physical blocks in the block pool at the end
    resident_hashes: int  # distinct hashes among them


def places(truth: dict[str, Any]) -> list[Place]:
    out = []
    for key, entry in sorted(truth["per_group_medium"].items()):
        group, medium = key.split("|")
        assert (int(group), medium) == (entry["group_idx"], entry["medium"]), key
        out.append(
            Place(
                group,
                medium,
                stored=entry["stored_hashes"],
                removed=entry["removed_hashes"],
                resident=entry["resident_blocks_end_block_pool"],
                resident_hashes=entry["resident_distinct_end_block_pool"],
            )
        )
    return out


def removed_on(truth: dict[str, Any], medium: str) -> int:
    """Hashes removed from ``medium`` (one per physical block), all groups together."""
    return sum(p.removed for p in places(truth) if p.medium == medium)


@dataclass
class Run:
    """One exporter after it took in one whole stream."""

    name: str
    truth: dict[str, Any]
    messages: int
    exporter: ExporterProcess
    samples: Samples
    summary: dict[str, Any]
    otlp: Flat  # an export whose snapshot was taken after everything was ingested
    seconds: float  # from the first message sent to everything ingested


@contextlib.contextmanager
def connected_publisher(endpoint: str, exporter: ExporterProcess) -> Iterator[zmq.Socket[bytes]]:
    """A publisher connected to the exporter's bound endpoint, once the exporter's
    subscription has reached it.

    An XPUB socket is a PUB on the wire that also hands over the subscriptions it gets, so the
    first message goes out only once the exporter is subscribed: a PUB drops what it sends
    before, and no message is lost to that slow-joiner race. SNDHWM 0 queues without limit,
    so nothing is dropped at the high water mark either.
    """
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.XPUB)
    try:
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(endpoint)
        if not sock.poll(10_000, zmq.POLLIN):
            raise exporter.fail(f"no subscription from the exporter at {endpoint} within 10 s")
        subscription = sock.recv()
        assert subscription == b"\x01", subscription  # subscribe, to every topic
        yield sock
    finally:
        sock.close(linger=0)


def export_after_now(receiver: GrpcReceiver, timeout: float = 15.0) -> Flat:
    """The second export to arrive from now: its snapshot was certainly taken after this
    moment (the first may have been in flight already)."""
    count = receiver.store.count() + 2
    return flatten(receiver.store.wait_for(count, timeout).request)


@pytest.fixture(scope="module", params=NAMES)
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Start the exporter (binding, OTLP to a real receiver), publish one whole stream, wait
    until all of it is ingested; the scrape, summary and OTLP export after that."""
    name: str = request.param
    truth = load_truth(name)
    messages = read_stream(name)
    log_dir = tmp_path_factory.mktemp(f"streams-{name}")
    port = free_port()
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as env:
        for key in list(os.environ):  # only the flags below configure OTLP
            if key.startswith("OTEL_"):
                env.delenv(key)
        receiver = GrpcReceiver(0)
        stack.callback(receiver.close)  # registered first: it outlives the exporter
        args = [
            "--source", f"{ENGINE}=tcp://127.0.0.1:{port},bind",
            "--otlp.endpoint", receiver.endpoint,
            "--otlp.protocol", "grpc",
            "--otlp.interval", "0.5",
        ]  # fmt: skip
        exporter = ExporterProcess(args, log_dir / "exporter.log")
        stack.enter_context(managed(exporter))
        exporter.wait_serving()
        publisher = stack.enter_context(
            connected_publisher(f"tcp://127.0.0.1:{port}", exporter)
        )  # kept connected until the end: the exporter sees no disconnect mid-run
        exporter.wait_ready()
        started = time.monotonic()
        for message in messages:
            publisher.send_multipart(message, copy=False)
        samples = exporter.wait_ingested({ENGINE: len(messages)}, timeout=INGEST_TIMEOUT)
        seconds = time.monotonic() - started
        status, body = exporter.get("/api/v1/summary")
        assert status == 200, body[:200]
        otlp = export_after_now(receiver)
        yield Run(name, truth, len(messages), exporter, samples, json.loads(body), otlp, seconds)


def engine_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``vllm`` entry of a ``{"engines": [...]}`` summary (/api/v1/summary, analyze)."""
    entries: list[dict[str, Any]] = [e for e in summary["engines"] if e["engine"] == ENGINE]
    assert len(entries) == 1, [e["engine"] for e in summary["engines"]]
    return entries[0]


# --- the harness: every message arrived and decoded (holds before per-group support, too) ------
def test_stream_arrived_whole(run: Run) -> None:
    """Every message sent arrived in order and decoded, and the event counts by type are the
    engine's: no gaps, losses or decode errors."""
    s = run.samples
    assert value(s, "kvcache_exporter_messages_total", engine=ENGINE) == run.messages
    assert value(s, "kvcache_exporter_sequence_gaps_total", engine=ENGINE) == 0
    assert value(s, "kvcache_exporter_batches_lost_total", engine=ENGINE) == 0
    assert value(s, "kvcache_exporter_engine_restarts_total", engine=ENGINE) == 0
    errors = select(s, "kvcache_exporter_decode_errors_total", engine=ENGINE)
    assert all(count == 0 for count in errors.values()), errors
    events = {
        dict(labels)["type"]: count
        for labels, count in select(s, "kvcache_events_total", engine=ENGINE).items()
    }
    assert events["BlockStored"] == run.truth["event_counts"]["BlockStored"]
    assert events["BlockRemoved"] == run.truth["event_counts"]["BlockRemoved"]
    # stores on GPU are counted (the exact numbers, per group, are checked below)
    stored = select(s, STORED, engine=ENGINE, medium="GPU")
    assert stored and all(count > 0 for count in stored.values()), stored
    # removals on GPU, summed over reasons and groups: one per BlockRemoved hash
    removed = select(s, "kvcache_blocks_removed_total", engine=ENGINE, medium="GPU")
    assert sum(removed.values()) == removed_on(run.truth, "GPU")
    # the summary and the OTLP export are of the same run
    summary = engine_summary(run.summary)
    assert summary["source"]["messages_total"] == run.messages
    assert summary["source"]["sequence_gaps_total"] == 0
    assert BY_NAME[STORED].otel_name in run.otlp.metrics


def test_ingested_quickly(run: Run) -> None:
    """The whole stream is in within a few seconds of the first message (the budget that keeps
    this module quick; it takes about 1 to 2 s per stream here)."""
    assert run.seconds < 30, f"{run.name}: {run.seconds:.1f} s to ingest {run.messages} messages"


# --- /metrics, per group ---------------------------------------------------------------------
def test_no_unknown_removals(run: Run) -> None:
    """Every ``BlockRemoved`` names a block the exporter knows: state is keyed by (group, hash)
    and a hash with two physical copies stays known until its last removal."""
    s = run.samples
    assert value(s, "kvcache_exporter_unknown_removals_total", engine=ENGINE) == 0


def test_group_info(run: Run) -> None:
    """``kvcache_group_info`` is 1 for each of the engine's KV-cache groups, with its kind and
    sliding window (``""`` for none), and there is no other group."""
    s = run.samples
    want = {
        str(g["group_idx"]): (
            g["kind"],
            "" if g["sliding_window"] is None else str(g["sliding_window"]),
        )
        for g in run.truth["groups"]
    }
    exported = select(s, "kvcache_group_info", engine=ENGINE)
    groups = {dict(labels).get("group") for labels in exported}
    assert groups == set(want), f"kvcache_group_info groups {groups}, want {set(want)}: {exported}"
    for group, (kind, window) in want.items():
        labels = {"engine": ENGINE, "group": group, "kind": kind, "sliding_window": window}
        assert value(s, "kvcache_group_info", **labels) == 1, labels


def metrics_place(s: Samples, place: Place) -> dict[str, float]:
    """The four per-place numbers as /metrics has them."""
    where = {"engine": ENGINE, "medium": place.medium, "group": place.group}
    removed = select(s, "kvcache_blocks_removed_total", **where)
    assert all(set(dict(labels)) == {"reason"} for labels in removed), removed
    return {
        "stored": value(s, STORED, **where),
        "removed": sum(removed.values()),
        "resident": value(s, "kvcache_resident_blocks", **where),
        "resident_hashes": value(s, "kvcache_resident_hashes", **where),
    }


def want_place(place: Place) -> dict[str, float]:
    return {
        "stored": place.stored,
        "removed": place.removed,
        "resident": place.resident,
        "resident_hashes": place.resident_hashes,
    }


def test_metrics_per_group_equal_the_engine(run: Run) -> None:
    """Per group and medium: hashes stored (``kvcache_blocks_stored_total``), removed (summed
    over ``reason``), physical blocks resident (``kvcache_resident_blocks``) and distinct
    hashes resident (``kvcache_resident_hashes``) at the end, as vLLM's own state said."""
    for place in places(run.truth):
        try:
            got = metrics_place(run.samples, place)
        except KeyError as exc:
            raise AssertionError(
                f"{run.name} group {place.group} {place.medium}: no series {exc.args[0]}"
            ) from None
        assert got == want_place(place), f"{run.name} group {place.group} {place.medium}"


# --- /api/v1/summary ---------------------------------------------------------------------------
PLACE_KEYS = {"medium", "group", "stored", "removed", "resident", "resident_hashes"}


def assert_summary_places(summary: dict[str, Any], truth: dict[str, Any], what: str) -> None:
    """The engine's ``places`` list has one entry per group and medium, with the engine's
    numbers (``group`` may be a number or a string)."""
    entry = engine_summary(summary)
    assert "places" in entry, f"{what}: no 'places' in the {ENGINE} entry: {sorted(entry)}"
    got: dict[tuple[str, str], dict[str, Any]] = {}
    for place in entry["places"]:
        assert set(place) >= PLACE_KEYS, f"{what}: place keys {sorted(place)}"
        key = (str(place["group"]), place["medium"])
        assert key not in got, f"{what}: {key} listed twice"
        got[key] = {k: place[k] for k in PLACE_KEYS - {"medium", "group"}}
    want = {(p.group, p.medium): want_place(p) for p in places(truth)}
    assert got == want, what


def test_summary_per_group_equals_the_engine(run: Run) -> None:
    """``/api/v1/summary`` lists the same per-group numbers as ``places`` of the engine."""
    assert_summary_places(run.summary, run.truth, f"{run.name} /api/v1/summary")
    assert engine_summary(run.summary)["unknown_removals_total"] == 0


# --- OTLP ----------------------------------------------------------------------------------------
def test_otlp_stored_per_group_equals_the_engine(run: Run) -> None:
    """The OTLP stored counter has a point per group and medium equal to the hashes stored
    (attribute keys through the exporter's own catalog)."""
    inst = BY_NAME[STORED]
    keys = dict(inst.attributes)
    assert "group" in keys, f"{inst.otel_name}: no OTLP attribute for the group label: {keys}"
    metric = run.otlp.metrics[inst.otel_name]
    points = {
        frozenset((k, str(v)) for k, v in attrs): point for attrs, point in metric.points.items()
    }
    for place in places(run.truth):
        attrs = frozenset(
            {(keys["engine"], ENGINE), (keys["medium"], place.medium), (keys["group"], place.group)}
        )
        assert attrs in points, f"{inst.otel_name}: no point {set(attrs)}; has {list(points)}"
        assert points[attrs] == place.stored, f"{run.name} group {place.group} {place.medium}"


# --- a recording through `kvcache-exporter analyze` -----------------------------------------
def analyze(name: str, tmp_path: Path) -> dict[str, Any]:
    """Write stream ``name`` as a recording (source ``vllm``, a millisecond apart), run the
    real ``kvcache-exporter analyze FILE --format json``; its parsed output."""
    recording = tmp_path / f"{name}.kvrec"
    writer = RecordingWriter(recording)
    arrival = time.time()
    for i, message in enumerate(read_stream(name)):
        writer.write(ENGINE, arrival + i / 1000, message)
    writer.close()
    result = subprocess.run(
        [*EXPORTER, "analyze", str(recording), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr  # no "ends in a cut record"
    output: dict[str, Any] = json.loads(result.stdout)
    return output


@dataclass
class Analyzed:
    """``analyze --format json`` of one stream's recording."""

    name: str
    truth: dict[str, Any]
    messages: int
    output: dict[str, Any]


@pytest.fixture(scope="module", params=NAMES)
def analyzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Analyzed:
    """``analyze --format json`` of each stream's recording, run once per stream."""
    name: str = request.param
    output = analyze(name, tmp_path_factory.mktemp(f"analyze-{name}"))
    return Analyzed(name, load_truth(name), len(read_stream(name)), output)


def test_analyze_recording_arrived_whole(analyzed: Analyzed) -> None:
    """The harness for the offline path: every recorded message went through the pipeline."""
    entry = engine_summary(analyzed.output)
    assert entry["source"]["messages_total"] == analyzed.messages
    assert entry["source"]["sequence_gaps_total"] == 0
    assert entry["events_total"] == analyzed.truth["event_counts"]
    assert all(count == 0 for count in entry["decode_errors_total"].values())
    gpu = entry["media"]["GPU"]
    assert gpu["stored_total"] > 0
    assert sum(gpu["removed_total"].values()) == removed_on(analyzed.truth, "GPU")


def test_analyze_recording_per_group_equals_the_engine(analyzed: Analyzed) -> None:
    """``analyze --format json`` over a recording of the stream lists the same per-group
    numbers as the live summary must."""
    what = f"{analyzed.name} analyze --format json"
    assert_summary_places(analyzed.output, analyzed.truth, what)
    assert engine_summary(analyzed.output)["unknown_removals_total"] == 0
