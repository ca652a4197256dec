"""Charts: Vega-Lite specs from schedules.yaml, vector in the PDF, inline PNG in the email, nothing loaded."""

from __future__ import annotations

import email
import email.policy
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pypdf import PdfReader

from reporter import charts
from reporter.config import Chart, Config, load
from reporter.errors import ConfigError, RenderError
from reporter.mail import build
from reporter.render import Renderer
from tests.conftest import ROOT, Inbox, Project, run_cli
from tests.test_config import BASE, write_project
from tests.test_render import SLOT, custom_project, function_report, renderers, unique_module

__all__ = ["renderers"]  # the fixture, imported for the tests below

ROWS = [
    {"region": "North", "product": "Cups", "amount": 10.5},
    {"region": "North", "product": "Beans", "amount": 4.5},
    {"region": "South", "product": "Cups", "amount": 7.0},
]


# --------------------------------------------------------------------------- specs, pure


def chart(**fields: Any) -> Chart:
    return Chart.model_validate(fields)


def test_a_bar_chart_sums_y_per_x_with_titles_and_format() -> None:
    spec = charts.spec_of(chart(type="bar", title="Revenue", x="region", y="amount", y_title="EUR", y_format=",.2f"), ROWS)
    assert spec["mark"] == {"type": "bar"}
    assert spec["title"] == "Revenue"
    assert spec["encoding"]["x"] == {"field": "region", "type": "nominal", "title": "region", "axis": {"labelAngle": 0}}
    assert spec["encoding"]["y"] == {
        "field": "amount",
        "type": "quantitative",
        "title": "EUR",
        "axis": {"format": ",.2f"},
        "aggregate": "sum",
    }
    assert spec["data"] == {"values": ROWS}
    assert (spec["width"], spec["height"]) == (520, 220)


@pytest.mark.parametrize(
    ("fields", "stack", "offset"),
    [
        ({"type": "bar", "series": "product"}, "zero", False),
        ({"type": "bar", "series": "product", "stack": False}, None, True),
        ({"type": "area", "series": "product"}, "zero", False),
    ],
)
def test_series_are_coloured_and_stacked_or_side_by_side(fields: dict[str, Any], stack: str | None, offset: bool) -> None:
    spec = charts.spec_of(chart(x="region", y="amount", **fields), ROWS)
    assert spec["encoding"]["color"] == {"field": "product", "type": "nominal", "title": "product"}
    assert spec["encoding"]["y"]["stack"] == stack
    assert ("xOffset" in spec["encoding"]) is offset


def test_a_line_over_dates_is_temporal_and_a_pie_is_an_arc() -> None:
    from datetime import date

    rows = [{"day": date(2026, 11, d), "n": d} for d in (19, 20)]
    line = charts.spec_of(chart(type="line", x="day", y="n", aggregate="none"), rows)
    assert line["mark"] == {"type": "line", "point": True}
    assert line["encoding"]["x"]["type"] == "temporal" and "aggregate" not in line["encoding"]["y"]
    assert line["data"]["values"] == [{"day": "2026-11-19", "n": 19}, {"day": "2026-11-20", "n": 20}]
    pie = charts.spec_of(chart(type="pie", x="region", y="amount"), ROWS)
    assert pie["mark"]["type"] == "arc"
    assert pie["encoding"]["theta"]["aggregate"] == "sum" and pie["encoding"]["color"]["field"] == "region"


@pytest.mark.parametrize(
    ("spec", "found"),
    [
        ({"data": {"url": "file:///etc/passwd"}}, ["data.url"]),
        ({"layer": [{"mark": "bar"}, {"data": {"url": "http://169.254.169.254/"}}]}, ["layer[1].data.url"]),
        (
            {"transform": [{"lookup": "k", "from": {"data": {"url": "https://x.example/d.csv"}, "key": "k"}}]},
            ["transform[0].from.data.url"],
        ),
        ({"mark": "image", "encoding": {"url": {"field": "u"}}}, ["mark (image marks load their pictures)", "encoding.url"]),
        ({"mark": {"type": "image"}}, ["mark (image marks load their pictures)"]),
        ({"mark": "bar", "encoding": {"href": {"field": "link"}}}, ["encoding.href"]),
        ({"mark": "bar", "encoding": {"x": {"field": "url"}}}, []),  # a column called url is fine
    ],
)
def test_outside_references(spec: dict[str, Any], found: list[str]) -> None:
    assert list(charts.outside_references(spec)) == found


# --------------------------------------------------------------------------- refused at validate time


def chart_problems(tmp_path: Path, charts_yaml: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(write_project(tmp_path, BASE + "    charts:\n" + charts_yaml), {})
    return [str(p).replace(f"{tmp_path}/", "") for p in caught.value.problems]


def test_a_spec_that_loads_from_outside_is_refused_with_file_and_line(tmp_path: Path) -> None:
    found = chart_problems(
        tmp_path,
        "      ok:\n        type: bar\n        x: a\n        y: b\n"
        "      meta:\n        vega_lite:\n          mark: bar\n"
        "          transform: [{lookup: k, from: {data: {url: 'http://169.254.169.254/latest'}, key: k}}]\n"
        "      local:\n        vega_lite: {mark: bar, data: {url: 'file:///etc/passwd'}}\n",
    )
    assert found == [
        "schedules.yaml:13: reports.r1.charts.meta.vega_lite: would load from outside (transform[0].from.data.url); "
        "a chart may only show the report's rows",
        "schedules.yaml:17: reports.r1.charts.local.vega_lite: must not have 'data': reporter puts the report's rows in",
    ]


@pytest.mark.parametrize(
    ("charts_yaml", "problem"),
    [
        ("      c:\n        title: x\n", "schedules.yaml:8: reports.r1.charts.c: needs 'type' (bar, line, area or pie)"),
        ("      c:\n        type: bar\n        x: a\n", "schedules.yaml:8: reports.r1.charts.c: a bar chart needs 'y'"),
        ("      c:\n        type: donut\n        x: a\n        y: b\n", "schedules.yaml:9: reports.r1.charts.c.type: "),
        ("      c:\n        type: bar\n        x: a\n        y: b\n        y_format: '{x}'\n", "is not a d3 number format"),
        ("      c d:\n        type: bar\n        x: a\n        y: b\n", "schedules.yaml:8: reports.r1.charts.c d: a chart name may use"),
        ("      c:\n        type: bar\n        vega_lite: {mark: bar}\n", "give either 'type' (with x and y) or 'vega_lite', not both"),
    ],
)
def test_chart_declarations_are_checked(tmp_path: Path, charts_yaml: str, problem: str) -> None:
    found = chart_problems(tmp_path, charts_yaml)
    assert any(problem in p for p in found), found


# --------------------------------------------------------------------------- blocked at render


def test_a_spec_that_slipped_past_validation_is_still_refused_at_render() -> None:
    # model_construct skips validation, as a config built in code could.
    sneaky = Chart.model_construct(
        vega_lite={"mark": "bar", "transform": [{"lookup": "k", "from": {"data": {"url": "file:///etc/passwd"}}}]}
    )
    with pytest.raises(
        RenderError, match=r"chart 'leak' of report 'r' would load from outside \(transform\[0\]\.from\.data\.url\); refused"
    ):
        charts.render("r", "leak", sneaky, ROWS)


# --------------------------------------------------------------------------- what a recipient gets


def pdf_xobject_kinds(data: bytes) -> set[str]:
    """Subtypes of every XObject drawn on any page, nested ones included."""
    kinds: set[str] = set()

    def walk(resources: Any) -> None:
        xobjects = resources.get("/XObject") if resources else None
        for ref in (xobjects.get_object() if xobjects else {}).values():
            obj = ref.get_object()
            kinds.add(str(obj.get("/Subtype")))
            walk(obj.get("/Resources"))

    for page in PdfReader(io.BytesIO(data)).pages:
        walk(page.get("/Resources"))
    return kinds


@pytest.fixture
def shipped(tmp_path: Path) -> Config:
    return load(ROOT / "schedules.yaml", {**os.environ, "WAREHOUSE_URL": f"sqlite:///{tmp_path}/warehouse.db"})


@pytest.mark.slow
def test_shipped_sales_daily_has_a_vector_chart_in_the_pdf_and_an_inline_png_in_the_email(shipped: Config) -> None:
    renderer = Renderer(shipped)
    try:
        rendered = renderer.render("sales-daily", SLOT.replace(day=20, month=11, hour=6))
    finally:
        renderer.datasources.dispose()
    [drawn] = rendered.charts
    assert drawn.name == "revenue" and drawn.svg.startswith("<svg") and drawn.png.startswith(b"\x89PNG\r\n\x1a\n")

    assert rendered.pdf is not None
    first_page = PdfReader(io.BytesIO(rendered.pdf)).pages[0].extract_text()
    for words in ("Revenue by region", "Revenue (EUR)", "Central", "West", "2,000"):
        assert words in first_page  # the chart's text is text: drawn as vectors, not a picture
    assert "/Image" not in pdf_xobject_kinds(rendered.pdf) and "/Form" in pdf_xobject_kinds(rendered.pdf)

    msg = build(rendered, "r@example.com", ["a@example.com"], [], "<x@example.com>", True)
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    structure = [p.get_content_type() for p in parsed.walk()]
    assert structure[:5] == ["multipart/mixed", "multipart/alternative", "text/plain", "multipart/related", "text/html"]
    [png] = [p for p in parsed.walk() if p.get_content_type() == "image/png"]
    cid = "chart-revenue@sales-daily.reporter"
    assert png["Content-ID"] == f"<{cid}>" and png.get_content_disposition() == "inline"
    assert png.get_payload(decode=True) == drawn.png
    html = parsed.get_body(preferencelist=("html",))
    assert html is not None and f'src="cid:{cid}"' in html.get_content()
    assert [p.get_filename() for p in parsed.iter_attachments()] == ["sales-daily-2026-11-20_0700.pdf", "sales-daily-2026-11-20_0700.csv"]


@pytest.mark.slow
def test_templates_place_charts_and_unplaced_ones_go_above_the_footer(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    bar = {"type": "bar", "x": "region", "y": "amount"}
    config = custom_project(
        make_project,
        {
            "placed": function_report(f"{module}:rows", template="placed.html", charts={"by_region": bar}),
            "unplaced": function_report(f"{module}:rows", charts={"by_region": bar}),
            "typo": function_report(f"{module}:rows", template="placed.html", charts={"other": bar}),
        },
        {
            "placed.html": "<html><body><h1>Top</h1>{{ chart('by_region') }}<p>after</p></body></html>",
            "placed.txt": "{{ chart('by_region') }}",
        },
        {module: f"def rows(slot, report):\n    return {ROWS!r}\n"},
    )
    renderer = renderers(config)
    placed = renderer.render("placed", SLOT).html
    assert placed.index("<h1") < placed.index("cid:chart-by_region@placed.reporter") < placed.index("<p>after</p>")
    assert placed.count("cid:chart-by_region@") == 1
    unplaced = renderer.render("unplaced", SLOT).html
    assert unplaced.count("cid:chart-by_region@unplaced.reporter") == 1
    assert unplaced.index("cid:chart-by_region@") < unplaced.index('class="reporter-footer"')
    with pytest.raises(RenderError, match=r"template placed\.html:1: ValueError: no chart named 'by_region'; this report's charts: other"):
        renderer.render("typo", SLOT)


@pytest.mark.slow
def test_a_chart_arrives_inline_at_the_smtp_server(shipped_copy: Path, inbox: Inbox) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_")} | {"REPORTER_SMTP_URL": inbox.url}
    done = run_cli("send", "signups", "--sync", "--slot", "2026-11-20T07:00", env=env, cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    [msg] = inbox.messages
    [png] = [p for p in msg.walk() if p.get_content_type() == "image/png"]
    assert png["Content-ID"] == "<chart-trend@signups.reporter>"
    data = png.get_payload(decode=True)
    assert isinstance(data, bytes) and data.startswith(b"\x89PNG")
    assert int.from_bytes(data[16:20], "big") >= 2 * 420  # drawn at twice the declared width, for sharp screens
    html = msg.get_body(preferencelist=("html",))
    assert html is not None and 'src="cid:chart-trend@signups.reporter" alt="Sign-ups per minute"' in html.get_content()


@pytest.mark.slow
def test_validate_finds_a_chart_name_the_report_does_not_declare(shipped_copy: Path) -> None:
    template = shipped_copy / "templates" / "sales_daily.html"
    template.write_text(template.read_text().replace("{{ chart('revenue') }}", "{{ chart('revenu') }}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_")}
    done = run_cli("validate", env=env, cwd=shipped_copy)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = next(i for i, text in enumerate(template.read_text().splitlines(), 1) if "chart('revenu')" in text)
    expected = (
        f"templates/sales_daily.html:{line}: reports.sales-daily.template: chart('revenu'): no such chart (this report's charts: revenue)"
    )
    assert expected in done.stderr, done.stderr
