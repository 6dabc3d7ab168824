"""A chart layout (:mod:`.charts`) as SVG markup: the server's renderer.

``static/status.js`` draws the same layouts into the same elements in the browser; both
write one element per primitive, with the same attributes.
"""

from __future__ import annotations

from html import escape

from .charts import Chart


def render(chart: Chart) -> str:
    """The ``<svg>`` element of a chart; ``data-points`` is how many data points it plots."""
    cid = escape(chart["id"])
    out = [
        f'<svg class="chart" id="{cid}" viewBox="0 0 {chart["width"]} {chart["height"]}" '
        f'role="img" aria-labelledby="{cid}-t {cid}-d" data-points="{chart["points"]}">'
        f'<title id="{cid}-t">{escape(chart["title"])}</title>'
        f'<desc id="{cid}-d">{escape(chart["desc"])}</desc>'
    ]
    for item in chart["items"]:
        kind, classes = item["t"], escape(item["c"])
        if kind == "path":
            out.append(f'<path class="{classes}" d="{item["d"]}"/>')
        elif kind == "rect":
            out.append(
                f'<rect class="{classes}" x="{item["x"]}" y="{item["y"]}" width="{item["w"]}" '
                f'height="{item["h"]}"><title>{escape(item["s"])}</title></rect>'
            )
        else:
            rotate = (
                f' transform="rotate({item["r"]} {item["x"]} {item["y"]})"' if "r" in item else ""
            )
            out.append(
                f'<text class="{classes}" x="{item["x"]}" y="{item["y"]}" '
                f'text-anchor="{item["a"]}"{rotate}>{escape(item["s"])}</text>'
            )
    out.append("</svg>")
    return "".join(out)
