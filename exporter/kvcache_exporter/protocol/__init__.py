"""Engine wire formats: framing, payload decoding into columnar batches, and the publisher."""
