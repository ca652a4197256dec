"""reporter.render: subject, escaped HTML, text, CSV and real PDFs (read back with pypdf)."""

from __future__ import annotations

import csv
import io
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pypdf import PdfReader

from reporter.checks import load_checked
from reporter.config import Config, load
from reporter.errors import ConfigError, Problem, RenderError
from reporter.fetch import ResourceFetcher
from reporter.render import Rendered, Renderer
from tests.conftest import Project

# WeasyPrint warns at import when the system lacks libharfbuzz-subset (it falls back to fontTools);
# pytest turns warnings into errors, and that one is about the machine, not about reporter.

SLOT = datetime(2026, 7, 1, 7, 0, tzinfo=UTC)
XSS = "<script>alert(1)</script>"


@pytest.fixture
def renderers() -> Iterator[Callable[[Config], Renderer]]:
    """Renderers that dispose of their engines; sys.path and imported data modules are restored after."""
    made: list[Renderer] = []
    path, modules = list(sys.path), set(sys.modules)

    def make(config: Config) -> Renderer:
        renderer = Renderer(config)
        made.append(renderer)
        return renderer

    yield make
    for renderer in made:
        renderer.datasources.dispose()
    sys.path[:] = path
    for name in set(sys.modules) - modules:
        if name.startswith("render_data_"):
            del sys.modules[name]


def custom_project(
    make_project: Callable[..., Project], reports: dict[str, Any], templates: dict[str, str], modules: dict[str, str] | None = None
) -> Config:
    """A project whose schedules.yaml has REPORTS; TEMPLATES and MODULES are written beside it."""
    project = make_project()
    for name, text in templates.items():
        (project.root / "templates" / name).write_text(text)
    for name, text in (modules or {}).items():
        (project.root / f"{name}.py").write_text(text)
    document = {
        "timezone": "UTC",
        "defaults": {"sender": "Reports <reports@example.com>", "soft_time_limit": 20, "time_limit": 30},
        "datasources": {"warehouse": {"url": f"sqlite:///{project.root}/warehouse.db", "seed": "orders.sql"}},
        "reports": reports,
    }
    project.config.write_text(yaml.safe_dump(document, sort_keys=False))
    return load(project.config, os.environ)


def function_report(function: str, template: str = "simple.html", **extra: Any) -> dict[str, Any]:
    return {
        "schedule": "0 7 * * *",
        "subject": "Rows at {{ slot.strftime('%H:%M') }}: {{ row_count }}",
        "template": template,
        "function": function,
        "formats": ["html", "pdf", "csv"],
        "recipients": ["ann@example.com"],
        **extra,
    }


def pdf_pages(data: bytes) -> list[str]:
    assert data.startswith(b"%PDF-")
    return [page.extract_text() for page in PdfReader(io.BytesIO(data)).pages]


def csv_rows(data: bytes | None) -> list[list[str]]:
    assert data is not None
    assert data.startswith(b"\xef\xbb\xbf"), "CSV attachments start with a UTF-8 BOM by default"
    return list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))


def unique_module() -> str:
    return f"render_data_{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- a whole report


@pytest.mark.slow
def test_render_produces_every_part(make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]) -> None:
    project = make_project()
    with open(project.root / "orders.sql", "a") as seed:
        seed.write(f"INSERT INTO orders (region, amount) VALUES ('{XSS}', 1.5);\n")
    config = load(project.config, os.environ)
    rendered = renderers(config).render("regional", SLOT)

    assert isinstance(rendered, Rendered)
    assert rendered.report == "regional"
    assert rendered.slot == SLOT
    assert rendered.row_count == 4
    assert rendered.subject == "Regional 07:00"

    # HTML: the values, with the data escaped.
    assert "<h1>regional</h1>" in rendered.html
    assert "Atlantis" in rendered.html and "1234.5" in rendered.html
    assert XSS not in rendered.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered.html

    # Text part: the built-in default.txt: the subject, the summary, a table with numbers formatted
    # alike and right-aligned, and the footer.
    assert rendered.text.startswith("Regional 07:00\nWednesday 01 July 2026, 07:00 UTC\n\n4 rows; totals: amount 1,285.25.\n\n")
    table = rendered.text.split("\n\n")[2].splitlines()
    assert [line.split("  ")[-1].strip() for line in table[2:]] == ["1,234.50", "42.25", "7.00", "1.50"]
    assert len({len(line) for line in table[2:]}) == 1  # right-aligned: every row ends in the same column
    assert rendered.text.endswith(
        "-- \nThis is the scheduled report regional.\nSchedule: Every minute (* * * * *, UTC).\n"
        "Next run: Wednesday 01 July 2026, 07:01 UTC.\nOwners: owner@example.com (write to them to change or stop this report).\n"
    )
    assert '<div class="reporter-footer"' in rendered.html and "Next run: Wednesday 01 July 2026, 07:01 UTC." in rendered.html

    # CSV: the raw values, header first; nothing escaped for HTML there.
    assert csv_rows(rendered.csv) == [
        ["region", "amount"],
        ["Atlantis", "1234.5"],
        ["Lemuria", "42.25"],
        ["Mu", "7.0"],
        [XSS, "1.5"],
    ]

    # PDF: one page with the data and the footer.
    assert rendered.pdf is not None
    [page] = pdf_pages(rendered.pdf)
    for value in ("regional", "Atlantis", "1234.5", "Lemuria", "42.25", "Mu", "Page 1 of 1"):
        assert value in page
    assert "&lt;" not in page  # the escaped markup shows as the text the data holds
    assert "<script>alert(1)</script>" in page

    names = [name for name, _, _ in rendered.attachments()]
    assert names == ["regional-2026-07-01_0700.pdf", "regional-2026-07-01_0700.csv"]


@pytest.mark.slow
def test_function_data_is_escaped_in_html_and_raw_in_csv(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"hostile": function_report(f"{module}:rows")},
        {},
        {module: f"def rows(slot, report):\n    return [{{'region': {XSS!r}, 'amount': '\"quoted\", & more'}}]\n"},
    )
    rendered = renderers(config).render("hostile", SLOT)
    assert XSS not in rendered.html
    assert "&lt;script&gt;" in rendered.html
    assert "&amp; more" in rendered.html
    assert csv_rows(rendered.csv) == [["region", "amount"], [XSS, '"quoted", & more']]
    assert rendered.subject == "Rows at 07:00: 1"


@pytest.mark.slow
def test_csv_attachment_is_safe_to_open_in_a_spreadsheet(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    rows = [
        {"region": '=HYPERLINK("http://x","y")', "amount": -2},
        {"region": "=cmd|' /C calc'!A0", "amount": -2.5},
        {"region": "@SUM(1)", "amount": 3},
        {"region": "+1+1", "amount": 0},
        {"region": "-2+3", "amount": -1},
        {"region": "Zürich", "amount": 7},
    ]
    config = custom_project(
        make_project,
        {"hostile": function_report(f"{module}:rows"), "no-bom": function_report(f"{module}:rows", csv_bom=False)},
        {},
        {module: f"def rows(slot, report):\n    return {rows!r}\n"},
    )
    renderer = renderers(config)
    assert csv_rows(renderer.render("hostile", SLOT).csv) == [
        ["region", "amount"],
        ['\'=HYPERLINK("http://x","y")', "-2"],
        ["'=cmd|' /C calc'!A0", "-2.5"],
        ["'@SUM(1)", "3"],
        ["'+1+1", "0"],
        ["'-2+3", "-1"],
        ["Zürich", "7"],
    ]
    plain = renderer.render("no-bom", SLOT).csv
    assert plain is not None and plain.startswith(b"region,amount\r\n")


def test_html_only_report_has_no_pdf_or_csv(make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"light": function_report(f"{module}:rows", formats=["html"])},
        {},
        {module: "def rows(slot, report):\n    return [{'region': 'Mu', 'amount': 1}]\n"},
    )
    rendered = renderers(config).render("light", SLOT)
    assert rendered.pdf is None and rendered.csv is None
    assert rendered.attachments() == []
    assert "Mu" in rendered.html


def test_slot_is_shown_in_the_reports_zone(make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"berlin": function_report(f"{module}:rows", timezone="Europe/Berlin", formats=["html"])},
        {},
        {module: "def rows(slot, report):\n    return [{'region': slot.isoformat(), 'amount': report}]\n"},
    )
    rendered = renderers(config).render("berlin", datetime(2026, 7, 1, 5, 0, tzinfo=UTC))
    assert rendered.subject == "Rows at 07:00: 1"
    # The data function gets the slot in the report's zone, too.
    assert "2026-07-01T07:00:00+02:00" in rendered.html
    assert "berlin" in rendered.html


@pytest.mark.slow
def test_long_table_spans_pages_numbered_n_of_n(make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"long": function_report(f"{module}:rows")},
        {},
        {module: "def rows(slot, report):\n    return [{'region': f'Region-{i:03d}', 'amount': i * 1.5} for i in range(200)]\n"},
    )
    rendered = renderers(config).render("long", SLOT)
    assert rendered.row_count == 200
    assert len(csv_rows(rendered.csv)) == 201

    assert rendered.pdf is not None
    pages = pdf_pages(rendered.pdf)
    total = len(pages)
    assert total > 1
    for number, text in enumerate(pages, 1):
        assert f"Page {number} of {total}" in text
    assert "Region-000" in pages[0]
    assert "Region-199" in pages[-1]
    everything = "\n".join(pages)
    assert all(f"Region-{i:03d}" in everything for i in range(200))


# --------------------------------------------------------------------------- template errors


def test_undefined_variable_names_template_and_name(make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"typo": function_report(f"{module}:rows", template="typo.html")},
        {"typo.html": "<html><body>\n<h1>{{ report.name }}</h1>\n<p>{{ totl_amount }}</p>\n</body></html>\n"},
        {module: "def rows(slot, report):\n    return [{'region': 'Mu', 'amount': 1}]\n"},
    )
    with pytest.raises(RenderError) as info:
        renderers(config).render("typo", SLOT)
    message = str(info.value)
    assert "typo.html" in message
    assert "totl_amount" in message
    assert "typo.html:3" in message


def test_undefined_variable_in_subject_is_a_render_error(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {"subj": function_report(f"{module}:rows", subject="Total {{ totl }}")},
        {},
        {module: "def rows(slot, report):\n    return []\n"},
    )
    with pytest.raises(RenderError, match=r"reports\.subj\.subject.*totl"):
        renderers(config).render("subj", SLOT)


# Line 4 closes an expression with a single brace.
BROKEN_HTML = """<html><body>
<h1>{{ report.name }}</h1>
{% for row in rows %}
<p>{{ row.region }</p>
{% endfor %}
</body></html>
"""


def template_problems(config: Config) -> list[Problem]:
    """What the check every command makes (checks.load_checked) says of CONFIG's files."""
    try:
        load_checked(config.source, os.environ, config.templates_dir)
    except ConfigError as exc:
        return exc.problems
    return []


def test_problems_reports_template_syntax_errors_with_file_and_line(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    module = unique_module()
    config = custom_project(
        make_project,
        {
            "fine": function_report(f"{module}:rows"),
            "broken": function_report(f"{module}:rows", template="broken.html"),
            "bad-subject": function_report(f"{module}:rows", subject="Total {{ rows | "),
        },
        {"broken.html": BROKEN_HTML},
        {module: "def rows(slot, report):\n    return []\n"},
    )
    renderer = renderers(config)
    problems = template_problems(config)
    by_field = {p.field: p for p in problems}
    assert set(by_field) == {"reports.broken.template", "reports.bad-subject.subject"}

    template = by_field["reports.broken.template"]
    assert template.file == str(config.templates_dir / "broken.html")
    assert template.line == 4
    assert "template syntax error" in template.message

    subject = by_field["reports.bad-subject.subject"]
    assert subject.file == str(config.source)
    assert "template syntax error" in subject.message

    # Rendering it anyway names the file and line too.
    with pytest.raises(RenderError, match=r"broken\.html:4"):
        renderer.render("broken", SLOT)


def test_problems_finds_syntax_errors_in_a_template_the_report_extends(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    """A broken base template breaks every report built on it; validate should say so before a run."""
    module = unique_module()
    config = custom_project(
        make_project,
        {"child": function_report(f"{module}:rows", template="child.html")},
        {
            "layout.html": "<html><body>\n{% block content %}{% endblock %}\n{% if %}\n</body></html>\n",
            "child.html": '{% extends "layout.html" %}\n{% block content %}<p>{{ row_count }}</p>{% endblock %}\n',
        },
        {module: "def rows(slot, report):\n    return []\n"},
    )
    problems = template_problems(config)
    assert [(Path(p.file).name, p.line) for p in problems] == [("layout.html", 3)]


def test_problems_is_empty_for_good_templates(make_project: Callable[..., Project]) -> None:
    config = load(make_project().config, os.environ)
    assert template_problems(config) == []


# --------------------------------------------------------------------------- what the PDF may fetch


def test_fetcher_refuses_anything_outside_the_templates_folder(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "style.css").write_text("h1 { color: red }")
    (tmp_path / "secret.css").write_text("h1 { color: blue }")
    (templates / "link.css").symlink_to(tmp_path / "secret.css")
    fetcher = ResourceFetcher(templates)

    for url in (
        "file:///etc/passwd",
        (tmp_path / "secret.css").as_uri(),
        f"file://{templates}/../secret.css",
        f"file://{templates}/%2E%2E/secret.css",
        (templates / "link.css").as_uri(),
        "http://127.0.0.1:1/logo.png",
        "https://example.com/logo.png",
        "ftp://example.com/x",
    ):
        with pytest.raises(ValueError, match="refused"):
            fetcher(url)

    allowed = fetcher((templates / "style.css").as_uri())
    assert b"color: red" in read_all(allowed)
    assert read_all(fetcher("data:text/css,h1%20%7Bcolor%3Agreen%7D")) == b"h1 {color:green}"


def read_all(response: Any) -> bytes:
    """The body of a WeasyPrint fetch response, whichever form this WeasyPrint version returns."""
    if isinstance(response, dict):
        if "string" in response:
            value = response["string"]
            return value.encode() if isinstance(value, str) else bytes(value)
        return bytes(response["file_obj"].read())
    for attr in ("read",):
        if hasattr(response, attr):
            return bytes(response.read())
    raise AssertionError(f"unknown fetch response {response!r}")


@pytest.mark.slow
def test_pdf_never_embeds_files_outside_the_templates_folder(
    tmp_path: Path, make_project: Callable[..., Project], renderers: Callable[[Config], Renderer]
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil.css").write_text('h1::after { content: " LEAKED-SECRET"; }')
    module = unique_module()
    hostile = f"""<!doctype html><html><head>
<link rel="stylesheet" href="style.css">
<link rel="stylesheet" href="file:///etc/passwd">
<link rel="stylesheet" href="{(outside / "evil.css").as_uri()}">
<link rel="stylesheet" href="../../outside/evil.css">
</head><body>
<h1>Fetch test</h1>
<img src="file:///etc/passwd" alt="">
<img src="{(outside / "evil.css").as_uri()}" alt="">
<a rel="attachment" href="file:///etc/passwd">passwd</a>
<p>{{{{ rows[0].region }}}}</p>
</body></html>
"""
    config = custom_project(
        make_project,
        {"fetch": function_report(f"{module}:rows", template="hostile.html", formats=["html", "pdf"])},
        {"hostile.html": hostile, "style.css": 'h1::after { content: " ALLOWED-STYLE"; }'},
        {module: "def rows(slot, report):\n    return [{'region': 'Still-rendered', 'amount': 1}]\n"},
    )
    rendered = renderers(config).render("fetch", SLOT)
    assert rendered.pdf is not None
    reader = PdfReader(io.BytesIO(rendered.pdf))
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "Fetch test" in text and "Still-rendered" in text
    assert "ALLOWED-STYLE" in text  # a stylesheet beside the templates is used ...
    assert "LEAKED-SECRET" not in text  # ... one outside them is not
    assert "root:" not in text
    assert reader.attachments == {}
    assert b"root:x:0:0" not in rendered.pdf


def test_pdfs_share_one_font_configuration_which_is_renewed_after_its_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    # A FontConfiguration per PDF left ~220 KiB behind in fontconfig/Pango per render, for good.
    from reporter import render

    fonts = render._SharedFonts()
    monkeypatch.setattr(render, "FONT_CONFIG_USES", 3)
    with fonts.lock:
        taken = [fonts.take() for _ in range(7)]
    assert [id(t) for t in taken].count(id(taken[0])) == 3
    assert taken[0] is taken[1] is taken[2] and taken[3] is taken[4] is taken[5]
    assert len({id(t) for t in taken}) == 3


def test_the_renderer_gives_weasyprint_the_shared_font_configuration(
    make_project: Callable[..., Project], renderers: Callable[[Config], Renderer], monkeypatch: pytest.MonkeyPatch
) -> None:
    import weasyprint

    from reporter import render

    seen: list[Any] = []
    write_pdf = weasyprint.HTML.write_pdf

    def noting(self: Any, *args: Any, **kwargs: Any) -> Any:  # the real render, noting its font configuration
        seen.append(kwargs.get("font_config"))
        return write_pdf(self, *args, **kwargs)

    monkeypatch.setattr(weasyprint.HTML, "write_pdf", noting)
    monkeypatch.setattr(render, "_FONTS", render._SharedFonts())
    renderer = renderers(load(make_project().config, os.environ))
    for _ in range(2):
        assert renderer.pdf("<p>x</p>").startswith(b"%PDF")
    assert seen[0] is not None and seen[0] is seen[1]
