"""Durations that fall exactly on a bucket bound, through the real exporter process.

Engines stamp batches in milliseconds and every block of a batch shares its ``ts``, so a
reuse gap or an idle time of exactly 30 s (a bound of vLLM's residency buckets) is common: the
Mooncake trace run in ``test_exporter_e2e`` has 144 idle times of exactly 30.000 s. ``le`` is
inclusive, so each belongs in ``le="30"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from kvcache_exporter.publisher import Accessed, Event, KVEventPublisher, Removed, Stored

from ..conftest import free_port
from ..reference import Hist, ReferenceCollector
from .conftest import ExporterProcess, as_map, value

pytestmark = pytest.mark.e2e

STORE = 1_760_000_758.778  # times from that trace run (engine clock, seconds)
ACCESS = 1_760_000_782.085


def test_duration_on_a_bucket_bound_counts_in_that_bucket(
    start_exporter: Callable[..., ExporterProcess],
) -> None:
    """A reuse gap and an idle time of exactly 30 s on the engine's clock count in ``le="30"``.

    The exporter keeps a block's last access as a float32 offset from its store: 23.307 s is
    stored as 23.3069993 s, so both durations come out as 30.0000007 s and land in ``le="60"``.
    """
    batches: list[tuple[float, list[Event]]] = [
        (STORE, [Stored([0x5EED])]),
        (ACCESS, [Accessed([0x5EED])]),  # reuse gap 23.307 s
        (ACCESS + 30, [Accessed([0x5EED])]),  # reuse gap 30 s
        (ACCESS + 60, [Removed([0x5EED])]),  # idle 30 s since the last access
    ]
    assert (ACCESS + 30) - ACCESS == 30.0 and (ACCESS + 60) - (ACCESS + 30) == 30.0  # exact
    reference = ReferenceCollector()
    for ts, events in batches:
        reference.feed(ts, [as_map(event) for event in events])
    port = free_port()
    with KVEventPublisher(f"tcp://127.0.0.1:{port}", bind=True) as publisher:
        exporter = start_exporter("--source", f"engine=tcp://127.0.0.1:{port}")
        exporter.wait_ready()
        time.sleep(0.3)  # ZeroMQ slow joiner
        for ts, events in batches:
            publisher.send_batch(ts, events)
        samples = exporter.wait_ingested({"engine": len(batches)})

    names = ("reuse_gap", "idle_before_evict")
    labels = {"engine": "engine", "medium": "GPU", "group": "0", "le": "30.0"}
    got = {name: value(samples, f"kvcache_block_{name}_seconds_bucket", **labels) for name in names}
    want = {name: cumulative(reference.hist[name], 30.0) for name in names}
    assert want == {"reuse_gap": 2, "idle_before_evict": 1}
    assert got == want


def cumulative(hist: Hist, bound: float) -> int:
    """The reference's GPU count at ``le=bound``."""
    return sum(hist.counts["GPU"][: hist.bounds.index(bound) + 1])
