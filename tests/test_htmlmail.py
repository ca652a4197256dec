"""HTML that survives mail clients: inlined CSS, a viewport, a body under Gmail's clipping size."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from reporter.config import Config, load
from reporter.htmlmail import MAX_BODY_BYTES, for_email
from reporter.render import Renderer
from tests.conftest import ROOT, Project
from tests.test_render import SLOT, csv_rows, custom_project, function_report, renderers, unique_module

__all__ = ["renderers"]  # the fixture, imported for the tests below


class Elements(HTMLParser):
    """Every start tag with its attributes, and whether a <style> block is left."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def elements(html: str) -> list[tuple[str, dict[str, str]]]:
    parser = Elements()
    parser.feed(html)
    return parser.tags


def without_style_blocks(html: str) -> str:
    """What a client that drops <style> shows."""
    return re.sub(r"<style\b.*?</style>", "", html, flags=re.IGNORECASE | re.DOTALL)


def test_for_email_inlines_every_rule_and_adds_a_viewport() -> None:
    html = for_email(
        "<html><head><style>td { border-bottom: 1px solid #ddd } td.num { text-align: right }"
        " @media (max-width: 600px) { td { padding: 0 } }</style></head>"
        '<body><table><tr><td>a</td><td class="num">1</td></tr></table></body></html>'
    )
    tags = elements(without_style_blocks(html))
    assert ("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}) in tags
    cells = [attrs["style"] for tag, attrs in tags if tag == "td"]
    assert cells == ["border-bottom: 1px solid #ddd;", "border-bottom: 1px solid #ddd;text-align: right;"]
    assert "@media (max-width: 600px)" in html  # what cannot be inlined stays for the clients that read it


def test_for_email_keeps_a_templates_own_viewport() -> None:
    html = for_email('<html><head><meta name="viewport" content="width=600"></head><body></body></html>')
    assert [attrs for tag, attrs in elements(html) if tag == "meta"] == [{"name": "viewport", "content": "width=600"}]


@pytest.fixture
def web() -> Iterator[tuple[str, list[str]]]:
    """A local web server that records every request it gets."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/css")
            self.end_headers()
            self.wfile.write(b"td { color: red }")

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()
    server.server_close()


def test_for_email_never_fetches_a_stylesheet(web: tuple[str, list[str]]) -> None:
    url, seen = web
    link = f'<link rel="stylesheet" href="{url}/evil.css">'
    html = for_email(f"<html><head>{link}</head><body><table><tr><td>a</td></tr></table></body></html>")
    assert seen == []
    assert "evil.css" not in html and "color: red" not in html


@pytest.mark.slow
def test_shipped_report_keeps_its_layout_without_the_style_block(tmp_path: Path) -> None:
    config = load(ROOT / "schedules.yaml", {**os.environ, "WAREHOUSE_URL": f"sqlite:///{tmp_path}/warehouse.db"})
    renderer = Renderer(config)
    try:
        html = renderer.render("sales-daily", SLOT.replace(day=20, month=11, hour=6)).html
    finally:
        renderer.datasources.dispose()
    assert "<style" not in html
    tags = elements(html)
    assert ("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}) in tags
    style = {tag: attrs.get("style", "") for tag, attrs in tags}  # the last of each kind
    assert "font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif" in style["body"]
    assert "font-family: 'DejaVu Sans', Helvetica, Arial, sans-serif" in style["table"]
    assert "border-collapse: collapse" in style["table"]
    cells = [attrs for tag, attrs in tags if tag == "td"]
    assert cells and all("border-bottom: 1px solid #ddd" in c["style"] and "padding: 3pt 8pt" in c["style"] for c in cells)
    numbers = [c for c in cells if c.get("class") == "num"]
    assert numbers and all("text-align: right" in c["style"] for c in numbers)


@pytest.mark.slow
def test_a_long_table_is_cut_to_fit_under_100_kb_and_says_how_many_rows_are_in_the_attachment(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {
            "long": function_report(f"{module}:rows", formats=["html", "csv"]),
            "no-attachment": function_report(f"{module}:rows", formats=["html"]),
        },
        {},
        {module: "def rows(slot, report):\n    return [{'region': f'Region-{i:05d}', 'amount': i * 1.5} for i in range(3000)]\n"},
    )
    renderer = renderers(config)
    rendered = renderer.render("long", SLOT)
    assert len(rendered.html.encode()) <= MAX_BODY_BYTES
    shown = rendered.html.count("<td>Region-")
    assert 100 < shown < 3000
    note = f"This email shows the first {shown:,} of 3,000 rows; the other {3000 - shown:,} are in the attached CSV."
    assert rendered.notes == (note,)
    assert note in rendered.html and note in rendered.text
    assert f"Region-{shown - 1:05d}" in rendered.html and f"Region-{shown:05d}" not in rendered.html
    assert f"Region-{shown - 1:05d}" in rendered.text and f"Region-{shown:05d}" not in rendered.text
    assert len(csv_rows(rendered.csv)) == 3001
    # The summary is over every row, not only those shown.
    assert "3,000 rows; totals: amount 6,747,750.00." in rendered.text

    bare = renderer.render("no-attachment", SLOT)
    assert bare.notes[0].endswith(f"rows; {3000 - bare.html.count('<td>Region-'):,} more are not shown.")
