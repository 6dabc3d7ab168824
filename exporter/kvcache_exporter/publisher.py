"""Engine-side publisher: emit KV-cache events in the engines' wire format (SPEC §2.1, §2.2).

    from kvcache_exporter.publisher import KVEventPublisher

    with KVEventPublisher("tcp://*:5557") as pub:
        pub.stored([h1, h2], parent_block_hash=h0)
        pub.accessed([h0])
        pub.removed([h9], reason="evicted")
        pub.publish()  # one batch, next sequence number

See docs/protocol.md for the wire form, for engines not written in Python, and
docs/security.md for CURVE keys (``load_key_pair``, ``load_public_key``).
"""

from .protocol.curve import load_key_pair, load_public_key
from .protocol.publisher import (
    Accessed,
    Cleared,
    KVEventPublisher,
    Removed,
    Stored,
    WireForm,
    encode_batch,
    frames,
)

__all__ = [
    "Accessed",
    "Cleared",
    "KVEventPublisher",
    "Removed",
    "Stored",
    "WireForm",
    "encode_batch",
    "frames",
    "load_key_pair",
    "load_public_key",
]
