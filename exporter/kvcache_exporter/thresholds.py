"""Alert thresholds that the exporter's own detector, the Prometheus alerting rules and the
Grafana dashboards share, so that all three call the same pool thrashing, eviction storm and
lifetime collapse.

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
STORM_FACTOR: Final = 4.0
"""An eviction storm: the short-window eviction rate at least this multiple of its baseline
(the ``eviction_storm`` alert's warning level and ``KVCacheEvictionStorm``)."""
STORM_MIN_RATE: Final = 50.0
"""Evictions/s a storm must also reach: a 10x jump from 1/s is not a storm."""
LIFETIME_COLLAPSE_RATIO: Final = 0.25
"""Median block lifetime at most this fraction of its baseline: lifetimes have collapsed (the
``short_residency`` alert's warning level and ``KVCacheResidencyCollapse``)."""
