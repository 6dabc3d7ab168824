"""The tool subcommands of ``kvcache-exporter``: demo, replay, record and analyze."""
