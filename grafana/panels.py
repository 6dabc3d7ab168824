"""Building blocks the dashboards share: the data source, variables, selectors and panels.

Every panel helper takes a title, a description (what the panel means and what to do when it
looks wrong), a unit and its queries, so no panel can be made without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from grafana_foundation_sdk.builders import (
    bargauge,
    heatmap,
    stat,
    statetimeline,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model
from grafana_foundation_sdk.models import heatmap as heatmap_model
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
"""Every query goes to the data source the ``datasource`` variable selects."""

TARGET = 'job=~"$job", instance=~"$instance"'
"""Matchers for the exporter's scrape targets."""
ENGINE = f'{TARGET}, engine=~"$engine"'
"""Matchers for per-engine series."""
MEDIUM = f'{ENGINE}, medium=~"$medium"'
"""Matchers for per-engine, per-medium series: a medium's pool, all its KV-cache groups. The
``engine_medium:`` recording rules, the what-if and the adapter families have no ``group``
label, so they take these (a ``group`` matcher would select nothing of them)."""
PLACE = f'{MEDIUM}, group=~"$group"'
"""Matchers for raw block-level series, which carry the KV-cache ``group`` as well (and for
the ``engine_medium_group:`` recording rules)."""
GROUP = f'{ENGINE}, group=~"$group"'
"""Matchers for ``kvcache_group_info`` (per engine and group, no medium)."""

TAGS = ["kvcache-exporter", "kv-cache", "llm"]

# Units. Grafana's `count:<name>` custom unit scales like "short" (1.2K) and appends the name.
BLOCKS = "count:blocks"
BLOCKS_PER_S = "count:blocks/s"
SECONDS = "s"
RATIO = "percentunit"
NONE = "none"

GREEN, ORANGE, RED, BLUE, GREY = "green", "orange", "red", "blue", "text"


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel."""

    expr: str
    legend: str = ""
    instant: bool = False
    heatmap: bool = False
    table: bool = False


def _target(query: Query, ref_id: str) -> Dataquery:
    target = Dataquery().expr(query.expr).ref_id(ref_id).datasource(DATASOURCE)
    if query.legend:
        target = target.legend_format(query.legend)
    target = target.instant() if query.instant else target.range()
    if query.heatmap:
        target = target.format(PromQueryFormat.HEATMAP)
    if query.table:
        target = target.format(PromQueryFormat.TABLE)
    return target


def _targets(queries: Sequence[Query]) -> list[cogbuilder.Builder[cogvariants.Dataquery]]:
    if not queries:
        raise ValueError("a panel needs at least one query")
    return [_target(q, chr(ord("A") + i)) for i, q in enumerate(queries)]


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> dash.ThresholdsConfig:
    return (
        dash.ThresholdsConfig()
        .mode(model.ThresholdsMode.ABSOLUTE)
        .steps([model.Threshold(value=v, color=c) for v, c in steps])
    )


def _mappings(values: dict[str, tuple[str, str]]) -> list[model.ValueMapping]:
    """Value → (text, color) mappings."""
    options = {
        key: model.ValueMappingResult(text=text, color=color, index=i)
        for i, (key, (text, color)) in enumerate(values.items())
    }
    return [model.ValueMap(options=options)]


def _legend() -> common_builders.VizLegendOptions:
    return (
        common_builders.VizLegendOptions()
        .display_mode(common.LegendDisplayMode.LIST)
        .placement(common.LegendPlacement.BOTTOM)
        .show_legend(True)
    )


def _tooltip() -> common_builders.VizTooltipOptions:
    return (
        common_builders.VizTooltipOptions()
        .mode(common.TooltipDisplayMode.MULTI)
        .sort(common.SortOrder.DESCENDING)
    )


def row(title: str) -> dash.Row:
    return dash.Row(title)


_Panel = TypeVar(
    "_Panel",
    timeseries.Panel,
    stat.Panel,
    heatmap.Panel,
    statetimeline.Panel,
    bargauge.Panel,
    table.Panel,
)


def _common(
    panel: _Panel,
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    width: int,
    height: int,
) -> _Panel:
    """What every panel here sets the same way: text, unit, data source, queries and size."""
    return (
        panel.title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .targets(_targets(queries))
        .span(width)
        .height(height)
    )


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    width: int = 12,
    height: int = 8,
    thresholds: Sequence[tuple[float | None, str]] | None = None,
    minimum: float | None = 0,
    maximum: float | None = None,
    no_value: str | None = None,
) -> timeseries.Panel:
    """Lines over time; ``thresholds`` are drawn as dashed lines."""
    panel = (
        _common(timeseries.Panel(), title, description, unit, queries, width, height)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(_legend())
        .tooltip(_tooltip())
    )
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    if thresholds is not None:
        panel = panel.thresholds(_thresholds(thresholds)).thresholds_style(
            common_builders.GraphThresholdsStyleConfig().mode(
                common.GraphThresholdsStyleMode.DASHED
            )
        )
    if no_value is not None:
        panel = panel.no_value(no_value)
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    width: int = 4,
    height: int = 4,
    thresholds: Sequence[tuple[float | None, str]] = ((None, GREEN),),
    mappings: dict[str, tuple[str, str]] | None = None,
    no_value: str | None = None,
    graph: bool = True,
) -> stat.Panel:
    """Big numbers, one per series, colored by ``thresholds`` (or ``mappings``)."""
    panel = (
        _common(stat.Panel(), title, description, unit, queries, width, height)
        .thresholds(_thresholds(thresholds))
        .color_mode(common.BigValueColorMode.VALUE)
        .graph_mode(common.BigValueGraphMode.AREA if graph else common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.AUTO)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if mappings is not None:
        panel = panel.mappings(_mappings(mappings))
    if no_value is not None:
        panel = panel.no_value(no_value)
    return panel


def heatmap_panel(
    title: str,
    description: str,
    y_unit: str,
    cell_unit: str,
    query: Query,
    *,
    width: int = 12,
    height: int = 8,
) -> heatmap.Panel:
    """A Prometheus histogram's buckets over time (``query`` must be in heatmap format)."""
    if not query.heatmap:
        raise ValueError(f"{title}: a heatmap query needs heatmap format")
    return (
        _common(heatmap.Panel(), title, description, y_unit, [query], width, height)
        .calculate(False)
        .rows_frame(heatmap.RowsHeatmapOptions().layout(common.HeatmapCellLayout.LE))
        .y_axis(heatmap.YAxisConfig().unit(y_unit))
        .cell_values(heatmap.CellValues().unit(cell_unit))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(heatmap_model.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .scale(heatmap_model.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
            .fill("dark-orange")
            .reverse(False)
        )
        .filter_values(heatmap.FilterValueRange().le(1e-9))
        .show_value(common.VisibilityMode.NEVER)
        .mode(common.TooltipDisplayMode.SINGLE)
        .show_y_histogram()
        .show_legend()
    )


def state_timeline_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    mappings: dict[str, tuple[str, str]],
    *,
    width: int = 12,
    height: int = 8,
    no_value: str | None = None,
) -> statetimeline.Panel:
    """States over time, one lane per series; ``mappings`` name and color the states."""
    panel = (
        _common(statetimeline.Panel(), title, description, NONE, queries, width, height)
        .mappings(_mappings(mappings))
        .thresholds(_thresholds([(None, GREY)]))
        .show_value(common.VisibilityMode.NEVER)
        .merge_values(True)
        .fill_opacity(80)
        .legend(_legend())
    )
    if no_value is not None:
        panel = panel.no_value(no_value)
    return panel


def bargauge_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    width: int = 12,
    height: int = 8,
    no_value: str | None = None,
) -> bargauge.Panel:
    """Horizontal bars, one per series (or per bucket of a heatmap-format query)."""
    panel = (
        _common(bargauge.Panel(), title, description, unit, queries, width, height)
        .orientation(common.VizOrientation.HORIZONTAL)
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .value_mode(common.BarGaugeValueMode.COLOR)
        .show_unfilled(True)
        .thresholds(_thresholds([(None, BLUE)]))
        .min(0)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    if no_value is not None:
        panel = panel.no_value(no_value)
    return panel


def table_panel(
    title: str,
    description: str,
    query: Query,
    columns: Sequence[tuple[str, str]],
    *,
    width: int = 12,
    height: int = 8,
    no_value: str | None = None,
) -> table.Panel:
    """One row per series of an instant, table-format query: ``columns`` are its labels, in
    order, with their headers (aggregate the query ``by`` exactly them); the time and the
    value are hidden."""
    if not (query.instant and query.table):
        raise ValueError(f"{title}: a table query needs instant and table format")
    shown = [label for label, _ in columns]
    panel = (
        _common(table.Panel(), title, description, NONE, [query], width, height)
        .with_transformation(
            model.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value": True},
                    "indexByName": {label: i for i, label in enumerate(shown)},
                    "renameByName": dict(columns),
                },
            )
        )
        .show_header(True)
        .cell_height(common.TableCellHeight.SM)
    )
    if no_value is not None:
        panel = panel.no_value(no_value)
    return panel


# --- variables ---------------------------------------------------------------------------------
ALL = model.VariableOption(selected=True, text=["All"], value=["$__all"])


def datasource_variable() -> dash.DatasourceVariable:
    return (
        dash.DatasourceVariable("datasource")
        .label("Data source")
        .type("prometheus")
        .description("The Prometheus that scrapes kvcache-exporter.")
    )


def query_variable(name: str, label: str, query: str, description: str) -> dash.QueryVariable:
    """A multi-value variable from ``label_values(...)``, "All" by default.

    No custom all-value: "All" sends the list of values found, so a panel never reaches series
    of other jobs or instances (``scrape_duration_seconds`` exists for every target).
    """
    return (
        dash.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(DATASOURCE)
        .query(query)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .current(ALL)
    )


def job_variable() -> dash.QueryVariable:
    return query_variable(
        "job",
        "Job",
        "label_values(kvcache_exporter_build_info, job)",
        "Scrape jobs that have kvcache-exporter targets.",
    )


def instance_variable() -> dash.QueryVariable:
    return query_variable(
        "instance",
        "Instance",
        'label_values(kvcache_exporter_build_info{job=~"$job"}, instance)',
        "Exporter instances (one per engine pod when run as a sidecar).",
    )


def engine_variable() -> dash.QueryVariable:
    return query_variable(
        "engine",
        "Engine",
        f"label_values(kvcache_exporter_messages_total{{{TARGET}}}, engine)",
        "Engine sources, by the name given in --source NAME=ENDPOINT.",
    )


def medium_variable() -> dash.QueryVariable:
    return query_variable(
        "medium",
        "Medium",
        f"label_values(kvcache_resident_blocks{{{ENGINE}}}, medium)",
        "Cache tiers (GPU, CPU, ...) as the engine names them; 'unknown' when it sends none.",
    )


def group_variable() -> dash.QueryVariable:
    return query_variable(
        "group",
        "KV-cache group",
        f"label_values(kvcache_group_info{{{ENGINE}}}, group)",
        "KV-cache groups (kvcache_group_info): '0' for a model with one; hybrid-attention "
        "models (gpt-oss, Gemma 3) have a sliding-window and a full-attention group sharing "
        "one pool. Narrows the raw block-level panels and the per-group panels; the recorded "
        "pool-level ratios and quantiles always cover every group of a medium.",
    )


def alerts_annotation() -> dash.AnnotationQuery:
    """Marks the time ranges of firing kvcache alerts on every time series panel."""
    return (
        dash.AnnotationQuery()
        .name("kvcache alerts")
        .datasource(DATASOURCE)
        .enable(True)
        .icon_color("red")
        .expr('ALERTS{alertname=~"KVCache.*", alertstate="firing"}')
    )


def dashboard_links() -> dash.DashboardLink:
    """Links to every kvcache-exporter dashboard, keeping time range and variables."""
    return (
        dash.DashboardLink("kvcache-exporter")
        .type(model.DashboardLinkType.DASHBOARDS)
        .tags(["kvcache-exporter"])
        .as_dropdown(False)
        .include_vars(True)
        .keep_time(True)
        .target_blank(False)
        .icon("external link")
        .tooltip("")
        .url("")
    )


def number_panels(dashboard: model.Dashboard) -> model.Dashboard:
    """Gives every panel and row an id, in layout order (the SDK leaves them unset)."""
    for number, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number
    return dashboard
