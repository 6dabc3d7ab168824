"""Alert thresholds that the exporter's own detector, the Prometheus alerting rules and the
Grafana dashboards share, so that all three call the same pool thrashing.

The detector (:class:`~kvcache_exporter.analysis.anomaly.AnomalyConfig`), the rule generator
(``deploy/prometheus/generate.py``) and the dashboard generator (``grafana/``) take their
defaults from here. Like the catalog, this module imports nothing, so every layer and both
generators may import it without loading numpy, msgspec or ZeroMQ.
"""

from __future__ import annotations

from typing import Final

THRASH_RATIO: Final = 0.3
"""Restores / stores from which a pool is thrashing: the ``thrashing`` alert's and
``KVCacheThrashing``'s warning level, orange on the dashboards."""
THRASH_CRITICAL_RATIO: Final = 0.6
"""Restores / stores of the critical level, red on the dashboards."""
