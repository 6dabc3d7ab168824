"""A source's ``report-mode=`` and ``--collector.max-adapters``, through the real process.

The same scripted stream goes to two sources of one exporter: vLLM's default reading (a store
of a resident hash is a second physical copy, removed once per copy) and ``report-mode=full``
(vLLM's per-request ``kv_cache_report_mode: full``: such a store is a prefix-cache hit).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import zmq

from kvcache_exporter.protocol.encode import frames

from ..conftest import free_port
from .conftest import ExporterProcess, select, value

pytestmark = pytest.mark.e2e


def stored(hashes: list[int], lora_name: str | None = None) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": None,
        "token_ids": list(range(16 * len(hashes))),
        "block_size": 16,
        "medium": "GPU",
        "lora_name": lora_name,
    }


# Hash 1 is stored three times (two copies, or one store and two hits), 2 and 3 by adapters.
BATCHES: list[list[dict[str, Any]]] = [
    [stored([1]), stored([2], "alpha"), stored([3], "beta")],
    [stored([1])],
    [stored([1])],
    [{"type": "BlockRemoved", "block_hashes": [2, 3], "medium": "GPU"}],
]


def test_report_mode_and_adapter_cap(start_exporter: Callable[..., ExporterProcess]) -> None:
    ports = {"copies": free_port(), "hits": free_port()}
    exporter = start_exporter(
        "--source",
        f"copies=tcp://127.0.0.1:{ports['copies']},bind",
        "--source",
        f"hits=tcp://127.0.0.1:{ports['hits']},bind,report-mode=full",
        "--collector.max-adapters",
        "1",
    )
    context = zmq.Context.instance()
    sockets = {}
    for name, port in ports.items():
        sockets[name] = context.socket(zmq.PUB)
        sockets[name].connect(f"tcp://127.0.0.1:{port}")
    try:
        exporter.wait_ready()
        time.sleep(0.3)  # ZeroMQ slow joiner: the SUB side's subscription reaches the PUB
        for seq, events in enumerate(BATCHES):
            payload = msgspec.msgpack.encode([1000.0 + seq, events, 0])
            for sock in sockets.values():
                sock.send_multipart(frames("kv-events", seq, payload))
        samples = exporter.wait_ingested({name: len(BATCHES) for name in ports})
    finally:
        for sock in sockets.values():
            sock.close(linger=0)

    place = {"medium": "GPU", "group": "0"}
    got = {
        engine: {
            family: value(samples, family, engine=engine, **place)
            for family in (
                "kvcache_blocks_stored_total",
                "kvcache_blocks_accessed_total",
                "kvcache_resident_blocks",
                "kvcache_resident_hashes",
            )
        }
        for engine in ports
    }
    assert got["copies"] == {
        "kvcache_blocks_stored_total": 5,
        "kvcache_blocks_accessed_total": 0,
        "kvcache_resident_blocks": 3,  # three copies of hash 1
        "kvcache_resident_hashes": 1,
    }
    assert got["hits"] == {
        "kvcache_blocks_stored_total": 3,
        "kvcache_blocks_accessed_total": 2,
        "kvcache_resident_blocks": 1,
        "kvcache_resident_hashes": 1,
    }
    for engine in ports:
        adapters = {
            dict(labels)["adapter"]: count
            for labels, count in select(
                samples, "kvcache_adapter_blocks_stored_total", engine=engine, medium="GPU"
            ).items()
        }
        # One adapter named; the second lands in "other"; hash 1 is the base model's.
        base = 3 if engine == "copies" else 1
        assert adapters == {"base": base, "alpha": 1, "other": 1}, engine
        assert value(samples, "kvcache_exporter_unknown_removals_total", engine=engine) == 0
