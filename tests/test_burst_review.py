"""Bursting under review findings: a report that loses `burst:` mid-slot, queries that ignore the reader,
the sweep and dead burst rows, pieces that run out of time, and `send --to READER --as OTHER`.

Ledger parts run on SQLite and PostgreSQL; sends go through the real Maildir transport or an aiosmtpd
inbox, and what people receive is read back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from reporter import burst, deliver
from reporter import ledger as L
from reporter.audience import BURST_KEY
from reporter.burst import Piece, Reader
from reporter.config import load
from reporter.errors import ConfigError
from reporter.ledger import Ledger
from tests import test_burst
from tests.conftest import Inbox, Worker, run_cli, wait_until
from tests.test_burst import (
    BURST_BASE,
    REGIONS,
    SLOT,
    env_for,
    make_burst_project,
    pdf_text,
    received,
    runtime_on,
)
from tests.test_config import write_project

ledger = test_burst.ledger
"""The SQLite and PostgreSQL ledger fixture of tests/test_burst.py."""
shipped_env = test_burst.shipped_env
"""The shipped project's environment, sending to the inbox."""

# ----------------------------------------------------------------------------- 1. losing burst:


def drop_burst(root: Path) -> None:
    """Edit ROOT's config live: `regional` is no longer a burst report, but a plain one to a team address."""
    config = root / "schedules.yaml"
    text = config.read_text()
    text = text.replace('    burst:\n      query: {datasource: warehouse, sql: "select address, region from readers order by id"}\n', "")
    text = text.replace(" where region = :region", "").replace("{{ reader.region }}", "All regions")
    config.write_text(text.replace("    group: false\n", "    group: false\n    recipients: [team@example.com]\n"))
    (root / "templates" / "region.html").write_text("<p>Total {{ all_rows | sum(attribute='amount') | number(2) }}</p>")


def test_rows_planned_as_slices_get_nothing_once_the_report_loses_burst_and_never_the_whole_report(ledger: Ledger, tmp_path: Path) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    root = make_burst_project(tmp_path, addresses)
    pieces: list[Piece] = []
    burst.send_burst(runtime_on(root, ledger), "regional", SLOT, None, enqueue=pieces.append)
    drop_burst(root)
    rt = runtime_on(root, ledger)
    assert rt.config.reports["regional"].burst is None

    # The queued piece (and a retry of it) arrives under the new configuration.
    result = deliver.send_slot(rt, "regional", SLOT, only=list(pieces[0].keys))
    assert result.sent == {} and sorted(result.not_sent) == addresses
    # The sweep re-enqueues the planning row (its planning died): it is not an address, and must not loop.
    with ledger.engine.begin() as conn:
        conn.execute(L.deliveries.update().where(L.deliveries.c.recipient == BURST_KEY).values(status=L.QUEUED, claim_token=None))
    planning = deliver.send_slot(rt, "regional", SLOT, only=[BURST_KEY])
    assert list(planning.not_sent) == [BURST_KEY]
    assert not (root / "outbox").exists() or received(root / "outbox") == [], "no reader got the whole report"
    rows = {r.recipient: (r.status, r.error) for r in ledger.rows(report="regional", slot=SLOT)}
    why = f"the report is no longer a burst report (configuration {rt.config.version}): a reader never gets the whole report"
    for key in (*addresses, BURST_KEY):
        status, error = rows[key]
        assert status == "not-sent" and error is not None and error.startswith("planned as a burst reader's slice") and why in error

    # The plain report itself still goes to its recipient, the whole report, once.
    plain = deliver.send_slot(rt, "regional", SLOT)
    assert list(plain.sent) == ["team@example.com"]
    again = deliver.send_slot(rt, "regional", SLOT, only=["team@example.com"])
    assert again.already == ["team@example.com"] and again.sent == {}
    [msg] = received(root / "outbox")
    assert str(msg["To"]) == "team@example.com" and "Total 166,666.65" in pdf_text(msg)


def test_rows_of_a_plain_report_that_gains_burst_fail_once_and_are_not_taken_again(ledger: Ledger, tmp_path: Path) -> None:
    root = make_burst_project(tmp_path, ["a@example.com"])
    ledger.ensure("regional", SLOT, ["old@example.com"])  # queued by the configuration before burst:
    rt = runtime_on(root, ledger)
    sent: list[Piece] = []
    burst.requeue(rt, "regional", SLOT, ["old@example.com"], enqueue=sent.append)
    [piece] = sent
    result = burst.send_burst(rt, "regional", SLOT, list(piece.keys), enqueue=sent.append)
    assert list(result.failed) == ["old@example.com"] and len(sent) == 1
    now = datetime.now(UTC) + timedelta(hours=1)
    assert ledger.stuck(stale_before=now, queued_before=now, retry_before=now) == []


# ----------------------------------------------------------------------------- 2. queries that ignore the reader


QUERIED = BURST_BASE + "    query:\n      datasource: w\n      sql: "


@pytest.mark.parametrize(
    ("sql", "params", "refused"),
    [
        pytest.param('"select region, amount from sales"', {}, True, id="no-bind"),
        pytest.param('"select region, amount from sales where region = :region"', {}, False, id="binds-region"),
        pytest.param('"select * from sales where region = :region"', {"region": "North"}, True, id="static-param-hides-it"),
        pytest.param('"select * from sales where region = :r"', {"r": "{{ reader.region }}"}, False, id="param-reads-reader"),
        pytest.param('"select * from sales where region = :r"', {"r": "{{ slot.year }}"}, True, id="param-not-the-reader"),
        pytest.param('"select * from sales where d = now()::date"', {}, True, id="a-cast-is-not-a-bind"),
    ],
)
def test_a_burst_reports_query_must_use_the_readers_parameters(tmp_path: Path, sql: str, params: dict[str, str], refused: bool) -> None:
    text = QUERIED + sql + "\n"
    if params:
        text += "      params:\n" + "".join(f"        {k}: {v!r}\n" for k, v in params.items())
    path = write_project(tmp_path, text)
    if not refused:
        load(path, {})
        return
    with pytest.raises(ConfigError) as info:
        load(path, {})
    [problem] = info.value.problems
    assert (problem.line, problem.field, problem.file) == (13, "reports.r1.query.sql", str(path)), problem
    assert problem.message == (
        "a burst report's query must use the reader's parameters, e.g. `and region = :region`; as written every reader gets the same rows"
    )


@pytest.mark.parametrize(
    ("sql", "params", "columns", "problems"),
    [
        pytest.param("select 1 where region = :region", {}, ["region"], [], id="given"),
        pytest.param(
            "select 1 where region = :region and team = :team",
            {},
            ["area"],
            ["the report's query binds :region, :team, which the burst rows do not give (their parameters: area)"],
            id="missing",
        ),
        pytest.param("select 1 where region = :region", {"region": "{{ reader.area }}"}, ["area"], [], id="params-give-it"),
        pytest.param(
            "select 1 where region = :region",
            {"region": "North"},
            ["region", "team"],
            [
                "query.params.region replaces every reader's own 'region' with the same value (query.params win over the "
                "reader's parameters); remove it, or compute it from `reader`"
            ],
            id="shadowed",
        ),
    ],
)
def test_planning_checks_the_query_binds_what_the_readers_give(
    sql: str, params: dict[str, str], columns: list[str], problems: list[str]
) -> None:
    assert burst.reader_use_problems(sql, params, columns) == problems


def test_a_burst_query_that_binds_a_parameter_no_reader_has_fails_the_planning_and_sends_nothing(ledger: Ledger, tmp_path: Path) -> None:
    root = make_burst_project(tmp_path, ["a@example.com", "b@example.com"])
    config = root / "schedules.yaml"
    config.write_text(config.read_text().replace("select address, region from", "select address, region as area from"))
    pieces: list[Piece] = []
    result = burst.send_burst(runtime_on(root, ledger), "regional", SLOT, None, enqueue=pieces.append)
    assert pieces == [] and list(result.failed) == [BURST_KEY]
    assert result.failed[BURST_KEY] == (
        "burst: the report's query binds :region, which the burst rows do not give (their parameters: area)"
    )
    assert {r.recipient: r.status for r in ledger.rows(report="regional")} == {BURST_KEY: "failed"}


# ----------------------------------------------------------------------------- 3. the sweep and dead burst rows


def test_the_sweep_hands_dead_burst_rows_back_once_and_does_not_take_them_again(ledger: Ledger, tmp_path: Path) -> None:
    addresses = [f"r{i}@example.com" for i in range(4)]
    root = make_burst_project(tmp_path, addresses, rate="1/s", soft=5, hard=10)  # 2 readers a piece
    rt = runtime_on(root, ledger)
    burst.send_burst(rt, "regional", SLOT, None, enqueue=lambda piece: None)
    # A piece's worker was killed mid-send: its rows stay claimed, long ago.
    claim = ledger.claim("regional", SLOT, addresses, stale_after=60)
    assert sorted(claim.mine) == addresses
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    with ledger.engine.begin() as conn:
        conn.execute(L.deliveries.update().where(L.deliveries.c.recipient.in_(addresses)).values(claimed_at=long_ago, status=L.SENDING))
    now = datetime.now(UTC)
    cutoffs = {"stale_before": now - timedelta(seconds=rt.stale_after), "queued_before": now, "retry_before": now}
    dead = ledger.stuck(**cutoffs)
    assert sorted(r.recipient for r in dead) == addresses and all(r.dead for r in dead)
    first: list[Piece] = []
    burst.requeue(rt, "regional", SLOT, [r.recipient for r in dead], enqueue=first.append)
    assert [len(p.keys) for p in first] == [2, 2] and [p.countdown for p in first] == [0.0, 2.0]
    assert {r.recipient: r.status for r in ledger.rows(report="regional") if r.recipient != BURST_KEY} == dict.fromkeys(addresses, "queued")
    # The next sweep: the rows wait for the pieces just enqueued, so nothing is taken again.
    assert ledger.stuck(**cutoffs) == []
    # A row claimed again meanwhile (a live execution) is not handed back.
    fresh = ledger.claim("regional", SLOT, [addresses[0]], stale_after=60)
    assert ledger.requeue_dead("regional", SLOT, addresses, now - timedelta(seconds=rt.stale_after)) == 0
    assert ledger.claim("regional", SLOT, [addresses[0]], stale_after=60).busy == fresh.mine


@pytest.mark.slow(minutes=1)
def test_the_sweep_stamps_more_lost_rows_than_a_database_binds_at_once(pg_url: str) -> None:
    made = Ledger.from_url(pg_url)
    many = [f"r{i}@example.com" for i in range(70_000)]  # past PostgreSQL's 65,535 bound parameters a statement
    made.ensure("regional", SLOT, many)
    now = datetime.now(UTC) + timedelta(minutes=1)
    assert len(made.stuck(stale_before=now, queued_before=now, retry_before=now)) == len(many)
    with made.engine.connect() as conn:
        stamped = conn.execute(sa.select(sa.func.count()).where(L.deliveries.c.updated_at > SLOT)).scalar()
    assert stamped == len(many)
    made.dispose()


# ----------------------------------------------------------------------------- 4. pieces and time limits


def reader(key: str, region: str) -> Reader:
    return Reader(key, key, {"region": region}, 0)


@pytest.mark.parametrize(
    ("count", "latest", "countdowns"),
    [
        pytest.param(6, float("inf"), [0.0, 3.0], id="no-cap"),
        pytest.param(12, 5.0, [0.0, 3.0, 5.0, 5.0], id="capped-pieces-start-at-the-cap"),
        pytest.param(3, 0.0, [0.0], id="cap-zero"),
    ],
)
def test_piece_countdowns_stay_below_the_latest_start(count: int, latest: float, countdowns: list[float]) -> None:
    readers = [reader(f"r{i:02d}@x.com", "North") for i in range(count)]
    assert [p.countdown for p in burst.piece_plan(readers, 8, 1.0, latest=latest)] == countdowns


def test_a_piece_past_its_deadline_hands_the_slices_not_started_to_a_fresh_piece(ledger: Ledger, tmp_path: Path) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    root = make_burst_project(tmp_path, addresses, regions=["North", "South", "East"], formats="html")
    rt = runtime_on(root, ledger)
    pieces: list[Piece] = []
    burst.send_burst(rt, "regional", SLOT, None, enqueue=pieces.append)
    [piece] = pieces
    handed: list[Piece] = []
    # Its deadline passed already (other traffic on the rate limit, slow renders): one slice, then hand on.
    result = burst.send_piece(rt, "regional", SLOT, piece.keys, deadline=time.monotonic() - 1, enqueue=handed.append)
    assert len(result.sent) == 1 and result.retry == {} and result.failed == {}
    [fresh] = handed
    assert sorted(fresh.keys) == sorted(k for k in addresses if k not in result.sent) and fresh.countdown == 0.0
    statuses = ledger.statuses("regional", SLOT)
    assert [statuses[k] for k in fresh.keys] == ["queued", "queued"]
    assert all(r.attempts == 0 for r in ledger.rows(report="regional") if r.recipient in fresh.keys)  # a hand-on is no try
    burst.send_piece(rt, "regional", SLOT, fresh.keys)
    assert sorted(str(m["To"]) for m in received(root / "outbox")) == addresses


# ----------------------------------------------------------------------------- 5. send --to READER --as OTHER


def test_send_to_a_reader_as_another_reader_is_refused(shipped_copy: Path, shipped_env: dict[str, str], inbox: Inbox) -> None:
    slot = ["--sync", "--slot", "2026-11-20T07:00"]
    args = ["send", "sales-by-region", "--to", "sales-east@example.com", "--as", "sales-west@example.com", *slot]
    done = run_cli(*args, env=shipped_env, cwd=shipped_copy)
    assert done.returncode == 1 and inbox.messages == []
    assert (
        "sales-east@example.com is a reader of sales-by-region with its own slice; "
        "--as sends a reader's slice to an address that is not a reader"
    ) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.integration
@pytest.mark.slow(minutes=2)
def test_a_live_edit_dropping_burst_while_pieces_wait_sends_no_reader_the_whole_report(
    tmp_path: Path, fresh_redis: str, inbox: Inbox, start_worker: Callable[..., Worker]
) -> None:
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    # 6 emails a minute and a 20 s soft limit: a reader a piece, the pieces 10 s apart.
    root = make_burst_project(tmp_path / "p", addresses, rate="6/m", soft=20, hard=30)
    # The worker looks at the files every second, so the edit below applies before the next piece starts.
    env = env_for(root, REPORTER_BROKER_URL=fresh_redis, REPORTER_SMTP_URL=inbox.url, REPORTER_RELOAD_INTERVAL="1")
    start_worker(env, concurrency=1)
    done = run_cli("send", "regional", "--slot", "2026-03-02T07:00", "--wait", "0", env=env, cwd=root)
    assert "queued regional for 2026-03-02T07:00:00+00:00" in done.stderr, done.stderr  # not waiting for it
    made = Ledger.from_url(f"sqlite:///{root}/ledger.db")
    slot = datetime(2026, 3, 2, 7, 0, tzinfo=UTC)

    def statuses() -> dict[str, str]:
        return {r.recipient: r.status for r in made.rows(report="regional", slot=slot)}

    wait_until(lambda: "sent" in statuses().values(), 60, "the first piece")
    drop_burst(root)  # the other pieces wait in Redis, and then run under the edited configuration
    final = ("sent", "not-sent", "failed", "planned")
    wait_until(lambda: len(statuses()) == 4 and all(s in final for s in statuses().values()), 90, "the other pieces")
    rows = statuses()
    sent = [a for a in addresses if rows[a] == "sent"]
    assert len(sent) == 1, [(r.recipient, r.status, r.config_version, r.error) for r in made.rows(report="regional", slot=slot)]
    first = sent[0]
    assert sorted(a for a in addresses if rows[a] == "not-sent") == sorted(set(addresses) - {first}), rows
    time.sleep(1)  # a wrongly sent message, if any, would arrive now
    assert [rcpts for _, rcpts in inbox.envelopes] == [[first]], "nobody else got anything, least of all the whole report"
    [msg] = inbox.messages
    assert "Total 166,666.65" not in pdf_text(msg) and f"Sales of {REGIONS[addresses.index(first)]}" in pdf_text(msg)
    made.dispose()
