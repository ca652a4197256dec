"""Charts over a report's rows: Vega-Lite specs rendered offline, SVG for the PDF and PNG for the email.

The renderer is chosen here and nowhere else: Vega-Lite through vl-convert-python, a wheel that
carries its own JavaScript engine and fonts support, needs no browser or network, and renders a chart
in tens of milliseconds once warm. A report declares simple charts (bar, line, area, pie) in
schedules.yaml, or gives a whole Vega-Lite spec; the rows are always put in by reporter.

A chart must never load anything: Vega would fetch a `data.url` (vl-convert reads even `file://`
URLs whatever its allow-list says), an image mark or an `href`. So a spec naming any of them is
refused when the config is loaded, and checked again right before rendering.
"""

from __future__ import annotations

import base64
import copy
import html as html_lib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from reporter.config import Chart
from reporter.errors import RenderError

FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
PNG_SCALE = 2
"""Pixels per CSS pixel of the email's PNG: sharp on high-density screens, still small."""

LEVEL_LABELS = 12
"""Up to this many categories along x, their labels are written level rather than turned."""

FORBIDDEN_KEYS = ("url", "href")
"""Keys through which Vega-Lite would load a resource or make a link, at any depth."""


def outside_references(spec: Any, path: str = "") -> Iterator[str]:
    """Where SPEC (a Vega-Lite spec without its data values) would load something: 'data.url', …"""
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            here = f"{path}.{key}" if path else str(key)
            if key in FORBIDDEN_KEYS:
                yield here
            elif key == "mark" and (value == "image" or (isinstance(value, Mapping) and value.get("type") == "image")):
                yield f"{here} (image marks load their pictures)"
            else:
                yield from outside_references(value, here)
    elif isinstance(spec, list):
        for index, item in enumerate(spec):
            yield from outside_references(item, f"{path}[{index}]")


@dataclass(frozen=True)
class RenderedChart:
    """A chart rendered both ways: SVG (vector, for the PDF) and PNG (for the email)."""

    name: str
    title: str
    svg: str
    png: bytes
    width: int
    height: int

    def data_uri(self) -> str:
        """The SVG as a data: URL, which the PDF renderer draws as vectors."""
        return "data:image/svg+xml;base64," + base64.b64encode(self.svg.encode("utf-8")).decode("ascii")


def content_id(report: str, name: str) -> str:
    """The Content-ID of chart NAME in REPORT's email (without angle brackets)."""
    return f"chart-{name}@{report}.reporter"


def spec_of(chart: Chart, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The Vega-Lite spec of CHART over ROWS."""
    if chart.vega_lite is not None:
        spec = copy.deepcopy(dict(chart.vega_lite))
        spec.pop("$schema", None)
    else:
        spec = _simple_spec(chart, rows)
    spec.setdefault("width", chart.width)
    spec.setdefault("height", chart.height)
    if chart.title and "title" not in spec:
        spec["title"] = chart.title
    config = spec.setdefault("config", {})
    config.setdefault("font", FONT)
    config.setdefault("background", "white")
    config.setdefault("view", {"stroke": None})
    spec["data"] = {"values": [{k: _json_value(v) for k, v in row.items()} for row in rows]}
    return spec


def _simple_spec(chart: Chart, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """bar, line, area or pie from the declared fields."""
    assert chart.type is not None and chart.x is not None and chart.y is not None  # the model requires them
    aggregate = None if chart.aggregate == "none" else chart.aggregate
    y_axis = {"format": chart.y_format} if chart.y_format else {}
    y: dict[str, Any] = {"field": chart.y, "type": "quantitative", "title": chart.y_title or chart.y, "axis": y_axis}
    if aggregate:
        y["aggregate"] = aggregate
    if chart.type == "pie":
        theta = {**y, "stack": True}
        theta.pop("axis")
        color = {"field": chart.x, "type": "nominal", "title": chart.x_title or chart.x}
        if chart.y_format:
            theta["format"] = chart.y_format
        return {"mark": {"type": "arc", "innerRadius": 0}, "encoding": {"theta": theta, "color": color}}
    x_type = chart.x_type or _x_type(chart.type, [row.get(chart.x) for row in rows])
    x: dict[str, Any] = {"field": chart.x, "type": x_type, "title": chart.x_title or chart.x}
    if chart.x_format:
        x["axis"] = {"format": chart.x_format, "formatType": "time" if "%" in chart.x_format else "number"}
    elif x_type in ("nominal", "ordinal") and len({row.get(chart.x) for row in rows}) <= LEVEL_LABELS:
        x["axis"] = {"labelAngle": 0}  # few labels: level, as people read them
    encoding: dict[str, Any] = {"x": x, "y": y}
    marks: dict[str, dict[str, Any]] = {
        "bar": {"type": "bar"},
        "line": {"type": "line", "point": True},
        "area": {"type": "area", "line": True},
    }
    mark = marks[chart.type]
    if chart.series:
        encoding["color"] = {"field": chart.series, "type": "nominal", "title": chart.series_title or chart.series}
        if chart.type in ("bar", "area"):
            y["stack"] = "zero" if chart.stack else None
            if chart.type == "bar" and not chart.stack:
                encoding["xOffset"] = {"field": chart.series}  # grouped bars, side by side
    return {"mark": mark, "encoding": encoding}


def _x_type(kind: str, values: Sequence[Any]) -> str:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, (date, datetime)) for v in present):
        return "temporal"
    if kind != "bar" and present and all(isinstance(v, (int, float, Decimal)) and not isinstance(v, bool) for v in present):
        return "quantitative"
    return "nominal" if kind == "bar" else "ordinal"


def _json_value(value: Any) -> Any:
    """A row value as Vega reads it: numbers as numbers, dates as ISO text, the rest as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return str(value)


def render(report: str, name: str, chart: Chart, rows: Sequence[Mapping[str, Any]]) -> RenderedChart:
    """Render chart NAME of REPORT over ROWS as SVG and PNG; RenderError if Vega-Lite refuses the spec."""
    import vl_convert  # a 100 MB engine: loaded on the first chart, never by `reporter validate`

    spec = spec_of(chart, rows)
    found = list(outside_references({k: v for k, v in spec.items() if k != "data"}))
    if found:  # validated when the config was loaded; checked again since nothing else stops a load
        raise RenderError(f"chart {name!r} of report {report!r} would load from outside ({', '.join(found)}); refused")
    try:
        svg = vl_convert.vegalite_to_svg(spec, allowed_base_urls=[])
        # The PNG from the SVG just drawn (the same bytes as vegalite_to_png): Vega runs once per chart, not
        # twice, and each Vega run grows the engine's memory for good (about 130 KiB a chart).
        png = vl_convert.svg_to_png(svg, scale=PNG_SCALE)
    except ValueError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1] if len(first) > 1 else (first[0] if first else "")
        raise RenderError(f"chart {name!r} of report {report!r}: Vega-Lite could not render it: {detail}") from None
    width, height = _png_size(png)
    return RenderedChart(name, chart.title or name, svg, png, width // PNG_SCALE, height // PNG_SCALE)


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) in pixels, from the PNG's IHDR chunk."""
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def img_tag(report: str, chart: RenderedChart) -> str:
    """The chart in the email's HTML: the inline PNG by Content-ID, at its CSS size, shrinking on phones."""
    alt = html_lib.escape(chart.title, quote=True)
    style = f"display:block;width:{chart.width}px;max-width:100%;height:auto;border:0;margin:8px 0 14px"
    return f'<img src="cid:{content_id(report, chart.name)}" alt="{alt}" width="{chart.width}" height="{chart.height}" style="{style}">'


def placeholder(kind: str, report: str, chart: RenderedChart) -> str:
    """What `{{ chart('name') }}` writes: the img tag in HTML, the title in the text part."""
    return img_tag(report, chart) if kind == "html" else f"[Chart: {chart.title}]"


def with_unplaced(html: str, report: str, charts: Sequence[RenderedChart], before: str) -> str:
    """HTML with the charts no template placed, just before BEFORE (the footer) or at the end."""
    missing = [c for c in charts if f"cid:{content_id(report, c.name)}" not in html]
    if not missing:
        return html
    block = "".join(img_tag(report, c) for c in missing)
    at = html.rfind(before) if before else -1
    return html[:at] + block + html[at:] if at >= 0 else html + block


def for_pdf(html: str, report: str, charts: Sequence[RenderedChart]) -> str:
    """HTML with each chart's Content-ID replaced by its SVG, so the PDF draws it as vectors."""
    for chart in charts:
        html = html.replace(f'src="cid:{content_id(report, chart.name)}"', f'src="{chart.data_uri()}"')
    return html
