"""End-to-end tests: the real exporter process, real ZeroMQ sockets, a real Prometheus."""
