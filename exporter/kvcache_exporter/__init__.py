"""kvcache-exporter: KV-cache block lifecycle metrics for LLM inference engines."""

__version__ = "0.1.0"
