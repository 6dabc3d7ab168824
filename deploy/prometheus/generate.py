"""Prometheus recording and alerting rules for kvcache-exporter, as code (a mixin in Python).

``python deploy/prometheus/generate.py`` writes, next to this file:

- ``prometheus_rules.yaml``: the recording rules (rates, ratios, quantiles) the dashboards and
  the alerts use;
- ``prometheus_alerts.yaml``: the alerting rules, each with ``severity``, ``summary``,
  ``description`` and a ``runbook_url`` into ``docs/runbooks.md``;
- ``kube-prometheus/prometheusrule.yaml``: both, as one ``PrometheusRule`` object for the
  Prometheus Operator (kube-prometheus, kube-prometheus-stack), with a ``kustomization.yaml``.

The committed files are what this script writes with its defaults;
``tests/test_prometheus_rules.py`` regenerates them and compares byte for byte. To adapt the
rules to a site, change :class:`Config` (or pass ``--job-selector`` / ``--runbook-base``) and
regenerate into your own folder with ``--out``. Every threshold, window and ``for`` duration is
a field of :class:`Config`; ``docs/runbooks.md`` says why each default is what it is.

Every recording rule keeps all labels of its input but the ones it aggregates away (``le``,
``reason``, ``group``), so the target labels a Prometheus adds (``job``, ``instance``;
``namespace``, ``pod`` … under the Operator) stay on the result, and alerts say which pod to
look at.

The name's level says what a series is per. ``engine_medium:…`` is one medium of one engine:
its *pool*. The exporter counts block-level families per KV-cache ``group`` as well
(hybrid-attention models run a sliding-window and a full-attention group in one pool), and
these rules sum the groups away, since the groups of a medium share its memory: rates, ratios
and quantiles of the pool, compared with each other and with the pool-level what-if families.
``engine_medium_group:…`` keeps the group, for the lifecycle quantiles only: a pooled quantile
is a mixture weighted by how many blocks each group stores (in vLLM 0.33's hybrid stream,
``tests/fixtures/streams``, the full-attention group stores about six times as many as the
sliding-window group), so it follows the biggest group and can hide a change of another; and
the groups' distributions may differ by design. ``pool_medium:…`` is one medium of a fleet
pool (the ``pool`` label: the engines one router chooses between, docs/pools.md), engines
summed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvcache_exporter.catalog import FAMILIES, Buckets
from kvcache_exporter.thresholds import (
    LIFETIME_COLLAPSE_RATIO,
    STORM_FACTOR,
    STORM_MIN_RATE,
    THRASH_CRITICAL_RATIO,
    THRASH_RATIO,
)

HERE = Path(__file__).resolve().parent

RULES_FILE = "prometheus_rules.yaml"
ALERTS_FILE = "prometheus_alerts.yaml"
OPERATOR_FILE = "kube-prometheus/prometheusrule.yaml"
KUSTOMIZATION_FILE = "kube-prometheus/kustomization.yaml"

QUANTILES: tuple[str, ...] = ("0.5", "0.9", "0.99")
"""Quantiles recorded for every lifecycle histogram (the dashboards' p50 / p90 / p99)."""

HISTOGRAMS: tuple[str, ...] = tuple(
    f.name for f in FAMILIES if f.buckets in (Buckets.DURATION, Buckets.ACCESS_COUNT)
)
"""Lifecycle histograms whose quantiles are recorded, per pool and per group."""

Rule = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """What a site may want to change. Defaults are the committed files."""

    job_selector: str = 'job=~".*kvcache-exporter.*"'
    """Selects the exporter's scrape jobs: ``KVCacheExporterAbsent`` needs it, and
    ``KVCacheExporterDown`` uses it besides recognising any target that served
    ``kvcache_exporter_build_info`` within the last hour."""
    runbook_base: str = (
        "https://github.com/kvcache-exporter/kvcache-exporter/blob/main/docs/runbooks.md"
    )
    """Where ``docs/runbooks.md`` is published; each alert links to its section (``#name``)."""

    # The warning and critical restore ratios: the exporter's own thrashing levels, which the
    # dashboards colour by as well.
    thrash_ratio: float = THRASH_RATIO
    thrash_critical_ratio: float = THRASH_CRITICAL_RATIO
    thrash_min_store_rate: float = 1.0
    """Stores/s the restore ratio needs before it means anything."""
    thrash_for: str = "10m"
    reset_quiet: str = "15m"
    """Thrashing is not judged within this long after a clear or an engine restart: storing
    again what a reset removed counts as restores, but it is not thrashing."""

    storm_factor: float = STORM_FACTOR
    storm_min_rate: float = STORM_MIN_RATE
    storm_baseline: str = "1h"
    storm_for: str = "5m"

    collapse_factor: float = LIFETIME_COLLAPSE_RATIO
    collapse_baseline: str = "1h"
    collapse_for: str = "10m"

    exporter_down_for: str = "5m"
    exporter_absent_for: str = "15m"
    source_down_for: str = "5m"
    loss_window: str = "10m"
    decode_errors_for: str = "10m"
    handshake_window: str = "15m"
    handshake_closed_min: int = 10
    """Hang-ups mid-handshake in the window before they count: a peer that is not ZeroMQ (a
    port scan) shows as one; a CURVE engine refusing the exporter's key, every few seconds."""
    stall_window: str = "10m"
    stall_history: str = "1h"
    stall_for: str = "5m"
    lag_seconds: float = 30.0
    lag_for: str = "10m"


# --- recording rules -----------------------------------------------------------------------------
POOL = "engine_medium"
"""Level of the pool-level series: per engine and medium, KV-cache groups summed."""
PER_GROUP = "engine_medium_group"
"""Level of the per-group series: per engine, medium and KV-cache group."""
FLEET = "pool_medium"
"""Level of the fleet series: per pool of engines (the ``pool`` label) and medium."""


def rate_name(metric: str) -> str:
    """The recorded 5-minute rate of a counter family (``_total`` dropped, by convention)."""
    return f"{POOL}:{metric.removesuffix('_total')}:rate5m"


def pool_rate(metric: str, matchers: str = "", without: Sequence[str] = ()) -> str:
    """The 5-minute rate of a block-level counter, summed over the groups of each pool (and
    over the labels in ``without``)."""
    labels = ", ".join(("group", *without))
    return f"sum without ({labels}) (rate({metric}{matchers}[5m]))"


STORED = rate_name("kvcache_blocks_stored_total")
RESTORES = rate_name("kvcache_block_restores_total")
ACCESSED = rate_name("kvcache_blocks_accessed_total")
EVICTED = f"{POOL}:kvcache_blocks_evicted:rate5m"
RESTORE_RATIO = f"{POOL}:kvcache_block_restore_ratio:ratio_rate5m"
HIT_RATIO = f"{POOL}:kvcache_block_hit_ratio:ratio_rate5m"
ELSEWHERE_RATIO = f"{FLEET}:kvcache_pool_stores_resident_elsewhere:ratio_rate5m"


def quantile_name(histogram: str, level: str = POOL) -> str:
    """The recorded quantiles of a histogram (one series per ``quantile`` label value), per
    pool or (``level=PER_GROUP``) per KV-cache group."""
    return f"{level}:{histogram}:histogram_quantile5m"


def recording_rules() -> list[Rule]:
    """Rates, ratios and quantiles, in dependency order (a group evaluates top to bottom)."""
    rules: list[Rule] = [
        {"record": STORED, "expr": pool_rate("kvcache_blocks_stored_total")},
        {"record": RESTORES, "expr": pool_rate("kvcache_block_restores_total")},
        {"record": ACCESSED, "expr": pool_rate("kvcache_blocks_accessed_total")},
        {
            "record": EVICTED,
            "expr": pool_rate(
                "kvcache_blocks_removed_total", '{reason="evicted"}', without=("reason",)
            ),
        },
        # Restores / stores: the share of stores that recomputed something the cache once held.
        # No stores, no ratio (rather than NaN).
        {"record": RESTORE_RATIO, "expr": f"{RESTORES} / ({STORED} > 0)"},
        # Hits / (hits + stores), only for pools that have reported at least one access:
        # an engine that does not report hits (vLLM by default) has no hit rate, not 0%. The
        # counter is summed over the groups too, so both sides of `and` are per pool.
        {
            "record": HIT_RATIO,
            "expr": (
                f"{ACCESSED} / ({ACCESSED} + {STORED} > 0)\nand\n"
                "sum without (group) (kvcache_blocks_accessed_total) > 0"
            ),
        },
        # Stores of keys another engine of the pool held / the pool's stores: recomputation a
        # KV-aware router could have avoided (an upper bound, docs/pools.md).
        {
            "record": ELSEWHERE_RATIO,
            "expr": (
                "sum without (engine) "
                "(rate(kvcache_pool_stores_resident_elsewhere_total[5m]))\n"
                "/\n(sum without (engine) (rate(kvcache_pool_stores_total[5m])) > 0)"
            ),
        },
    ]
    for level, buckets in (
        (POOL, "sum without (group) (rate({histogram}_bucket[5m]))"),
        (PER_GROUP, "rate({histogram}_bucket[5m])"),
    ):
        for histogram in HISTOGRAMS:
            for q in QUANTILES:
                rules.append(
                    {
                        "record": quantile_name(histogram, level),
                        # ">= 0" drops the NaN of a window without observations.
                        "expr": f"histogram_quantile({q}, "
                        f"{buckets.format(histogram=histogram)}) >= 0",
                        "labels": {"quantile": q},
                    }
                )
    return rules


# --- alerting rules ------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    """A threshold as PromQL writes it (no trailing .0)."""
    return f"{value:g}"


def _alert(
    config: Config,
    name: str,
    expr: str,
    duration: str,
    severity: str,
    summary: str,
    description: str,
) -> Rule:
    rule: Rule = {"alert": name, "expr": expr}
    if duration != "0m":
        rule["for"] = duration
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {
        "summary": summary,
        "description": description,
        "runbook_url": f"{config.runbook_base}#{name.lower()}",
    }
    return rule


HANDSHAKE_FAILURES = "kvcache_exporter_handshake_failures_total"
WHERE = "{{ $labels.engine }} ({{ $labels.medium }}) on {{ $labels.instance }}"
WHERE_GROUP = (
    "{{ $labels.engine }} ({{ $labels.medium }}, group {{ $labels.group }}) "
    "on {{ $labels.instance }}"
)
ENGINE_AT = "{{ $labels.engine }} on {{ $labels.instance }}"


def cache_alerts(config: Config) -> list[Rule]:
    """Alerts on what the KV cache does: thrashing, eviction storms, collapsing residency.

    Thrashing and storms are judged per pool (engine and medium): the groups of a medium share
    its memory, and their stores and evictions add up. Residency is judged per KV-cache group:
    the pool's median follows the group that stores the most blocks, so it would move little
    when a smaller group's lifetimes collapse, and each group is compared with its own past.
    """
    reset = (
        "unless on (job, instance, engine)\n"
        f"(\n  increase(kvcache_cache_clears_total[{config.reset_quiet}]) > 0\n"
        f"  or increase(kvcache_exporter_engine_restarts_total[{config.reset_quiet}]) > 0\n)"
    )

    def thrashing(ratio: float, severity: str) -> Rule:
        return _alert(
            config,
            "KVCacheThrashing",
            f"(\n  {RESTORE_RATIO} >= {_fmt(ratio)}\n"
            f"  and {STORED} >= {_fmt(config.thrash_min_store_rate)}\n)\n{reset}",
            config.thrash_for,
            severity,
            f"KV cache thrashing: {{{{ $value | humanizePercentage }}}} of stores are "
            f"recomputation ({WHERE})",
            "Over the last 5 minutes {{ $value | humanizePercentage }} of the blocks stored on "
            f"{WHERE} were blocks the cache had held and evicted before (restores): the "
            "prefix cache is too small for the working set, so prefill work is being done "
            f"again. Threshold: {_fmt(ratio * 100)}%.",
        )

    # The baseline ends where the 5-minute short window starts, so a storm cannot raise its
    # own baseline, and it must have evictions throughout: a cache that has just filled up
    # and starts evicting is not a storm.
    storm_window = f"{EVICTED}[{config.storm_baseline}] offset 5m"
    collapse_q = f'{quantile_name("kvcache_block_lifetime_seconds", PER_GROUP)}{{quantile="0.5"}}'
    return [
        thrashing(config.thrash_ratio, "warning"),
        thrashing(config.thrash_critical_ratio, "critical"),
        _alert(
            config,
            "KVCacheEvictionStorm",
            f"{EVICTED} >= {_fmt(config.storm_min_rate)}\n"
            f"and {EVICTED} >= {_fmt(config.storm_factor)} * avg_over_time({storm_window})\n"
            f"and min_over_time({storm_window}) > 0",
            config.storm_for,
            "warning",
            f"KV cache eviction storm: {{{{ $value | humanize }}}} blocks/s evicted ({WHERE})",
            f"{WHERE} evicts {{{{ $value | humanize }}}} blocks/s over the last 5 minutes, at "
            f"least {_fmt(config.storm_factor)}x its average over the {config.storm_baseline} "
            "before. Something displaced the cache: a burst of long or unique prompts, "
            "preemptions, or less KV memory than before.",
        ),
        _alert(
            config,
            "KVCacheResidencyCollapse",
            f"{collapse_q}\n  <= {_fmt(config.collapse_factor)} * avg_over_time("
            f"{collapse_q}[{config.collapse_baseline}] offset 10m)",
            config.collapse_for,
            "warning",
            "KV cache residency collapsed: median block lifetime "
            f"{{{{ $value | humanizeDuration }}}} ({WHERE_GROUP})",
            f"The median lifetime of evicted blocks on {WHERE_GROUP} fell to {{{{ $value | "
            f"humanizeDuration }}}}, at most {_fmt(config.collapse_factor * 100)}% of that "
            f"group's average over the {config.collapse_baseline} before: blocks are evicted "
            "long before a follow-up request can reuse them.",
        ),
    ]


def exporter_alerts(config: Config) -> list[Rule]:
    """Alerts on the exporter and its event streams."""
    return [
        _alert(
            config,
            "KVCacheExporterDown",
            f"up{{{config.job_selector}}} == 0\n"
            "or (\n"
            "  up == 0\n"
            "  and on (job, instance)\n"
            "  max_over_time(kvcache_exporter_build_info[1h]) == 1\n"
            ")",
            config.exporter_down_for,
            "warning",
            "kvcache-exporter {{ $labels.instance }} cannot be scraped",
            "Prometheus has failed to scrape the kvcache-exporter at {{ $labels.instance }} "
            f"(job {{{{ $labels.job }}}}) for {config.exporter_down_for}: its KV-cache metrics "
            "and alerts are blind.",
        ),
        _alert(
            config,
            "KVCacheExporterAbsent",
            f"absent(up{{{config.job_selector}}})",
            config.exporter_absent_for,
            "warning",
            "No kvcache-exporter target is discovered",
            f"Prometheus has no scrape target matching {{{config.job_selector}}}: the "
            "exporter is not deployed, or service discovery (ServiceMonitor, PodMonitor, "
            "scrape config) no longer finds it.",
        ),
        _alert(
            config,
            "KVCacheSourceDown",
            "kvcache_exporter_source_up == 0",
            config.source_down_for,
            "warning",
            f"kvcache-exporter has no connection to engine {ENGINE_AT}",
            f"The event stream of {ENGINE_AT} has had no live ZeroMQ connection for "
            f"{config.source_down_for}: the engine is down, restarting, or publishes somewhere "
            "else.",
        ),
        _alert(
            config,
            "KVCacheEventsLost",
            f"increase(kvcache_exporter_batches_lost_total[{config.loss_window}]) > 0",
            "0m",
            "warning",
            f"KV events lost from {ENGINE_AT}",
            f"About {{{{ $value | humanize }}}} event batches from {ENGINE_AT} were lost in "
            f"the last {config.loss_window} (sequence gaps not recovered by replay): counters "
            "undercount and residency may be wrong until the blocks concerned are evicted.",
        ),
        _alert(
            config,
            "KVCacheDecodeErrors",
            "rate(kvcache_exporter_decode_errors_total[5m]) > 0",
            config.decode_errors_for,
            "warning",
            f"kvcache-exporter cannot read messages from {ENGINE_AT} ({{{{ $labels.reason }}}})",
            f'{{{{ printf "%.3g" $value }}}} messages or events/s from {ENGINE_AT} fail to decode '
            f"with reason {{{{ $labels.reason }}}}, continuously for {config.decode_errors_for}: "
            "usually an engine version whose event schema this exporter does not know.",
        ),
        _alert(
            config,
            "KVCacheHandshakeFailures",
            f'increase({HANDSHAKE_FAILURES}{{reason!="closed"}}[{config.handshake_window}]) > 0\n'
            f'or increase({HANDSHAKE_FAILURES}{{reason="closed"}}[{config.handshake_window}])'
            f" > {config.handshake_closed_min}",
            "0m",
            "warning",
            f"A publisher to {ENGINE_AT} is refused ({{{{ $labels.reason }}}})",
            f"{{{{ $value | humanize }}}} ZeroMQ handshakes with publishers on {ENGINE_AT} "
            f"failed with reason {{{{ $labels.reason }}}} in the last {config.handshake_window}:"
            " nothing such a publisher sends is read. Usually a CURVE key that does not match "
            "(curve.engine-key, curve.allow), or CURVE set on one side only; if no engine "
            "should connect there, someone else is trying to.",
        ),
        _alert(
            config,
            "KVCacheEventStreamStalled",
            f"increase(kvcache_exporter_messages_total[{config.stall_window}]) == 0\n"
            f"and increase(kvcache_exporter_messages_total[{config.stall_history}]) > 0\n"
            "and kvcache_exporter_source_up == 1",
            config.stall_for,
            "warning",
            f"No KV events from {ENGINE_AT} although it is connected",
            f"{ENGINE_AT} is connected but has sent no event for {config.stall_window} after "
            f"sending some in the {config.stall_history} before. An engine that serves traffic "
            "stores and evicts blocks all the time; silence means it is idle, stuck, or "
            "publishing on another topic or port.",
        ),
        _alert(
            config,
            "KVCacheExporterLagging",
            f"kvcache_exporter_event_lag_seconds > {_fmt(config.lag_seconds)}",
            config.lag_for,
            "warning",
            f"kvcache-exporter reads events from {ENGINE_AT} "
            "{{ $value | humanizeDuration }} late",
            f"The newest batch from {ENGINE_AT} arrived {{{{ $value | humanizeDuration }}}} "
            "after the engine stamped it: the exporter cannot keep up, or the engine's and the "
            "exporter's clocks disagree.",
        ),
    ]


def groups(config: Config) -> dict[str, list[dict[str, Any]]]:
    """Rule groups by output file (the group ``interval`` is left to Prometheus' global
    ``evaluation_interval``)."""
    return {
        RULES_FILE: [{"name": "kvcache-exporter.rules", "rules": recording_rules()}],
        ALERTS_FILE: [
            {"name": "kvcache-exporter.cache", "rules": cache_alerts(config)},
            {"name": "kvcache-exporter.exporter", "rules": exporter_alerts(config)},
        ],
    }


# --- output --------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Block style, indented sequences, multi-line strings as literal blocks, no aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump(document: Any) -> str:
    """YAML as committed: insertion order, 2-space indent, no line folding."""
    text: str = yaml.dump(
        document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000
    )
    return text


HEADER = (
    "# Generated by deploy/prometheus/generate.py -- edit that file and regenerate.\n"
    "# kvcache-exporter {what}; see docs/dashboards.md and docs/runbooks.md.\n"
)


def render(config: Config | None = None) -> dict[str, str]:
    """Every output file's text, by path relative to this folder."""
    config = config or Config()
    out: dict[str, str] = {}
    by_file = groups(config)
    out[RULES_FILE] = HEADER.format(what="recording rules") + dump({"groups": by_file[RULES_FILE]})
    out[ALERTS_FILE] = HEADER.format(what="alerting rules") + dump({"groups": by_file[ALERTS_FILE]})
    operator = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "kvcache-exporter",
            "labels": {
                "app.kubernetes.io/name": "kvcache-exporter",
                "app.kubernetes.io/component": "monitoring",
                "prometheus": "k8s",
                "role": "alert-rules",
            },
        },
        "spec": {"groups": by_file[RULES_FILE] + by_file[ALERTS_FILE]},
    }
    out[OPERATOR_FILE] = HEADER.format(what="rules for the Prometheus Operator") + dump(operator)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [Path(OPERATOR_FILE).name],
    }
    out[KUSTOMIZATION_FILE] = HEADER.format(what="rules: kubectl apply -k") + dump(kustomization)
    return out


def write(out_dir: Path, config: Config | None = None) -> list[Path]:
    """Writes every file under ``out_dir``; the paths written."""
    written = []
    for name, text in render(config).items():
        path = out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write (default: here)")
    parser.add_argument("--job-selector", default=Config.job_selector, help="PromQL matchers")
    parser.add_argument("--runbook-base", default=Config.runbook_base, help="runbooks URL")
    args = parser.parse_args(argv)
    config = Config(job_selector=args.job_selector, runbook_base=args.runbook_base)
    for path in write(args.out, config):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
