"""Bursting, second round of review fixes: hand-ons spend no attempt, `send --sync` never publishes, static
params that shadow some reader parameters, the per-message deadline, capped pieces and the sweep, rows left
`sending` when burst: goes, and bind names outside comments and literals."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from reporter import burst, cli, defaults, deliver, tasks
from reporter import ledger as L
from reporter.audience import BURST_KEY
from reporter.burst import Piece, Reader
from reporter.config import bind_names, cast_problems, load
from reporter.errors import ConfigError
from reporter.ledger import Ledger
from tests import test_burst
from tests.test_burst import SLOT, env_for, make_burst_project, received, runtime_on
from tests.test_burst_review import QUERIED, drop_burst
from tests.test_config import write_project

ledger = test_burst.ledger
"""The SQLite and PostgreSQL ledger fixture of tests/test_burst.py."""


def plan_one_piece(rt: Any) -> Piece:
    pieces: list[Piece] = []
    burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    [piece] = pieces
    return piece


# ----------------------------------------------------------------------------- 1. a hand-on is not an attempt


def test_hand_ons_spend_no_attempt_so_each_reader_counts_only_its_real_try(ledger: Ledger, tmp_path: Path) -> None:
    addresses = [f"r{i}@example.com" for i in range(4)]
    root = make_burst_project(tmp_path, addresses, regions=["North", "South", "East", "West"], formats="html")
    rt = runtime_on(root, ledger)
    todo = plan_one_piece(rt).keys
    hand_ons = 0
    # Every piece is past its deadline at once: it sends one reader and hands the rest on, again and again.
    while todo:
        handed: list[Piece] = []
        result = burst.send_piece(rt, "regional", SLOT, todo, deadline=time.monotonic() - 1, enqueue=handed.append)
        assert len(result.sent) == 1 and result.retry == {}
        hand_ons += len(handed)
        todo = handed[0].keys if handed else ()
    assert hand_ons == 3
    rows = {r.recipient: r for r in ledger.rows(report="regional") if r.recipient != BURST_KEY}
    assert {k: (r.status, r.attempts) for k, r in rows.items()} == dict.fromkeys(addresses, ("sent", 1))
    assert sorted(str(m["To"]) for m in received(root / "outbox")) == addresses


def test_hand_back_changes_only_the_rows_its_claim_holds(ledger: Ledger) -> None:
    ledger.ensure("r", SLOT, ["a@x.com", "b@x.com"])
    mine = ledger.claim("r", SLOT, ["a@x.com"], stale_after=60)
    other = ledger.claim("r", SLOT, ["b@x.com"], stale_after=60)
    assert ledger.hand_back(mine.token, "r", SLOT, ["a@x.com", "b@x.com"], "handed on") == 1
    rows = {r.recipient: (r.status, r.attempts) for r in ledger.rows(report="r")}
    assert rows == {"a@x.com": ("queued", 0), "b@x.com": ("rendering", 1)}
    assert ledger.claim("r", SLOT, ["a@x.com"], stale_after=60).mine == ("a@x.com",)
    assert other.mine == ("b@x.com",)


# ----------------------------------------------------------------------------- 2. send --sync never publishes


def test_send_sync_runs_hand_ons_itself_and_prints_every_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    root = make_burst_project(tmp_path, addresses, regions=["North", "South", "East"], formats="html")
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks, "enqueue_send", lambda *args, **kwargs: published.append(kwargs))
    # Every piece is past its deadline at once, so each hands on after its first reader.
    monkeypatch.setattr(burst, "PIECE_DEADLINE", -1.0)
    for key in [k for k in os.environ if k.startswith("REPORTER_")]:
        monkeypatch.delenv(key)
    for key, value in env_for(root).items():
        monkeypatch.setenv(key, value)
    done = CliRunner().invoke(cli.cli, ["send", "regional", "--sync", "--slot", "2026-03-02T07:00"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    assert published == []
    lines = [line.split("\t")[:2] for line in done.stdout.splitlines()]
    assert lines == [[BURST_KEY, "planned"], *[[a, "sent"] for a in addresses]], done.stdout
    assert sorted(str(m["To"]) for m in received(root / "outbox")) == addresses


# ----------------------------------------------------------------------------- 3. static params that shadow some reader parameters


@pytest.mark.parametrize(
    ("sql", "params", "columns", "problems", "hidden"),
    [
        pytest.param(
            "select 1 where region = :region and cur = :currency",
            {"currency": "EUR"},
            ["region", "currency"],
            [],
            ["currency"],
            id="region-still-from-the-reader",
        ),
        pytest.param("select 1 where region = :region", {"currency": "EUR"}, ["region", "currency"], [], [], id="not-bound"),
        pytest.param(
            "select 1 where region = :region",
            {"region": "North"},
            ["region"],
            [
                "query.params.region replaces every reader's own 'region' with the same value (query.params win over the "
                "reader's parameters); remove it, or compute it from `reader`"
            ],
            ["region"],
            id="nothing-from-the-reader",
        ),
        pytest.param(
            "select 1 where region = :region and r2 = :r2",
            {"region": "North", "r2": "{{ reader.region }}"},
            ["region"],
            [],
            ["region"],
            id="another-param-reads-reader",
        ),
    ],
)
def test_static_params_fail_planning_only_when_no_bound_name_comes_from_the_reader(
    sql: str, params: dict[str, str], columns: list[str], problems: list[str], hidden: list[str]
) -> None:
    assert burst.reader_use_problems(sql, params, columns) == problems
    assert burst.shadowed(sql, params, columns) == hidden


def test_planning_with_a_shadowed_parameter_sends_and_says_so_in_its_summary(ledger: Ledger, tmp_path: Path) -> None:
    addresses = ["a@example.com", "b@example.com"]
    root = make_burst_project(tmp_path, addresses, regions=["North", "South"], formats="html")
    config = root / "schedules.yaml"
    text = config.read_text().replace("select address, region from readers", "select address, region, 'USD' as currency from readers")
    text = text.replace("where region = :region", "where region = :region and :currency = :currency")
    config.write_text(text.replace("    formats:", "      params: {currency: EUR}\n    formats:"))
    rt = runtime_on(root, ledger)
    piece = plan_one_piece(rt)
    planning = {r.recipient: r for r in ledger.rows(report="regional")}[BURST_KEY]
    assert planning.status == "planned"
    assert planning.error == "2 readers in 1 piece(s); query.params give every reader the same currency (the readers' own are not used)"
    assert sorted(burst.send_piece(rt, "regional", SLOT, piece.keys).sent) == addresses


# ----------------------------------------------------------------------------- 4. the deadline per message


def test_a_piece_past_its_deadline_hands_on_the_rest_of_a_slice_it_started(ledger: Ledger, tmp_path: Path) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    # One parameter set, one message each: the whole piece is one slice.
    root = make_burst_project(tmp_path, addresses, regions=["North"] * 3, formats="html")
    rt = runtime_on(root, ledger)
    piece = plan_one_piece(rt)
    handed: list[Piece] = []
    result = burst.send_piece(rt, "regional", SLOT, piece.keys, deadline=time.monotonic() - 1, enqueue=handed.append)
    assert len(result.sent) == 1 and result.retry == {} and result.failed == {}
    [fresh] = handed
    assert sorted(fresh.keys) == sorted(a for a in addresses if a not in result.sent)
    assert {r.recipient: (r.status, r.attempts) for r in ledger.rows(report="regional") if r.recipient in fresh.keys} == dict.fromkeys(
        fresh.keys, ("queued", 0)
    )
    burst.send_piece(rt, "regional", SLOT, fresh.keys)
    assert sorted(str(m["To"]) for m in received(root / "outbox")) == addresses


@pytest.mark.parametrize(("soft", "rate", "size"), [(100, 1.0, 40), (10, 2.0, 8), (2, 1.0, 1)])
def test_pieces_leave_the_rest_of_the_soft_limit_for_renders_and_smtp(soft: float, rate: float, size: int) -> None:
    assert burst.piece_size(soft, rate) == size
    assert burst.PIECE_SHARE < burst.PIECE_DEADLINE <= 0.7


# ----------------------------------------------------------------------------- 5. capped pieces and the sweep


def test_capped_pieces_run_when_the_rate_limit_reaches_them() -> None:
    readers = [Reader(f"r{i:02d}@x.com", f"r{i:02d}@x.com", {"region": "North"}, 0) for i in range(9)]
    pieces = burst.piece_plan(readers, 8, 1.0, latest=2.0)
    assert [(p.countdown, p.runs) for p in pieces] == [(0.0, 0.0), (2.0, 3.0), (2.0, 6.0)]


def test_the_sweep_does_not_take_capped_pieces_waiting_their_turn_for_lost(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    addresses = [f"r{i}@example.com" for i in range(7)]
    root = make_burst_project(tmp_path, addresses, rate="1/s", soft=8, hard=10)  # 3 readers a piece
    monkeypatch.setattr(burst, "latest_start", lambda rt: 0.0)  # every piece starts at once
    pieces: list[Piece] = []
    started = datetime.now(UTC)
    burst.send_burst(runtime_on(root, ledger), "regional", SLOT, None, enqueue=pieces.append)
    assert [p.countdown for p in pieces] == [0.0, 0.0, 0.0]
    # A sweep a grace period after the start: only the first piece should have run by now.
    soon = started + timedelta(seconds=1)
    lost = ledger.stuck(stale_before=soon, queued_before=soon, retry_before=soon)
    assert sorted(r.recipient for r in lost) == sorted(pieces[0].keys)


# ----------------------------------------------------------------------------- 6. rows left `sending` when burst: goes


def test_a_row_left_sending_when_burst_goes_is_recorded_as_maybe_delivered(ledger: Ledger, tmp_path: Path) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    root = make_burst_project(tmp_path, addresses)
    piece = plan_one_piece(runtime_on(root, ledger))
    # The piece's worker died: a's message was in its SMTP transaction, b's slice still rendering.
    ledger.claim("regional", SLOT, ["a@example.com", "b@example.com"], stale_after=60)
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    with ledger.engine.begin() as conn:
        rows = L.deliveries.c.recipient
        conn.execute(L.deliveries.update().where(rows == "a@example.com").values(status=L.SENDING, claimed_at=long_ago))
        conn.execute(L.deliveries.update().where(rows == "b@example.com").values(claimed_at=long_ago))
    drop_burst(root)
    rt = runtime_on(root, ledger)
    result = deliver.send_slot(rt, "regional", SLOT, only=list(piece.keys))
    assert result.sent == {} and sorted(result.not_sent) == addresses
    version = rt.config.version
    assert result.not_sent["a@example.com"] == (
        f"may have been delivered before burst: was removed; not sent again, as the report no longer has burst: (configuration {version})"
    )
    for key in ("b@example.com", "c@example.com"):
        assert result.not_sent[key] == burst.NO_LONGER_BURST.format(version=version)
    statuses = {r.recipient: r.status for r in ledger.rows(report="regional") if r.recipient in addresses}
    assert statuses == dict.fromkeys(addresses, "not-sent")


# ----------------------------------------------------------------------------- 7. bind names outside comments and literals


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        ("select * from s where region = :region", {"region"}),
        ("select * from s -- and region = :region", set()),
        ("select * from s where a = :a -- and region = :region\nand b = :b", {"a", "b"}),
        ("select * from s /* where region = :region */ where a = :a", {"a"}),
        ("select * from s /* multi\nline :x\n*/ where a = :a", {"a"}),
        ("select ':region' as r, 'it''s :x' as q from s where a = :a", {"a"}),
        ('select "odd:col" from s where a = :a', {"a"}),
        ("select '--' as dash from s where a = :a", {"a"}),
        ("select * from s where d > :since::date", set()),
    ],
)
def test_bind_names_ignore_comments_and_quoted_strings(sql: str, names: set[str]) -> None:
    assert bind_names(sql) == names


def test_a_cast_of_a_bind_says_to_write_cast() -> None:
    assert cast_problems("select * from s where d > :since::date -- :x::int") == [
        ":since::date is not a bind parameter to SQLAlchemy (a ':' follows the name); write CAST(:since AS date)"
    ]
    assert cast_problems("select now()::date, CAST(:since AS date)") == []


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        pytest.param(
            '"select * from sales -- and region = :region"',
            "a burst report's query must use the reader's parameters, e.g. `and region = :region`; "
            "as written every reader gets the same rows",
            id="commented-out",
        ),
        pytest.param(
            '"select * from sales where region = :region and d > :since::date"',
            ":since::date is not a bind parameter to SQLAlchemy (a ':' follows the name); write CAST(:since AS date)",
            id="pg-cast",
        ),
    ],
)
def test_validate_names_the_query_line_for_a_commented_bind_or_a_cast(tmp_path: Path, sql: str, message: str) -> None:
    path = write_project(tmp_path, QUERIED + sql + "\n")
    with pytest.raises(ConfigError) as info:
        load(path, {})
    [problem] = info.value.problems
    assert (problem.line, problem.field, problem.file) == (13, "reports.r1.query.sql", str(path)), problem
    assert problem.message == message


# ----------------------------------------------------------------------------- the sweep's trigger


@pytest.mark.parametrize(("trigger", "queue"), [("schedule", defaults.QUEUE_SCHEDULED), ("manual", defaults.QUEUE_URGENT)])
def test_requeue_publishes_on_the_queue_of_the_rows_trigger(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trigger: str, queue: str
) -> None:
    root = make_burst_project(tmp_path, ["a@example.com"])
    rt = runtime_on(root, ledger)
    burst.send_burst(rt, "regional", SLOT, None, enqueue=lambda piece: None)
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(tasks, "enqueue_send", lambda *args, **kwargs: published.append(kwargs))
    burst.requeue(rt, "regional", SLOT, ["a@example.com"], trigger=trigger)
    assert [(p["queue"], p["trigger"], p["only"]) for p in published] == [(queue, trigger, ["a@example.com"])]
