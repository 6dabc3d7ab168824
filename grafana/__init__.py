"""Grafana dashboards for kvcache-exporter, as code (``grafana-foundation-sdk``).

``python -m grafana.generate`` (from the repository root) writes the dashboards' JSON into
``grafana/dashboards/`` and the provisioning files into ``grafana/provisioning/``; see
``docs/dashboards.md``.
"""
