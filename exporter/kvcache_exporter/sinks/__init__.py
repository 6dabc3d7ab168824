"""Outputs: Prometheus exposition, the HTTP server and its JSON API."""
