"""The status page at ``/``: the status document as HTML, charts drawn as SVG by the server.

Everything is in the one response (styles and script are package files inlined into it), so
the page needs no other request and no network to render; with JavaScript off it is a static
snapshot. With JavaScript on, ``static/status.js`` refreshes it from ``/api/v1/status``.

Every number shown sits in an element with ``data-key`` (what the script updates), its exact
``data-value`` and, for numbers ``/metrics`` also serves, ``data-metric`` and ``data-labels``.
"""

from __future__ import annotations

import json
import time
from functools import cache
from html import escape
from importlib import resources
from typing import Any, Final

from ... import __version__
from .document import Figure
from .svg import render

MEDIUM_FIGURES: Final = {
    "resident_blocks": "Resident",
    "capacity_blocks": "Capacity",
    "stored_per_second": "Stored (last 10 s)",
    "removed_per_second": "Removed (last 10 s)",
    "restores_per_second": "Restores (last 10 s)",
    "restore_ratio": "Restore ratio (all time)",
    "stored_total": "Stored",
    "removed_total": "Removed",
    "restores_total": "Restores",
    "lifetime_count": "Lifetimes seen",
    "lifetime_p50_seconds": "Median lifetime",
    "idle_before_evict_count": "Idle times seen",
    "idle_before_evict_p50_seconds": "Median idle before evict",
}
HEALTH_FIGURES: Final = {
    "source_up": "Source",
    "event_lag_seconds": "Event lag",
    "messages_total": "Messages",
    "batches_lost_total": "Batches lost",
    "sequence_gaps_total": "Sequence gaps",
    "decode_errors_total": "Decode errors",
}
SEVERITY_MARKS: Final = {"critical": "■ critical", "warning": "▲ warning", "info": "● info"}


@cache
def _static(name: str) -> str:
    return resources.files(__package__).joinpath("static", name).read_text(encoding="utf-8")


def _value(value: Any) -> str:
    return "" if value is None else escape(repr(value) if isinstance(value, float) else str(value))


def _data(key: str, fig: Figure | dict[str, Any]) -> str:
    """The data attributes of an element showing a number."""
    attrs = f' data-key="{escape(key)}" data-value="{_value(fig["value"])}"'
    if "metric" in fig:
        labels = escape(json.dumps(fig["labels"], sort_keys=True))
        attrs += f' data-metric="{escape(fig["metric"])}" data-labels="{labels}"'
    return attrs


def _figures(prefix: str, figures: dict[str, Figure], names: dict[str, str]) -> str:
    items = []
    for name, title in names.items():
        fig = figures[name]
        unit = f'<span class="unit">{escape(fig["unit"])}</span>' if fig["unit"] else ""
        items.append(
            f"<div><dt>{escape(title)}</dt><dd{_data(prefix + name, fig)}>"
            f'<span class="v">{escape(fig["text"])}</span>{unit}</dd></div>'
        )
    return f'<dl class="figures">{"".join(items)}</dl>'


def _alerts(engine: dict[str, Any]) -> str:
    if not engine["alerts"]:
        return '<p class="none">No active alerts.</p>'
    items = []
    for alert in engine["alerts"]:
        key = f"{engine['engine']}|!{alert['alert']}"
        data = _data(key, {"value": 1, "metric": alert["metric"], "labels": alert["labels"]})
        items.append(
            f'<li class="{escape(alert["severity"])}"{data}>'
            f'<span class="sev">{escape(SEVERITY_MARKS.get(alert["severity"], alert["severity"]))}'
            f'</span><b>{escape(alert["alert"])}</b>: <span class="v">{escape(alert["message"])}'
            "</span></li>"
        )
    return f'<ul class="alerts">{"".join(items)}</ul>'


def _whatif_table(prefix: str, medium: dict[str, Any]) -> str:
    whatif = medium["whatif"]
    if whatif is None:
        return ""
    rows = []
    for point in whatif["points"]:
        factor = point["capacity_factor"]
        avoided = medium["figures"][f"recomputes_avoided:{factor}"]
        saved = medium["figures"][f"recompute_saved_ratio:{factor}"]
        blocks = point["capacity_blocks"]
        rows.append(
            f"<tr><td>{escape(factor)}\u00d7</td>"
            f"<td>{'—' if blocks is None else f'{blocks:,}'}</td>"
            f"<td{_data(f'{prefix}recomputes_avoided:{factor}', avoided)}>"
            f'<span class="v">{escape(avoided["text"])}</span></td>'
            f"<td{_data(f'{prefix}recompute_saved_ratio:{factor}', saved)}>"
            f'<span class="v">{escape(saved["text"])}</span></td></tr>'
        )
    return (
        '<table class="whatif"><caption>What-if: recomputation a larger cache would have '
        "avoided</caption><thead><tr><th>size</th><th>blocks</th><th>restores avoided</th>"
        f"<th>of stores</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _medium(engine: str, medium: dict[str, Any]) -> str:
    prefix = f"{engine}|{medium['medium']}|"
    groups = ", ".join(medium["groups"])
    charts = "".join(render(chart) for chart in medium["charts"])
    return (
        f'<section class="card medium"><h3>{escape(engine)} · {escape(medium["medium"])} '
        f'<small class="sub">KV-cache groups: {escape(groups)}</small></h3>'
        f"{_figures(prefix, medium['figures'], MEDIUM_FIGURES)}"
        f'<div class="charts">{charts}</div>{_whatif_table(prefix, medium)}</section>'
    )


def _engine(engine: dict[str, Any]) -> str:
    name = engine["engine"]
    media = "".join(_medium(name, medium) for medium in engine["media"])
    if not media:
        media = '<p class="none">No blocks seen yet.</p>'
    return (
        f'<section class="engine"><h2>Engine {escape(name)}</h2><div class="panels">'
        f'<div class="card"><h3>Exporter health</h3>'
        f"{_figures(f'{name}||', engine['health'], HEALTH_FIGURES)}</div>"
        f'<div class="card"><h3>Active alerts</h3>{_alerts(engine)}</div></div>{media}</section>'
    )


def render_page(document: dict[str, Any], links: str) -> str:
    """The whole page for a status document; ``links`` (HTML) lists the other endpoints."""
    engines = "".join(_engine(engine) for engine in document["engines"])
    if not engines:
        engines = '<p class="none">No sources configured.</p>'
    refresh = document["refresh_seconds"]
    stamp = time.strftime("%H:%M:%S UTC", time.gmtime(document["generated_at"]))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>kvcache-exporter status</title><style>{_static('status.css')}</style></head>"
        f"<body><header><h1>kvcache-exporter {escape(__version__)}</h1>"
        '<p class="sub">KV-cache status at <time id="generated" '
        f'data-value="{_value(document["generated_at"])}">{stamp}</time>; refreshes every '
        f"{refresh} s <noscript>(JavaScript is off: this is a snapshot, reload for a new one)"
        "</noscript></p></header>"
        f'<main id="status" data-refresh="{refresh}" '
        f'data-layout="{escape(document["layout"])}">{engines}</main>'
        f'<section class="links"><h2>Endpoints</h2>{links}</section>'
        f"<script>{_static('status.js')}</script></body></html>"
    )
