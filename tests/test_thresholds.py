"""The alert levels of ``kvcache_exporter.thresholds``: the exporter's thrashing alert, the
Prometheus rules and the dashboards all take theirs from it, and importing it is free."""

from __future__ import annotations

from grafana.overview import THRASH

from kvcache_exporter.analysis.anomaly import AnomalyConfig
from kvcache_exporter.thresholds import (
    LIFETIME_COLLAPSE_RATIO,
    STORM_FACTOR,
    STORM_MIN_RATE,
    THRASH_CRITICAL_RATIO,
    THRASH_RATIO,
)

from .test_layers import loaded_by, top
from .test_prometheus_rules import load_generator


def test_the_detector_the_rules_and_the_dashboards_share_the_thrashing_levels() -> None:
    # The committed rules and dashboards are the generators' output (test_prometheus_rules.py,
    # test_grafana.py), so the generators' defaults are what is deployed.
    levels = (THRASH_RATIO, THRASH_CRITICAL_RATIO)
    detector = AnomalyConfig()
    assert (detector.thrash_ratio, detector.thrash_critical_ratio) == levels
    rules = load_generator().Config()
    assert (rules.thrash_ratio, rules.thrash_critical_ratio) == levels
    assert tuple(value for value, _ in THRASH[1:]) == levels


def test_the_detector_and_the_rules_share_the_storm_and_collapse_levels() -> None:
    detector, rules = AnomalyConfig(), load_generator().Config()
    assert detector.storm_factor == rules.storm_factor == STORM_FACTOR
    assert detector.storm_min_rate == rules.storm_min_rate == STORM_MIN_RATE
    assert detector.residency_ratio == rules.collapse_factor == LIFETIME_COLLAPSE_RATIO


def test_the_thresholds_load_nothing_else() -> None:
    """The rule and dashboard generators import it: it must not pull in the exporter."""
    modules = loaded_by("import kvcache_exporter.thresholds")
    assert top(modules, "kvcache_exporter") == {"kvcache_exporter", "kvcache_exporter.thresholds"}
    assert not top(modules, "numpy")
