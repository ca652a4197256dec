"""Bursting (reporter.burst): one email per reader, each with their own parameters, exactly once each.

Pure parts (row checks, the piece policy, renders shared by parameter set) are tables; the ledger parts run
on SQLite and PostgreSQL; sends go through the real Maildir transport or an aiosmtpd inbox, and the
emails and PDFs people receive are read back.
"""

from __future__ import annotations

import email
import email.policy
import io
import json
import mailbox
import textwrap
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from email.message import EmailMessage
from pathlib import Path

import pytest
import sqlalchemy as sa
from pypdf import PdfReader

from reporter import burst
from reporter import ledger as L
from reporter.audience import BURST_KEY, audience, keys_of
from reporter.burst import Piece, Reader, Slice
from reporter.checks import load_checked
from reporter.config import load
from reporter.data import Table
from reporter.errors import ConfigError, RenderError
from reporter.ledger import Ledger
from reporter.live import load_checked as live_load_checked
from reporter.mail import transport
from reporter.observers import Observers
from reporter.ratelimit import LocalLimiter
from reporter.runtime import Runtime
from reporter.settings import Settings
from tests.conftest import Inbox, run_cli
from tests.test_config import BASE, write_project

SLOT = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)
REGIONS = ["North", "South", "East", "West", "Central"]


def amount_of(region: str) -> str:
    """Each region's own total, as the template prints it: no region's digits appear in another's."""
    i = REGIONS.index(region) + 1
    return f"{i}{i},{i}{i}{i}.{i}{i}"


# ----------------------------------------------------------------------------- a burst project

BURST_YAML = """\
timezone: UTC
defaults:
  sender: "Reports <reports@example.com>"
  rate_limit: "{rate}"
  soft_time_limit: {soft}
  time_limit: {hard}
  max_retries: 5
datasources:
  warehouse:
    url: "sqlite:///{root}/warehouse.db"
    seed: burst.sql
beat:
  email_reports.schedule_hourly:
    task: email_reports.schedule_hourly
    cron: "1 * * * *"
reports:
  regional:
    schedule: "0 7 * * *"
    subject: "{{{{ reader.region }}}} sales {{{{ slot.strftime('%d') }}}}"
    template: region.html
    burst:
      query: {{datasource: warehouse, sql: "select address, region from readers order by id"}}
    query:
      datasource: warehouse
      sql: "select region, amount from sales where region = :region"
    formats: [{formats}]
    group: {group}
    owners: [owner@example.com]
"""

REGION_TEMPLATE = """<!doctype html><html><body>
<h1>Sales of {{ reader.region }}</h1>
<p>Total {{ all_rows | sum(attribute='amount') | number(2) }}</p>
</body></html>
"""


def burst_sql(addresses: list[str | None], regions: list[str]) -> str:
    """A warehouse: READERS (address, region) and one sale per region, its amount unique to it."""
    readers = ",\n".join(
        f"({i}, {'NULL' if a is None else repr(a)}, {r!r})" for i, (a, r) in enumerate(zip(addresses, regions, strict=True), 1)
    )
    sales = ",\n".join(f"({r!r}, {amount_of(r).replace(',', '')})" for r in REGIONS)
    return (
        "CREATE TABLE readers (id INTEGER PRIMARY KEY, address TEXT, region TEXT);\n"
        f"INSERT INTO readers (id, address, region) VALUES\n{readers};\n"
        "CREATE TABLE sales (region TEXT, amount REAL);\n"
        f"INSERT INTO sales (region, amount) VALUES\n{sales};\n"
    )


def make_burst_project(
    root: Path,
    addresses: list[str | None],
    regions: list[str] | None = None,
    rate: str = "50/s",
    soft: int = 20,
    hard: int = 30,
    group: bool = False,
    formats: str = "html, pdf",
) -> Path:
    """ROOT with schedules.yaml (report `regional`), templates and a warehouse; returns ROOT."""
    regions = regions or [REGIONS[i % len(REGIONS)] for i in range(len(addresses))]
    (root / "templates").mkdir(parents=True, exist_ok=True)
    (root / "templates" / "region.html").write_text(REGION_TEMPLATE)
    (root / "burst.sql").write_text(burst_sql(addresses, regions))
    text = BURST_YAML.format(root=root, rate=rate, soft=soft, hard=hard, group=str(group).lower(), formats=formats)
    (root / "schedules.yaml").write_text(text)
    return root


def env_for(root: Path, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_")}
    env.update(REPORTER_CONFIG=str(root / "schedules.yaml"), REPORTER_DATABASE_URL=f"sqlite:///{root}/ledger.db")
    env.update(REPORTER_OUTBOX=str(root / "outbox"), **extra)
    return env


@pytest.fixture
def ledger(open_ledger: Callable[[], Ledger]) -> Ledger:
    """A ledger on SQLite and on PostgreSQL (conftest's open_ledger)."""
    return open_ledger()


def runtime_on(root: Path, ledger: Ledger) -> Runtime:
    """A Runtime on ROOT's config and LEDGER, sending through the real Maildir transport into ROOT/outbox."""
    settings = Settings.from_env(env_for(root))
    return Runtime(settings, live_load_checked(settings), ledger, LocalLimiter(), lambda: transport(None, settings.outbox), Observers([]))


def received(outbox: Path) -> list[EmailMessage]:
    return [email.message_from_bytes(m.as_bytes(), policy=email.policy.default) for m in mailbox.Maildir(outbox, create=False)]  # type: ignore[misc]


def pdf_text(msg: EmailMessage) -> str:
    [pdf] = [p for p in msg.iter_attachments() if p.get_content_type() == "application/pdf"]
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf.get_content())).pages)


# ----------------------------------------------------------------------------- pure: burst rows


def table(*rows: tuple[object, ...], columns: tuple[str, ...] = ("address", "region")) -> Table:
    return Table(columns, tuple(rows))


@pytest.mark.parametrize(
    ("rows", "readers", "malformed"),
    [
        pytest.param([("ann@example.com", "North")], [("ann@example.com", {"region": "North"}, 1)], [], id="one"),
        pytest.param(
            [("Ann Lee <Ann@Example.COM>", "North")], [("ann@example.com", {"region": "North"}, 1)], [], id="named-address-keyed-bare"
        ),
        pytest.param([(None, "North")], [], [("(burst row 1)", "burst row 1: no address in column 'address'")], id="null"),
        pytest.param([("  ", "North")], [], [("(burst row 1)", "burst row 1: no address in column 'address'")], id="blank"),
        pytest.param(
            [("ann@example.com", "North"), ("bob@", "South")],
            [("ann@example.com", {"region": "North"}, 1)],
            [("(burst row 2)", "burst row 2: 'bob@' is not an email address")],
            id="invalid",
        ),
        pytest.param(
            [("ann@example.com", "North"), ("b@example.com", "East"), ("ANN@example.com", "South")],
            [("ann@example.com", {"region": "North"}, 1), ("b@example.com", {"region": "East"}, 2)],
            [("(burst row 3)", "burst row 3: duplicate of ann@example.com (row 1), which gets its own slice once")],
            id="duplicate-keeps-the-first",
        ),
    ],
)
def test_burst_rows_become_readers_or_malformed_rows_with_the_reason(
    rows: list[tuple[object, ...]], readers: list[tuple[str, dict[str, object], int]], malformed: list[tuple[str, str]]
) -> None:
    found, bad = burst.readers_of(table(*rows), "address")
    assert [(r.key, r.params, r.row) for r in found] == readers
    assert [m.key for m in bad] == [key for key, _ in malformed]
    for got, (_, fragment) in zip(bad, malformed, strict=True):
        assert got.error.startswith(fragment), got.error


def test_parameters_are_every_other_column_kept_as_json_values() -> None:
    rows = table(("a@example.com", 7, Decimal("2.50"), Decimal("3"), date(2026, 3, 2), None), columns=("to", "n", "d", "i", "day", "x"))
    [reader], bad = burst.readers_of(rows, "to")
    assert bad == []
    assert reader.params == {"n": 7, "d": 2.5, "i": 3, "day": "2026-03-02", "x": None}
    assert json.loads(reader.stored()) == {"address": "a@example.com", "n": 7, "d": 2.5, "i": 3, "day": "2026-03-02", "x": None}


def test_a_burst_query_without_the_address_column_fails_the_planning_with_the_columns() -> None:
    with pytest.raises(RenderError, match=r"no column 'email' for the address \(columns: address, region\)"):
        burst.readers_of(table(("a@example.com", "North")), "email")


# ----------------------------------------------------------------------------- pure: pieces and slices


@pytest.mark.parametrize(
    ("soft", "rate", "cap", "size"),
    [
        (100, 1.0, 100, 40),  # 0.4 of 100 s at 1/s
        (100, 10.0, 100, 100),  # capped
        (100, 10.0, 30, 30),
        (10, 2.0, 100, 8),
        (1, 0.1, 100, 1),  # at least one, however slow
        (20, 1 / 60, 100, 1),  # 1/m
        (3600, 100 / 3600, 100, 40),  # 100/h
    ],
)
def test_piece_size_fits_its_share_of_the_soft_time_limit_at_the_rate(soft: float, rate: float, cap: int, size: int) -> None:
    assert burst.piece_size(soft, rate, cap) == size


def reader(key: str, region: str) -> Reader:
    return Reader(key, key, {"region": region}, 0)


def test_pieces_keep_readers_of_one_parameter_set_together_and_are_staggered_by_the_rate() -> None:
    readers = [reader(f"r{i}@x.com", ["B", "A", "C"][i % 3]) for i in range(7)]
    pieces = burst.piece_plan(readers, soft_time_limit=8, rate=1.0)  # 3 a piece
    assert pieces == [
        Piece(("r1@x.com", "r4@x.com", "r0@x.com"), 0.0, 0.0),
        Piece(("r3@x.com", "r6@x.com", "r2@x.com"), 3.0, 3.0),
        Piece(("r5@x.com",), 6.0, 6.0),
    ]
    assert burst.piece_plan([], 10, 1.0) == []


def stored(address: str, **params: object) -> str:
    return json.dumps({"address": address, **params})


@pytest.mark.parametrize(
    ("group", "per_reader", "expected"),
    [
        pytest.param(
            False,
            False,
            [(("a@x.com", "b@x.com"), {"region": "N", "address": "a@x.com"}), (("c@x.com",), {"region": "S", "address": "c@x.com"})],
            id="shared-render-per-parameter-set",
        ),
        pytest.param(
            False,
            True,
            [
                (("a@x.com",), {"region": "N", "address": "a@x.com"}),
                (("b@x.com",), {"region": "N", "address": "b@x.com"}),
                (("c@x.com",), {"region": "S", "address": "c@x.com"}),
            ],
            id="a-render-each-when-the-address-is-shown",
        ),
        pytest.param(
            True,
            True,
            [
                (("a@x.com", "b@x.com"), {"region": "N", "address": "a@x.com, b@x.com"}),
                (("c@x.com",), {"region": "S", "address": "c@x.com"}),
            ],
            id="group-one-message-per-parameter-set",
        ),
    ],
)
def test_slices_share_a_render_between_readers_with_identical_parameters(
    group: bool, per_reader: bool, expected: list[tuple[tuple[str, ...], dict[str, str]]]
) -> None:
    rows = {"a@x.com": stored("a@x.com", region="N"), "b@x.com": stored("b@x.com", region="N"), "c@x.com": stored("c@x.com", region="S")}
    assert [(s.keys, s.reader) for s in burst.slices(rows, group, per_reader)] == expected


def test_a_slice_sent_as_another_reader_names_its_own_address_and_renders_the_others() -> None:
    [part] = burst.slices({"x@y.org": stored("Ann <ann@x.com>", region="N")}, group=False, per_reader=True)
    assert part == Slice(("x@y.org",), {"x@y.org": "x@y.org"}, {"address": "Ann <ann@x.com>", "region": "N"})


@pytest.mark.parametrize(
    ("texts", "shows"),
    [
        (["{{ reader.region }}", "Sales for {{ reader['region'] }}"], False),
        (["{{ reader.address }}"], True),
        (["{{ reader['address'] }}"], True),
        (["{{ reader }}"], True),
        (["{% for k, v in reader.items() %}{% endfor %}"], True),
        (["no readers here"], False),
    ],
)
def test_a_report_that_may_show_the_address_gets_a_render_per_reader(texts: list[str], shows: bool) -> None:
    assert burst.shows_address(texts) is shows


def test_rows_are_listed_planning_row_readers_then_malformed_rows_by_number() -> None:
    keys = ["(burst row 12)", "b@x.com", "(burst row 3)", BURST_KEY, "a@x.com"]
    assert sorted(keys, key=burst.listing_order) == [BURST_KEY, "a@x.com", "b@x.com", "(burst row 3)", "(burst row 12)"]


def test_not_a_reader_names_some_readers_and_how_to_send_a_slice() -> None:
    found = [reader(f"{n}@x.com", "N") for n in ("ann", "ben", "cy", "dee")]
    assert burst.not_a_reader("zed@y.org", "regional", found, advice=True) == (
        "zed@y.org is not a reader of regional (4 readers, e.g. ann@x.com, ben@x.com, cy@x.com, …); "
        "to send ann@x.com's slice to zed@y.org: --to zed@y.org --as ann@x.com"
    )
    assert burst.not_a_reader("zed@y.org", "regional", []) == "zed@y.org is not a reader of regional (0 readers)"


# ----------------------------------------------------------------------------- config


BURST_BASE = """\
datasources:
  w:
    url: sqlite://
reports:
  r1:
    schedule: "0 7 * * *"
    subject: Hi
    template: t.html
    burst:
      query: {datasource: w, sql: "select 'a@example.com' as address"}
"""


def test_a_burst_report_loads_without_recipients_and_dispatches_its_planning_row(tmp_path: Path) -> None:
    config = load_checked(write_project(tmp_path, BURST_BASE), {}, tmp_path / "templates")
    report = config.reports["r1"]
    assert report.burst is not None and report.burst.address == "address" and report.recipients == ()
    assert keys_of(report) == (BURST_KEY,)
    assert audience(report).keys() == [BURST_KEY]
    assert audience(report, ["Ann <ann@example.com>", BURST_KEY]).to == {"ann@example.com": "Ann <ann@example.com>", BURST_KEY: BURST_KEY}


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param(
            BURST_BASE + "    recipients: [a@example.com]\n",
            [(11, "reports.r1.recipients", "a burst report's readers come from burst: (one row each); remove 'recipients'")],
            id="recipients",
        ),
        pytest.param(
            BURST_BASE + "    cc: [a@example.com]\n    bcc: [b@example.com]\n",
            [(11, "reports.r1.cc", "remove 'cc'"), (12, "reports.r1.bcc", "remove 'bcc'")],
            id="cc-and-bcc",
        ),
        pytest.param(
            BURST_BASE.replace("      query: {datasource: w, sql: \"select 'a@example.com' as address\"}\n", "      address: email\n"),
            [(9, "reports.r1.burst", "give either 'query' or 'function' (returning one row per reader), one of them")],
            id="neither-query-nor-function",
        ),
        pytest.param(
            BURST_BASE + "      function: mod:readers\n",
            [(9, "reports.r1.burst", "give either 'query' or 'function' (returning one row per reader), not both")],
            id="both",
        ),
        pytest.param(
            BURST_BASE.replace("datasource: w,", "datasource: ww,"),
            [(10, "reports.r1.burst.query.datasource", "unknown datasource 'ww' (did you mean 'w'?) (known: w)")],
            id="unknown-datasource",
        ),
        pytest.param(
            BURST_BASE + "      adress: email\n", [(11, "reports.r1.burst.adress", "unknown key (did you mean 'address'?)")], id="typo"
        ),
        pytest.param(
            BASE.replace("    recipients: [a@example.com]\n", ""), [(2, "reports.r1.recipients", "is required but missing")], id="no-burst"
        ),
    ],
)
def test_burst_config_mistakes_are_refused_with_line_and_field(tmp_path: Path, content: str, expected: list[tuple[int, str, str]]) -> None:
    path = write_project(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load(path, {})
    problems = info.value.problems
    assert [(p.line, p.field) for p in problems] == [(line, field) for line, field, _ in expected], problems
    for problem, (_, _, fragment) in zip(problems, expected, strict=True):
        assert fragment in problem.message and problem.file == str(path), problem


def test_a_burst_reports_data_function_must_take_the_reader(tmp_path: Path) -> None:
    module = f"burstfuncs_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("def rows(slot, report):\n    return []\n\ndef readers(slot, report):\n    return []\n")
    text = BURST_BASE.replace("    burst:\n      query: {datasource: w, sql: \"select 'a@example.com' as address\"}\n", "")
    text += f"    function: {module}:rows\n    burst:\n      function: {module}:readers\n"
    with pytest.raises(ConfigError) as info:
        load_checked(write_project(tmp_path, text), {}, tmp_path / "templates")
    [problem] = info.value.problems
    assert (problem.line, problem.field) == (9, "reports.r1.function"), problem
    assert f"{module}:rows cannot be called as rows(slot=..., report=..., reader=...)" in problem.message
    assert "a burst report's data function gets each reader's row as reader=" in problem.message


# ----------------------------------------------------------------------------- ledger


def test_reader_rows_are_inserted_once_and_keep_their_params(ledger: Ledger) -> None:
    first = ledger.ensure_readers("r", SLOT, {"a@x.com": stored("a@x.com", region="N"), "b@x.com": stored("b@x.com", region="S")})
    assert sorted(first) == ["a@x.com", "b@x.com"]
    # A second planning that sees other parameters (the warehouse changed) changes no existing row.
    again = ledger.ensure_readers("r", SLOT, {"a@x.com": stored("a@x.com", region="X"), "c@x.com": stored("c@x.com", region="E")})
    assert again == ["c@x.com"]
    params = ledger.params_of("r", SLOT, ["a@x.com", "b@x.com", "c@x.com", "nobody@x.com"])
    assert {k: json.loads(v or "null")["region"] for k, v in params.items()} == {"a@x.com": "N", "b@x.com": "S", "c@x.com": "E"}
    assert {r.recipient: (r.status, r.params) for r in ledger.rows(report="r")}["a@x.com"] == ("queued", stored("a@x.com", region="N"))


def test_malformed_rows_are_recorded_failed_once_and_the_planning_row_ends_planned(ledger: Ledger) -> None:
    errors = {"(burst row 2)": "burst row 2: no address in column 'address'"}
    assert ledger.record_failed("r", SLOT, errors) == ["(burst row 2)"]
    assert ledger.record_failed("r", SLOT, errors) == []
    ledger.ensure("r", SLOT, [BURST_KEY])
    claim = ledger.claim("r", SLOT, [BURST_KEY], stale_after=60)
    assert ledger.mark_planned(claim.token, "r", SLOT, [BURST_KEY], "1 readers in 1 piece(s)") == 1
    found = {r.recipient: (r.status, r.error) for r in ledger.rows(report="r")}
    assert found == {"(burst row 2)": ("failed", errors["(burst row 2)"]), BURST_KEY: ("planned", "1 readers in 1 piece(s)")}
    assert ledger.statuses("r", SLOT) == {"(burst row 2)": "failed", BURST_KEY: "planned"}
    # Final: a later claim does not take it again.
    assert ledger.claim("r", SLOT, [BURST_KEY], stale_after=0).done == (BURST_KEY,)


def test_an_older_ledger_gets_the_params_column(ledger_url: str) -> None:
    old = sa.MetaData()
    sa.Table("deliveries", old, *[c._copy() for c in L.deliveries.columns if c.name != "params"])
    engine = L.make_engine(ledger_url)
    old.create_all(engine)
    assert "params" not in {c["name"] for c in sa.inspect(engine).get_columns("deliveries")}
    engine.dispose()
    ledger = Ledger.from_url(ledger_url)
    assert ledger.ensure_readers("r", SLOT, {"a@x.com": stored("a@x.com")}) == ["a@x.com"]
    assert ledger.params_of("r", SLOT, ["a@x.com"]) == {"a@x.com": stored("a@x.com")}
    ledger.dispose()


def test_rows_waiting_for_their_pieces_start_are_not_taken_for_lost_by_the_sweep(ledger: Ledger) -> None:
    ledger.ensure_readers("r", SLOT, {"a@x.com": stored("a@x.com"), "b@x.com": stored("b@x.com")})
    now = datetime.now(UTC)
    assert ledger.expect("r", SLOT, ["b@x.com"], now + timedelta(minutes=10)) == 1
    lost = ledger.stuck(stale_before=now, queued_before=now, retry_before=now)
    assert [r.recipient for r in lost] == ["a@x.com"], "b's piece starts in 10 minutes: not lost yet"
    later = now + timedelta(minutes=11)
    assert "b@x.com" in [r.recipient for r in ledger.stuck(stale_before=now, queued_before=later, retry_before=later)]


# ----------------------------------------------------------------------------- planning and pieces, in process


def test_planning_again_after_a_crash_keeps_the_params_and_sends_only_whom_it_has_not(ledger: Ledger, tmp_path: Path) -> None:
    addresses = [f"r{i}@example.com" for i in range(6)]
    root = make_burst_project(tmp_path, addresses, rate="1/s", soft=8, hard=10)  # 3 readers a piece
    rt = runtime_on(root, ledger)
    pieces: list[Piece] = []
    planned = burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    assert planned.failed == {} and [len(p.keys) for p in pieces] == [3, 3] and [p.countdown for p in pieces] == [0.0, 3.0]
    assert ledger.statuses("regional", SLOT)[BURST_KEY] == "planned"
    first = burst.send_piece(rt, "regional", SLOT, pieces[0].keys)
    assert sorted(first.sent) == sorted(pieces[0].keys)

    # The planning died before it marked its row: it is claimable again, and the warehouse moved a reader meanwhile.
    with ledger.engine.begin() as conn:
        conn.execute(L.deliveries.update().where(L.deliveries.c.recipient == BURST_KEY).values(status=L.QUEUED, claim_token=None))
    moved = pieces[1].keys[0]
    with sa.create_engine(f"sqlite:///{root}/warehouse.db").begin() as conn:
        conn.execute(sa.text("update readers set region = 'West' where address = :a"), {"a": moved})
    again: list[Piece] = []
    burst.send_burst(rt, "regional", SLOT, [BURST_KEY], enqueue=again.append)
    assert [sorted(p.keys) for p in again] == [sorted(pieces[1].keys)], "only the readers not yet sent"
    assert ledger.rows(report="regional", slot=SLOT)[0].error == "6 readers in 1 piece(s) (3 already done)"
    # A piece enqueued twice (the first planning's and the second's) sends once.
    for piece in (*again, pieces[1], pieces[0]):
        burst.send_piece(rt, "regional", SLOT, piece.keys)
    got = received(root / "outbox")
    assert sorted(str(m["To"]) for m in got) == sorted(addresses)
    region_of = {a: REGIONS[i % 5] for i, a in enumerate(addresses)}  # the moved reader keeps the slice first planned
    for msg in got:
        assert msg["Subject"] == f"{region_of[str(msg['To'])]} sales 02"


def test_group_true_sends_one_message_per_parameter_set_to_all_its_readers(ledger: Ledger, tmp_path: Path) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    root = make_burst_project(tmp_path, addresses, regions=["North", "South", "North"], group=True)
    rt = runtime_on(root, ledger)
    pieces: list[Piece] = []
    burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    for piece in pieces:
        burst.send_piece(rt, "regional", SLOT, piece.keys)
    got = sorted(received(root / "outbox"), key=lambda m: str(m["Subject"]))
    assert [(str(m["Subject"]), str(m["To"])) for m in got] == [
        ("North sales 02", "a@example.com, c@example.com"),
        ("South sales 02", "b@example.com"),
    ]
    assert amount_of("North") in pdf_text(got[0]) and amount_of("South") not in pdf_text(got[0])
    assert {r.recipient: r.status for r in ledger.rows(report="regional")} == {BURST_KEY: "planned", **dict.fromkeys(addresses, "sent")}


def test_every_format_and_chart_carries_the_readers_own_numbers(ledger: Ledger, tmp_path: Path) -> None:
    root = make_burst_project(tmp_path, ["a@example.com", "b@example.com"], formats="html, pdf, csv, xlsx")
    chart = "    charts:\n      by_region: {type: bar, title: Sales by region, x: region, y: amount}\n"
    config = root / "schedules.yaml"
    config.write_text(config.read_text().replace("    group: false\n", "    group: false\n" + chart))
    rt = runtime_on(root, ledger)
    pieces: list[Piece] = []
    burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    burst.send_piece(rt, "regional", SLOT, pieces[0].keys)
    from openpyxl import load_workbook

    for msg in received(root / "outbox"):
        region = {"a@example.com": "North", "b@example.com": "South"}[str(msg["To"])]
        other = {"North": "South", "South": "North"}[region]
        parts = {p.get_content_type(): p.get_content() for p in msg.iter_attachments()}
        csv_text = parts["text/csv"].decode("utf-8-sig") if isinstance(parts["text/csv"], bytes) else parts["text/csv"]
        sheet = load_workbook(io.BytesIO(parts[next(k for k in parts if "spreadsheet" in k)])).active
        cells = [str(c.value) for row in sheet.iter_rows() for c in row]  # type: ignore[union-attr]
        html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        text = pdf_text(msg)
        assert amount_of(region) in text and amount_of(region) in html, region
        # The chart (vector in the PDF, an inline PNG in the email) is drawn over the reader's rows only.
        assert "Sales by region" in text and other not in text and 'src="cid:chart-by_region@regional.reporter"' in html
        assert region in csv_text and other not in csv_text and region in cells and other not in cells


# ----------------------------------------------------------------------------- the CLI


def test_malformed_burst_rows_are_recorded_per_row_and_the_rest_still_go_out(tmp_path: Path, inbox: Inbox) -> None:
    addresses: list[str | None] = ["ann@example.com", None, "bob@", "ben@example.com", "ANN@example.com"]
    root = make_burst_project(tmp_path, addresses, regions=["North", "South", "East", "West", "Central"])
    env = env_for(root, REPORTER_SMTP_URL=inbox.url)
    done = run_cli("send", "regional", "--sync", "--slot", "2026-03-02T07:00", env=env, cwd=root)
    assert done.returncode == 2, done.stderr  # failed rows: exit 2
    lines = [line.split("\t") for line in done.stdout.splitlines()]
    assert [line[:2] for line in lines] == [
        [BURST_KEY, "planned"],
        ["ann@example.com", "sent"],
        ["ben@example.com", "sent"],
        ["(burst row 2)", "failed"],
        ["(burst row 3)", "failed"],
        ["(burst row 5)", "failed"],
    ], done.stdout
    assert lines[0][2] == "2 readers in 1 piece(s); 3 malformed row(s)"
    assert lines[3][2] == "burst row 2: no address in column 'address'"
    assert lines[4][2] == "burst row 3: 'bob@' is not an email address"
    assert lines[5][2] == "burst row 5: duplicate of ann@example.com (row 1), which gets its own slice once"
    readers = {rcpts[0]: m for m, (_, rcpts) in zip(inbox.messages, inbox.envelopes, strict=True) if rcpts != ["owner@example.com"]}
    assert sorted(readers) == ["ann@example.com", "ben@example.com"]
    assert readers["ann@example.com"]["Subject"] == "North sales 02" and readers["ben@example.com"]["Subject"] == "West sales 02"
    [notice] = [m for m, (_, rcpts) in zip(inbox.messages, inbox.envelopes, strict=True) if rcpts == ["owner@example.com"]]
    assert "3 delivery(ies) failed" in str(notice["Subject"]) and "(burst row 3): burst row 3: 'bob@'" in notice.get_content()  # type: ignore[attr-defined]
    history = run_cli("history", "regional", env=env, cwd=root)
    assert "(burst)" in history.stdout and "planned" in history.stdout and "(burst row 2)" in history.stdout
    # Again: nobody gets a second email, the owners are not told again.
    again = run_cli("send", "regional", "--sync", "--slot", "2026-03-02T07:00", env=env, cwd=root)
    assert "ann@example.com\talready-sent" in again.stdout and len(inbox.messages) == 3


@pytest.fixture
def shipped_env(shipped_copy: Path, inbox: Inbox) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("REPORTER_") and k != "WAREHOUSE_URL"}
    return env | {"REPORTER_SMTP_URL": inbox.url}


def test_send_to_a_reader_sends_their_own_slice_and_a_stranger_is_told_how(
    shipped_copy: Path, shipped_env: dict[str, str], inbox: Inbox
) -> None:
    slot = ["--sync", "--slot", "2026-11-20T07:00"]
    done = run_cli("send", "sales-by-region", "--to", "sales-east@example.com", *slot, env=shipped_env, cwd=shipped_copy)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sales-east@example.com\tsent\t<sales-by-region.20261120T060000Z.")
    [east] = inbox.messages
    assert str(east["Subject"]).startswith("East sales Friday 20 November: ") and "East" in pdf_text(east)  # type: ignore[arg-type]

    stranger = run_cli("send", "sales-by-region", "--to", "ops@example.org", *slot, env=shipped_env, cwd=shipped_copy)
    assert stranger.returncode == 1 and len(inbox.messages) == 1
    assert (
        "ops@example.org is not a reader of sales-by-region (5 readers, e.g. sales-north@example.com, sales-south@example.com, "
        "sales-east@example.com, …); to send sales-north@example.com's slice to ops@example.org: "
        "--to ops@example.org --as sales-north@example.com"
    ) in stranger.stderr

    as_west = run_cli(
        "send", "sales-by-region", "--to", "ops@example.org", "--as", "sales-west@example.com", *slot, env=shipped_env, cwd=shipped_copy
    )
    assert as_west.returncode == 0, as_west.stderr
    assert as_west.stdout.startswith("ops@example.org\tsent\t")
    west = inbox.messages[1]
    assert inbox.envelopes[1][1] == ["ops@example.org"] and str(west["Subject"]).startswith("West sales Friday 20 November: ")
    west_text = pdf_text(west)  # type: ignore[arg-type]
    assert "West: sales Friday 20 November 2026" in west_text and "East" not in west_text

    plain = run_cli("send", "sales-daily", "--to", "ops@example.org", "--as", "a@example.com", *slot, env=shipped_env, cwd=shipped_copy)
    assert plain.returncode == 1 and "--as: report 'sales-daily' has no burst: readers" in plain.stderr


def test_preview_renders_the_first_readers_slice_or_the_one_asked_for(
    shipped_copy: Path, shipped_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["preview", "sales-by-region", "--slot", "2026-11-20T07:00", "--out", str(out)]
    first = run_cli(*args, env=shipped_env, cwd=shipped_copy)
    assert first.returncode == 0, first.stderr
    assert "reader:  sales-north@example.com (first of 5; --as ADDRESS for another)" in first.stdout
    assert first.stdout.startswith("subject: North sales Friday 20 November: ")
    south = run_cli(*args, "--as", "Sales-South@Example.com", env=shipped_env, cwd=shipped_copy)
    assert south.returncode == 0 and south.stdout.startswith("subject: South sales ") and "reader:" not in south.stdout
    csv_text = (out / "sales-by-region-2026-11-20_0700.csv").read_text("utf-8-sig")
    assert csv_text.splitlines()[0] == "id,product,quantity,amount"
    html = (out / "sales-by-region-2026-11-20_0700.html").read_text()
    assert "orders in South" in html and "orders in North" not in html
    nobody = run_cli(*args, "--as", "nobody@example.com", env=shipped_env, cwd=shipped_copy)
    assert nobody.returncode == 1 and "nobody@example.com is not a reader of sales-by-region (5 readers, e.g. " in nobody.stderr
    assert "Traceback" not in nobody.stderr


def test_a_burst_of_data_functions_gives_each_reader_their_rows(ledger: Ledger, tmp_path: Path) -> None:
    root = make_burst_project(tmp_path, ["a@example.com"])
    module = f"burstdata_{tmp_path.name.replace('-', '_')}"
    (root / f"{module}.py").write_text(
        textwrap.dedent(
            """
            def readers(slot, report):
                return [{"to": "ann@example.com", "team": "red"}, {"to": "ben@example.com", "team": "blue"}, {"to": "", "team": "x"}]

            def rows(slot, report, reader):
                return [{"region": reader["team"], "amount": 1.5 if reader["team"] == "red" else 2.5}]
            """
        )
    )
    config = (root / "schedules.yaml").read_text()
    config = config.replace('      query: {datasource: warehouse, sql: "select address, region from readers order by id"}\n', "")
    config = config.replace("    burst:\n", f"    burst:\n      function: {module}:readers\n      address: to\n")
    config = config.replace(
        '    query:\n      datasource: warehouse\n      sql: "select region, amount from sales where region = :region"\n',
        f"    function: {module}:rows\n",
    )
    (root / "templates" / "region.html").write_text("<p>{{ reader.team }} for {{ reader.address }}: {{ rows[0].amount }}</p>")
    (root / "schedules.yaml").write_text(config.replace("{{ reader.region }}", "{{ reader.team }}"))
    rt = runtime_on(root, ledger)
    pieces: list[Piece] = []
    planned = burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    assert planned.failed == {"(burst row 3)": "burst row 3: no address in column 'to'"}
    for piece in pieces:
        burst.send_piece(rt, "regional", SLOT, piece.keys)
    bodies = {str(m["To"]): (str(m["Subject"]), m.get_body(("html",)).get_content()) for m in received(root / "outbox")}  # type: ignore[union-attr]
    assert bodies["ann@example.com"][0] == "red sales 02" and "red for ann@example.com: 1.5" in bodies["ann@example.com"][1]
    assert bodies["ben@example.com"][0] == "blue sales 02" and "blue for ben@example.com: 2.5" in bodies["ben@example.com"][1]


def test_the_sweep_requeues_a_bursts_lost_rows_in_pieces_with_the_planning_row_on_its_own(ledger: Ledger, tmp_path: Path) -> None:
    addresses = [f"r{i}@example.com" for i in range(7)]
    root = make_burst_project(tmp_path, addresses, rate="1/s", soft=8, hard=10)  # 3 readers a piece
    rt = runtime_on(root, ledger)
    burst.send_burst(rt, "regional", SLOT, None, enqueue=lambda piece: None)  # planned; its pieces' tasks lost
    again: list[Piece] = []
    burst.requeue(rt, "regional", SLOT, [BURST_KEY, *addresses], enqueue=again.append)
    assert again[0] == Piece((BURST_KEY,), 0.0)
    assert [len(p.keys) for p in again[1:]] == [3, 3, 1] and [p.countdown for p in again[1:]] == [0.0, 3.0, 6.0]
    # Ordered by region, as planning orders them.
    region_of = {a: REGIONS[i % 5] for i, a in enumerate(addresses)}
    assert [[region_of[k] for k in p.keys] for p in again[1:]] == [["Central", "East", "North"], ["North", "South", "South"], ["West"]]
    for piece in again[1:]:
        burst.send_piece(rt, "regional", SLOT, piece.keys)
    assert sorted(str(m["To"]) for m in received(root / "outbox")) == addresses


def test_query_params_see_the_reader_and_win_over_its_parameters(ledger: Ledger, tmp_path: Path) -> None:
    root = make_burst_project(tmp_path, ["a@example.com", "b@example.com"])
    config = root / "schedules.yaml"
    # :region comes from params, computed from the reader: b's slice shows North, by this (odd) rule.
    rule = "      params: {region: \"{{ 'North' if reader.address.startswith('b') else reader.region }}\"}\n"
    text = config.read_text().replace('where region = :region"\n', 'where region = :region"\n' + rule)
    config.write_text(text)
    rt = runtime_on(root, ledger)
    pieces: list[Piece] = []
    burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    burst.send_piece(rt, "regional", SLOT, pieces[0].keys)
    texts = {str(m["To"]): pdf_text(m) for m in received(root / "outbox")}
    assert amount_of("North") in texts["a@example.com"] and amount_of("North") in texts["b@example.com"]
    assert "Sales of South" in texts["b@example.com"], "the templates still see the reader's own parameters"
